"""V-MoE's inference-capacity result at small scale (Riquelme et al. 2021, §4.1, Figure 6):
a model trained with batch prioritized routing (BPR) keeps its accuracy when the capacity
is lowered at inference, one that drops by position loses it quickly.

For each seed, specs/v-moe.yaml is trained twice on the digits (``--data digits``, the same
seed, steps and data): once as written (``drop_priority: score``, BPR) and once with
``drop_priority: position``; then each is evaluated on the held-out digits (the whole
held-out set, 299 images) with every gate's evaluation capacity factor set to 1.5, 1.0,
0.5, 0.25 and 0.125 (``moedsl.evaluate``). The dense ViT at the same active parameters
(specs/vit-dense.yaml) is trained with the same seed beside them.

    python bench/vmoe_capacity.py                       # seeds 0, 1, 2 at the specs' 600 steps (~15-30 min on 2 cores)
    python bench/vmoe_capacity.py --seeds 0 --steps 200
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTORS = (1.5, 1.0, 0.5, 0.25, 0.125)


def train(spec: Path, out: Path, seed: int, steps: int | None) -> dict:
    cmd = [sys.executable, "-m", "moedsl", "run", str(spec), "--seed", str(seed), "--out", str(out),
           "--overwrite", "--no-progress", "--json"]
    if steps:
        cmd += ["--steps", str(steps), "--eval-every", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout[res.stdout.index("{"):])


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    import moedsl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the specs' 600)")
    ap.add_argument("--out", default="runs/vmoe-capacity")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bpr_text = (ROOT / "specs" / "v-moe.yaml").read_text()
    assert "drop_priority: score" in bpr_text
    position = out / "v-moe-position.yaml"
    position.write_text(bpr_text.replace("name: v-moe", "name: v-moe-position")
                        .replace("drop_priority: score", "drop_priority: position"))
    variants = {"BPR": ROOT / "specs" / "v-moe.yaml", "position": position}
    acc: dict = {}  # (variant, seed, factor) -> accuracy; ("dense", seed, None)
    dropped: dict = {}
    t0 = time.time()
    for seed in seeds:
        for name, spec in variants.items():
            run = out / f"{name}-{seed}"
            s = train(spec, run, seed, a.steps)
            print(f"{name} seed {seed}: trained in {s['seconds']:.0f} s, held-out accuracy at the training "
                  f"capacity {s['eval_accuracy']:.4f}", flush=True)
            for c in FACTORS:
                r = moedsl.evaluate(str(run), c)
                acc[(name, seed, c)], dropped[(name, seed, c)] = r["accuracy"], r["dropped"]
        s = train(ROOT / "specs" / "vit-dense.yaml", out / f"dense-{seed}", seed, a.steps)
        acc[("dense", seed, None)] = s["eval_accuracy"]
        print(f"dense seed {seed}: trained in {s['seconds']:.0f} s, held-out accuracy {s['eval_accuracy']:.4f}",
              flush=True)

    t = Table(title=f"held-out accuracy on the digits (299 images), seeds {seeds}: mean (per seed); "
              f"dropped: mean fraction of assignments dropped", title_justify="left")
    for col in ("eval capacity factor", "V-MoE, BPR", "dropped", "V-MoE, position", "dropped", "dense ViT"):
        t.add_column(col, justify="right")
    dense = [acc[("dense", s, None)] for s in seeds]
    for c in FACTORS:
        cells = []
        for name in variants:
            v = [acc[(name, s, c)] for s in seeds]
            cells += [f"{statistics.mean(v):.3f} ({' '.join(f'{x:.3f}' for x in v)})",
                      f"{statistics.mean(dropped[(name, s, c)] for s in seeds):.0%}"]
        t.add_row(f"{c:g}", *cells, f"{statistics.mean(dense):.3f} ({' '.join(f'{x:.3f}' for x in dense)})")
    Console(width=160).print(t)
    print(f"({time.time() - t0:.0f} s in all)")
    if a.json:
        Path(a.json).write_text(json.dumps({"seeds": seeds, "factors": FACTORS,
                                            "accuracy": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in acc.items()},
                                            "dropped": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in dropped.items()}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
