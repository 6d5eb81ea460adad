"""Step time of ``moedsl run`` on a quiet machine and on one whose cores other processes load.

Each row is one setting (environment variables for the run); each column a load: no extra
process, or ``--load N`` busy loops (``python -c 'while True: pass'``, started here and
killed at the end of each measurement) sharing the cores. Each cell is the median step time
(seconds, from metrics.jsonl's tokens_per_s), and in brackets the fastest step (what
the machine gives when nothing else happens to run), over ``--repeats`` runs of ``--steps`` steps,
the first ``--skip`` steps of each run left out (the kernel build, first-touch of memory).
Settings and loads are interleaved run by run, so that a change in the machine's background
load shifts every cell alike.

    python bench/contention.py                                  # the rows of bench/README.md
    python bench/contention.py --steps 20 --repeats 5 --load 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the environment of each row's run; "configure_threads()" runs moedsl after
# moedsl.runtime.cpu.configure_threads(), as `moedsl run` does, in an environment without any
CONFIGURED = "configure_threads()"
SETTINGS = {
    "default": {},
    CONFIGURED: {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=3000": {"GOMP_SPINCOUNT": "3000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
}
CONFIGURE_THEN_RUN = ("import sys; from moedsl.runtime.cpu import configure_threads; configure_threads(); "
                      "from moedsl.cli import main; sys.exit(main(sys.argv[1:]))")


def busy_loops(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def one_run(spec: str, steps: int, skip: int, setting: str) -> list:
    with tempfile.TemporaryDirectory() as out:
        entry = ["-c", CONFIGURE_THEN_RUN] if setting == CONFIGURED else ["-m", "moedsl"]
        cmd = [sys.executable, *entry, "run", spec, "--steps", str(steps), "--no-progress", "--out", out,
               "--eval-every", str(10 * steps), "--checkpoint-every", str(10 * steps)]
        run_env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS"):
            run_env.pop(k, None)  # only what the row sets
        run_env.update(SETTINGS[setting])
        subprocess.run(cmd, check=True, env=run_env, stdout=subprocess.DEVNULL, timeout=3600)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return [1.0 / r["tokens_per_s"] for r in rows[skip:]]  # seconds per token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "switch.yaml"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy loops per column")
    ap.add_argument("--settings", nargs="+", default=["default", CONFIGURED, "OMP_NUM_THREADS=1"],
                    choices=list(SETTINGS))
    ap.add_argument("--tokens", type=int, default=16 * 64, help="tokens per step (the spec's batch × seq)")
    a = ap.parse_args()
    times = {(s, n): [] for s in a.settings for n in a.load}
    for rep in range(a.repeats):
        for n in a.load:
            for s in a.settings:
                procs = busy_loops(n)
                try:
                    time.sleep(0.5 if n else 0)
                    per_token = one_run(a.spec, a.steps, a.skip, s)
                finally:
                    stop(procs)
                step = [t * a.tokens for t in per_token]
                times[s, n] += step
                print(f"# run {rep + 1}/{a.repeats}, load {n}, {s}: median {statistics.median(step):.3f} s, "
                      f"max {max(step):.3f} s", file=sys.stderr, flush=True)
    cols = [f"{n} busy loop{'s' if n != 1 else ''}" if n else "no extra load" for n in a.load]
    from moedsl.nn import cpu_caps  # here, not at the top: torch would load its OpenMP runtime in this process

    print(cpu_caps.describe())
    print(f"step time, seconds: median (fastest) of {a.repeats} runs x {a.steps - a.skip} steps per cell; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| setting | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for s in a.settings:
        cells = [f"{statistics.median(times[s, n]):.3f} ({min(times[s, n]):.3f})" for n in a.load]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
