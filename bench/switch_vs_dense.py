"""The Switch paper's core claim at small scale: with the same active parameters per token
and the same number of steps, the switch spec reaches a lower held-out loss than the dense
one. Both train on the Python standard library's source (byte-level, ``--data pystdlib``),
with the same held-out set, for several seeds.

    python bench/switch_vs_dense.py                      # 1500 steps, seeds 0 to 4 (about 20 min)
    python bench/switch_vs_dense.py --steps 300 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--out", default="runs/switch-vs-dense")
    a = ap.parse_args(argv)
    results: dict = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in ("switch", "dense"):
            out = Path(a.out) / f"{name}-{seed}"
            cmd = [sys.executable, "-m", "moedsl", "run", str(ROOT / "specs" / f"{name}.yaml"), "--data", "pystdlib",
                   "--steps", str(a.steps), "--eval-every", str(max(a.steps // 4, 1)), "--eval-batches",
                   str(a.eval_batches), "--seed", str(seed), "--out", str(out), "--no-progress", "--json"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            summary = json.loads(res.stdout[res.stdout.index("{"):])
            evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[(name, seed)] = (summary, [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r])
            print(f"{name} seed {seed}: held-out {summary['eval_loss']:.4f} after {a.steps} steps "
                  f"({summary['seconds']:.0f} s)", flush=True)
    seeds = sorted({s for _, s in results})
    from moedsl.nn import cpu_caps  # here, not at the top: only the children time anything

    print(f"\nheld-out loss (bytes, nats/token) on --data pystdlib, batch 16 × 64, seeds {seeds}; "
          f"{cpu_caps.describe()}:\n")
    print("\n".join(loss_table(results, seeds)))
    wins = sum(results[("switch", s)][0]["eval_loss"] < results[("dense", s)][0]["eval_loss"] for s in seeds)
    sw_t = statistics.mean(results[("switch", s)][0]["seconds"] for s in seeds)
    de_t = statistics.mean(results[("dense", s)][0]["seconds"] for s in seeds)
    print(f"\nswitch below dense at the last step in {wins} of {len(seeds)} seeds; "
          f"mean wall time switch {sw_t:.0f} s, dense {de_t:.0f} s")
    return 0


def loss_table(results: dict, seeds: list) -> list:
    """The markdown rows of the held-out losses at each evaluation step, switch and dense side by
    side per seed, then their means; ``results[(name, seed)]`` = (summary, [(step, loss), ...])."""
    steps = [s for s, _ in results[("switch", seeds[0])][1]]
    rows = ["| step | " + " | ".join(f"switch s{s} | dense s{s}" for s in seeds) + " | switch mean | dense mean |",
            "|---|" + "---|---|" * len(seeds) + "---|---|"]
    for i, step in enumerate(steps):
        sw = [results[("switch", s)][1][i][1] for s in seeds]
        de = [results[("dense", s)][1][i][1] for s in seeds]
        cells = " | ".join(f"{x:.4f} | {y:.4f}" for x, y in zip(sw, de))
        rows.append(f"| {step} | {cells} | {statistics.mean(sw):.4f} | {statistics.mean(de):.4f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
