"""From dense to sparse and back, at CPU scale on the Python standard library (``--data pystdlib``,
byte-level), for several seeds, whatever the outcome:

- **Upcycling** (Komatsuzaki et al. 2023, "Sparse Upcycling"): specs/dense.yaml trained N steps,
  then (a) continued dense for M more steps, against (b) the same checkpoint upcycled
  (``moedsl upcycle --experts 8 --k 2``: every FFN copied into 8 experts, a new router, top-2
  renormalised, so the upcycled model starts with the dense model's logits) and trained M steps.
  Both continuations start a fresh M-step schedule from the step-N weights (``run --init``), on
  the same batches; held-out loss after M.
- **Distillation** (Fedus et al. 2021, "Switch Transformers", §4.2): a switch teacher (specs/switch.yaml)
  trained N steps; a dense student (specs/dense.yaml) initialised from the teacher's non-expert
  weights (``moedsl distill-init``) and trained N steps on 0.25 × the teacher's probabilities +
  0.75 × the labels, against the dense spec trained N steps on the labels alone, and against the
  same initialisation trained N steps on the labels alone (the control: what the start alone is
  worth), and against the dense spec from its own initialisation trained N steps on the same mix
  (``scratch student``: the teacher's probabilities alone, without its weights). The share of the
  sparse model's gain a student keeps: (dense − student) / (dense − teacher), in held-out loss
  (``kept``, ``kept scratch``).

    python bench/dense_sparse.py                       # N = M = 300, seeds 0, 1, 2 (about 10 min on 2 cores)
    python bench/dense_sparse.py --steps 100 --seeds 0
    python bench/dense_sparse.py --steps 1500 --reuse    # keep the runs already finished in --out
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def moedsl(*args) -> None:
    res = subprocess.run([sys.executable, "-m", "moedsl", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"moedsl {' '.join(map(str, args))} failed:\n{res.stderr[-3000:]}")


REUSE = False  # --reuse: a run whose metrics.jsonl already ends at its last step with an evaluation is kept


def finished(out: Path, steps: int):
    """The held-out loss a finished run of ``steps`` steps in ``out`` recorded, else None."""
    try:
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return None
    return last.get("eval_loss") if last.get("step") == steps else None


def train(spec, out: Path, steps: int, seed: int, eval_batches: int, *extra) -> float:
    """A run of ``steps`` (its own schedule) on pystdlib: its last held-out loss (nats per byte)."""
    if REUSE and finished(out, steps) is not None:
        return finished(out, steps)
    moedsl("run", spec, "--data", "pystdlib", "--steps", steps, "--seed", seed, "--eval-every", steps,
           "--eval-batches", eval_batches, "--out", out, "--no-progress", "--overwrite", *extra)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if r.get("eval_loss") is not None][-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="N and M")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--out", default="runs/dense-sparse")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs in --out that already finished (an added column runs alone)")
    a = ap.parse_args(argv)
    global REUSE
    REUSE = a.reuse
    out, N = Path(a.out).resolve(), a.steps
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        r = {"seed": seed}
        dense = out / f"dense-{seed}"
        r["dense N"] = train(SPECS / "dense.yaml", dense, N, seed, a.eval_batches)
        # (a) dense continued: the step-N weights as an import-style folder, a fresh M-step run
        moedsl("distill-init", dense, "--dense", SPECS / "dense.yaml", "--out", out / f"dense-{seed}-init",
               "--overwrite")
        r["dense N+M"] = train(out / f"dense-{seed}-init" / "spec.yaml", out / f"dense-cont-{seed}", N, seed,
                               a.eval_batches, "--init", out / f"dense-{seed}-init")
        # (b) upcycled at step N, M steps
        moedsl("upcycle", dense, "--experts", 8, "--k", 2, "--out", out / f"up-{seed}", "--overwrite")
        r["upcycled N+M"] = train(out / f"up-{seed}" / "spec.yaml", out / f"up-cont-{seed}", N, seed,
                                  a.eval_batches, "--init", out / f"up-{seed}")
        # distillation: the switch teacher, the student from its non-expert weights
        teacher = out / f"switch-{seed}"
        r["switch N"] = train(SPECS / "switch.yaml", teacher, N, seed, a.eval_batches)
        moedsl("distill-init", teacher, "--dense", SPECS / "dense.yaml", "--out", out / f"student-{seed}-init",
               "--overwrite")
        r["student N"] = train(out / f"student-{seed}-init" / "spec.yaml", out / f"student-{seed}", N, seed,
                               a.eval_batches, "--init", out / f"student-{seed}-init", "--distill-teacher", teacher,
                               "--distill-alpha", 0.25)
        # the control: the same initialisation trained on the labels alone (alpha 0), which says how
        # much of the student's gain is its start rather than the teacher's probabilities
        r["init only N"] = train(out / f"student-{seed}-init" / "spec.yaml", out / f"init-only-{seed}", N, seed,
                                 a.eval_batches, "--init", out / f"student-{seed}-init")
        # distillation alone: the dense spec from its own initialisation (no distill-init), trained N
        # steps on the same mix, against "dense N": what the teacher's probabilities are worth at equal
        # steps and equal compute in the student, without the teacher's weights
        r["scratch student N"] = train(SPECS / "dense.yaml", out / f"scratch-student-{seed}", N, seed,
                                       a.eval_batches, "--distill-teacher", teacher, "--distill-alpha", 0.25)
        r["kept"] = (r["dense N"] - r["student N"]) / (r["dense N"] - r["switch N"])
        r["kept scratch"] = (r["dense N"] - r["scratch student N"]) / (r["dense N"] - r["switch N"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    con = Console(width=120)
    cols = ["dense N", "dense N+M", "upcycled N+M", "switch N", "student N", "init only N", "scratch student N",
            "kept", "kept scratch"]
    t = Table(title=f"held-out loss (nats per byte) on pystdlib, N = M = {N} steps; kept = share of the switch "
                    "teacher's gain over dense the distilled student keeps")
    t.add_column("seed")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["seed"]), *(f"{r[c]:.4f}" if not c.startswith("kept") else f"{r[c]:.0%}" for c in cols))
    t.add_row("mean", *(f"{statistics.mean(r[c] for r in rows):.4f}" if not c.startswith("kept") else
                        f"{statistics.mean(r[c] for r in rows):.0%}" for c in cols))
    con.print(t)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
