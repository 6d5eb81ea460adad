"""Switch as published, at CPU scale: the encoder–decoder ``specs/switch-t5-small.yaml``
pretrained with T5's span corruption (Raffel et al. 2020, §3.1.4) on the Python standard
library's source, beside ``specs/t5-small-dense.yaml``, the same T5 with one dense FFN of an
expert's width where Switch has its experts, so both use the same parameters per token
(Fedus et al. 2021, §2.4's comparison at equal FLOPs). Both read the same held-out
corruptions; the figure is the held-out cross-entropy of the targets (nats per target
token, sentinels and eos included) at equal steps, for several seeds, whatever the outcome.

    python bench/encdec_pretrain.py                      # 1000 steps, seeds 0, 1, 2
    python bench/encdec_pretrain.py --steps 100 --seeds 0
    python bench/encdec_pretrain.py --reuse              # the table again from finished runs under --out
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"switch": "switch-t5-small", "dense": "t5-small-dense"}


def run(name: str, seed: int, a) -> tuple:
    """One training run in a child process: (its summary, [(step, held-out loss)])."""
    out = Path(a.out) / f"{name}-{seed}"
    if a.reuse and (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if rows and rows[-1]["step"] == a.steps and rows[-1].get("eval_loss") is not None:
            # wall time from the metrics' clock: the first step's end to the last's (the summary's
            # seconds also count the first step and the final evaluation)
            return ({"eval_loss": rows[-1]["eval_loss"], "seconds": rows[-1]["time"] - rows[0]["time"]},
                    [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None])
    cmd = [sys.executable, "-m", "moedsl", "run", str(ROOT / "specs" / f"{SPECS[name]}.yaml"), "--data", "pystdlib",
           "--steps", str(a.steps), "--eval-every", str(max(a.steps // 4, 1)), "--eval-batches",
           str(a.eval_batches), "--seed", str(seed), "--out", str(out), "--no-progress", "--json", "--overwrite"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode})")
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--out", default="runs/encdec-pretrain")
    ap.add_argument("--reuse", action="store_true", help="take a run already finished under --out (same steps) "
                    "instead of training it again")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    results: dict = {}
    for seed in seeds:
        for name in SPECS:
            results[(name, seed)] = run(name, seed, a)
            summary = results[(name, seed)][0]
            print(f"{SPECS[name]} seed {seed}: held-out {summary['eval_loss']:.4f} after {a.steps} steps "
                  f"({summary['seconds']:.0f} s)", flush=True)
    from moedsl.nn import cpu_caps  # here, not at the top: only the children time anything
    from switch_vs_dense import loss_table  # its neighbour in bench/: the same table

    print(f"\nheld-out span-corruption loss (nats per target token) on --data pystdlib, seeds {seeds}; "
          f"{cpu_caps.describe()}:\n")
    print("\n".join(loss_table(results, seeds)))
    last = {k: v[0]["eval_loss"] for k, v in results.items()}
    wins = sum(last[("switch", s)] < last[("dense", s)] for s in seeds)
    gaps = [last[("dense", s)] - last[("switch", s)] for s in seeds]
    times = {n: statistics.mean(results[(n, s)][0]["seconds"] for s in seeds) for n in SPECS}
    print(f"\nswitch below dense at step {a.steps} in {wins} of {len(seeds)} seeds (dense − switch: "
          + ", ".join(f"{g:+.4f}" for g in gaps) + f"); mean wall time switch {times['switch']:.0f} s, "
          f"dense {times['dense']:.0f} s")
    drops = []
    for s in seeds:
        rows = [json.loads(line) for line in (Path(a.out) / f"switch-{s}" / "metrics.jsonl").read_text().splitlines()]
        drops.append(statistics.mean(r["dropped"] for r in rows[-100:]))
    print("switch's dropped assignments, mean over the last 100 training steps: "
          + ", ".join(f"s{s} {d:.1%}" for s, d in zip(seeds, drops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
