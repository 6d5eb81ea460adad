"""V-MoE's inference-capacity result at small scale (Riquelme et al. 2021, §4.1, Figure 6):
a model trained with batch prioritized routing (BPR) keeps its accuracy when the capacity
is lowered at inference, one that drops by position loses it quickly.

For each seed, specs/v-moe.yaml is trained twice on the digits (``--data digits``, the same
seed, steps and data): once as written (``drop_priority: score``, BPR) and once with
``drop_priority: position``; then each is evaluated on the held-out digits (the whole
held-out set, 299 images) with every gate's evaluation capacity factor set to 1.5, 1.0,
0.5, 0.25 and 0.125 (``moedsl.evaluate``), each in both orders at inference: the order it
was trained with, and the other (``drop_priority`` changes no weight, so a checkpoint loads
under either). The dense ViT at the same active parameters (specs/vit-dense.yaml) is trained
with the same seed beside them.

    python bench/vmoe_capacity.py                       # seeds 0, 1, 2 at the specs' 600 steps (~15-30 min on 2 cores)
    python bench/vmoe_capacity.py --seeds 0 --steps 200
    python bench/vmoe_capacity.py --reuse                # evaluate the runs already in --out again
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


def train(spec: Path, out: Path, seed: int, steps: int | None, reuse: bool = False) -> dict:
    if reuse and (out / "checkpoints").is_dir():
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "accuracy" in line][-1]
        return {"seconds": 0.0, "eval_accuracy": last["accuracy"]}
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
    ap.add_argument("--reuse", action="store_true", help="do not train again where --out holds a run")
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
    acc: dict = {}  # (trained, inference order, seed, factor) -> accuracy; ("dense", "", seed, None)
    dropped: dict = {}
    from moedsl.nn import cpu_caps  # here, not at the top: only the children time anything

    t0 = time.time()
    for seed in seeds:
        for name, spec in variants.items():
            run = out / f"{name}-{seed}"
            s = train(spec, run, seed, a.steps, a.reuse)
            print(f"{name} seed {seed}: trained in {s['seconds']:.0f} s, held-out accuracy at the training "
                  f"capacity {s['eval_accuracy']:.4f}", flush=True)
            ckpt = str(sorted((run / "checkpoints").glob("step-*"))[-1])
            for order, order_spec in variants.items():
                for c in FACTORS:
                    r = moedsl.evaluate(str(run), c) if order == name else \
                        moedsl.evaluate(str(order_spec), c, checkpoint=ckpt)
                    acc[(name, order, seed, c)], dropped[(name, order, seed, c)] = r["accuracy"], r["dropped"]
        s = train(ROOT / "specs" / "vit-dense.yaml", out / f"dense-{seed}", seed, a.steps, a.reuse)
        acc[("dense", "", seed, None)] = s["eval_accuracy"]
        print(f"dense seed {seed}: trained in {s['seconds']:.0f} s, held-out accuracy {s['eval_accuracy']:.4f}",
              flush=True)

    t = Table(title=f"held-out accuracy on the digits (299 images), seeds {seeds}: mean (per seed); "
              "columns: trained with / evaluated with; dropped: mean fraction of assignments dropped; "
              + cpu_caps.describe(),
              title_justify="left")
    columns = [("BPR", "BPR"), ("position", "position"), ("BPR", "position"), ("position", "BPR")]
    t.add_column("eval capacity factor", justify="right")
    for trained, order in columns:
        t.add_column(f"{trained} / {order}", justify="right")
    t.add_column("dropped (BPR / BPR)", justify="right")
    t.add_column("dense ViT", justify="right")
    dense = [acc[("dense", "", s, None)] for s in seeds]
    for c in FACTORS:
        cells = []
        for trained, order in columns:
            v = [acc[(trained, order, s, c)] for s in seeds]
            cells.append(f"{statistics.mean(v):.3f} ({' '.join(f'{x:.3f}' for x in v)})")
        cells.append(f"{statistics.mean(dropped[('BPR', 'BPR', s, c)] for s in seeds):.0%}")
        t.add_row(f"{c:g}", *cells, f"{statistics.mean(dense):.3f} ({' '.join(f'{x:.3f}' for x in dense)})")
    Console(width=200).print(t)
    print(f"({time.time() - t0:.0f} s in all)")
    if a.json:
        Path(a.json).write_text(json.dumps({"seeds": seeds, "factors": FACTORS,
                                            "accuracy": {"/".join(map(str, k)): v for k, v in acc.items()},
                                            "dropped": {"/".join(map(str, k)): v for k, v in dropped.items()}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
