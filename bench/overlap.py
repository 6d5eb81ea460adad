"""Training step time and the seconds a rank blocks in collectives (``Traffic.wait_s``) per step,
for an MoE spec with its layers' ``overlap.chunks`` = 1 (no pipelining) against D > 1, on 2 gloo
processes (CPU, 1 thread each). The variants step in turn (interleaved), so a load that comes and
goes on a shared machine falls on all of them alike; the figures are medians.

    python bench/overlap.py                                    # specs/mixtral.yaml, D = 1, 2, 4
    python bench/overlap.py --d-model 256 --hidden 768 --batch 32 --rounds 15
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from moedsl.nn import cpu_caps

ROOT = Path(__file__).resolve().parents[1]


def variant(data: dict, chunks: int, d_model, hidden, groups) -> dict:
    d = copy.deepcopy(data)
    d["name"] = f"{d['name']}-overlap-{chunks}"
    if d_model:
        d["model"]["d_model"] = d_model

    def visit(items):
        for item in items:
            visit(item.get("block", []) + item.get("cycle", []))
            moe = item.get("moe")
            if moe is not None:
                moe["overlap"] = {"chunks": chunks}
                if hidden:
                    moe["experts"]["hidden"] = hidden
                if groups:
                    moe["gate"]["routing_groups"] = groups

    visit(d["layers"])
    return d


def _worker(rank: int, world: int, datas: list, rounds: int, batch: int, seq: int):
    import moedsl
    from moedsl.compiler.collectives import Traffic
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(1)
    trainers = []
    for data in datas:
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=rounds, batch=batch, seq=seq, device="cpu", data="synthetic", seed=0,
                                 progress=False)
        trainers.append((Trainer(spec, o), o))
    step_s = [[] for _ in datas]
    wait_s = [[] for _ in datas]
    for step in range(rounds + 2):  # two warm-up rounds
        order = range(len(datas)) if step % 2 == 0 else reversed(range(len(datas)))
        for i in order:
            trainer, o = trainers[i]
            b = trainer.source.batch(step, batch, seq, rank, world)
            torch.distributed.barrier()
            Traffic.reset()
            t = time.perf_counter()
            trainer.step(b, o.lr)
            torch.distributed.barrier()
            if step >= 2:
                step_s[i].append(time.perf_counter() - t)
                wait_s[i].append(Traffic.wait_s)
    return [dict(step_s=statistics.median(s), wait_s=statistics.median(w), step_all=s, wait_all=w)
            for s, w in zip(step_s, wait_s)]


def main(argv=None) -> int:
    import yaml

    from moedsl.runtime.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "mixtral.yaml"))
    ap.add_argument("--chunks", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the spec's)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None, help="experts.hidden of every MoE layer")
    ap.add_argument("--routing-groups", type=int, default=None)
    args = ap.parse_args(argv)
    data = yaml.safe_load(Path(args.spec).read_text())
    chunks = [int(c) for c in args.chunks.split(",")]
    datas = [variant(data, d, args.d_model, args.hidden, args.routing_groups) for d in chunks]
    batch = args.batch or data["train"]["batch_size"]
    seq = args.seq or data["train"]["seq_len"]
    res = spawn(_worker, 2, datas, args.rounds, batch, seq, timeout=1200.0)
    print(f"{Path(args.spec).name}: batch {batch} × {seq}, d_model {datas[0]['model']['d_model']}, 2 gloo processes, "
          f"1 thread each, {args.rounds} interleaved rounds (medians; step: the slower rank's); "
          f"{cpu_caps.describe()}\n")
    print("| chunks | step ms | wait ms / step (rank 0, rank 1) | step vs D=1 |")
    print("|---|---|---|---|")
    base = max(r[0]["step_s"] for r in res)
    for i, d in enumerate(chunks):
        step = max(r[i]["step_s"] for r in res)
        waits = ", ".join(f"{r[i]['wait_s'] * 1e3:.1f}" for r in res)
        print(f"| {d} | {step * 1e3:.1f} | {waits} | {step / base:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
