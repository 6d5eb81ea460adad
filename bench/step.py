"""Training steps of the example specs: tokens/s on one process and on 2 and 4 gloo processes
(CPU), and the bytes the all-to-alls moved per step against what the plan predicted; on a GPU,
eager against CUDA-graph replay, and the MoE layer against the grouped-GEMM bound in bfloat16.

    python bench/step.py                        # CPU: switch, mixtral, expert-choice
    python bench/step.py --specs switch --steps 20
    python bench/step.py --cuda                 # the GPU section (needs a CUDA device)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from moedsl.nn import cpu_caps

ROOT = Path(__file__).resolve().parents[1]


def _cpu_worker(rank: int, world: int, spec_path: str, steps: int, batch: int, seq: int, layout: str):
    import moedsl
    from moedsl.compiler.collectives import Traffic
    from moedsl.compiler.plan import make_plan
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(max(1, 2 // world))
    spec = moedsl.load_spec(spec_path)
    o = RunOptions.from_spec(spec, steps=steps, batch=batch, seq=seq, device="cpu", data="synthetic", seed=0,
                             progress=False)
    trainer = Trainer(spec, o, layout=layout)  # keeps freed memory on a CPU, as `moedsl run` does
    times, sent = [], []
    for step in range(steps + 2):  # two warm-up steps
        b = trainer.source.batch(step, batch, seq, rank, world)
        Traffic.reset()
        t = time.perf_counter()
        trainer.step(b, o.lr)
        if world > 1:
            torch.distributed.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t)
            sent.append(Traffic.sent)
    plan = make_plan(spec, trainer.model.compiled)
    predicted = sum(plan.a2a_send_bytes.values())  # all-to-alls only (Traffic counts those)
    return dict(step_s=statistics.median(times), sent=statistics.mean(sent), predicted=predicted,
                layouts=sorted({f"{c.scope}/{c.layout}" for c in trainer.model.compiled.comms.values()}))


def cpu(specs, steps, batch, seq):
    from moedsl.runtime.spawn import spawn

    print("all-to-all payload sent per rank per step (forward + backward) against the plan's prediction, "
          "which is exact for static layers and assumes balanced routing with nothing dropped otherwise; "
          f"{cpu_caps.describe()}\n")
    print("| spec | processes | layout | step ms | tokens/s | a2a sent / rank / step | plan predicted | measured / plan |")
    print("|---|---|---|---|---|---|---|---|")
    for name in specs:
        path = str(ROOT / "specs" / f"{name}.yaml")
        for world in (1, 2, 4):
            for layout in (("grouped", "static") if world > 1 else ("grouped",)):
                if world == 1:
                    r = _cpu_worker(0, 1, path, steps, batch, seq, layout)
                else:
                    res = spawn(_cpu_worker, world, path, steps, batch, seq, layout)
                    r = res[0]
                    r["step_s"] = max(x["step_s"] for x in res)
                ratio = f"{r['sent'] / r['predicted']:.2f}" if r["predicted"] else "-"
                print(f"| {name} | {world} | {layout} ({', '.join(r['layouts'])}) | {r['step_s'] * 1e3:.1f} | "
                      f"{batch * seq / r['step_s']:,.0f} | {r['sent'] / 2**20:.2f} MiB | "
                      f"{r['predicted'] / 2**20:.2f} MiB | {ratio} |", flush=True)


def cuda(specs, steps, batch, seq):
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU section (eager vs CUDA-graph replay, bf16 layer vs bound) is skipped")
        return
    import moedsl
    from moedsl.runtime.train import RunOptions, Trainer

    print(f"\n{torch.cuda.get_device_name()}: training step, eager vs CUDA-graph replay (batch {batch} × {seq}); "
          f"host {cpu_caps.describe()}")
    print("| spec | dtype | eager ms | graph replay ms | speed-up |")
    print("|---|---|---|---|---|")
    for name in specs:
        spec = moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")
        res = {}
        for graphs in (False, True):
            o = RunOptions.from_spec(spec, steps=steps, batch=batch, seq=seq, device="cuda", data="synthetic", seed=0,
                                     cuda_graphs="auto" if graphs else "off", progress=False)
            trainer = Trainer(spec, o, layout="static")
            ts = []
            for i in range(steps + 3):
                b = trainer.source.batch(i, batch, seq)
                torch.cuda.synchronize()
                t = time.perf_counter()
                trainer.step(b, o.lr)
                torch.cuda.synchronize()
                if i >= 3:
                    ts.append(time.perf_counter() - t)
            res[graphs] = statistics.median(ts) if trainer.captured == graphs else float("nan")  # nan: not capturable
        print(f"| {name} | {spec.model.dtype} | {res[False] * 1e3:.2f} | {res[True] * 1e3:.2f} | "
              f"{res[False] / res[True]:.2f}× |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="switch,mixtral,expert-choice")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--cuda", action="store_true", help="only the GPU section")
    a = ap.parse_args(argv)
    specs = a.specs.split(",")
    if not a.cuda:
        cpu(specs, a.steps, a.batch, a.seq)
    cuda(specs, a.steps, a.batch, a.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
