"""Training steps with the gradient sync after backward against bucketed (all-reduces launched
from backward hooks), on 2 gloo processes (CPU): step time, the seconds a step is blocked in
collectives (Traffic.wait_s: the sync's waits, the all-to-alls, the clip's and the balancing
loads' all-reduces) and the seconds of the sync's own call after backward.

Every configuration is built once in the same processes and their steps are interleaved
(A, B, C, A, B, C, ...), so a machine's load changes touch all of them alike; medians.

    python bench/grad_sync.py                                  # mixtral, experts sharded and replicated
    python bench/grad_sync.py --specs switch --steps 30 --buckets 0.25,1,25
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from moedsl.nn import cpu_caps

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"sharded": None, "expert-dp": {"expert_parallel": 1, "data_parallel": 2}}


class _TimedSync:
    """The step's GradSync, its call (what is left of the sync after backward) timed."""

    def __init__(self, sync):
        self.sync, self.seconds = sync, 0.0

    def start(self):
        self.sync.start()

    def clip(self, *a, **k):
        return self.sync.clip(*a, **k)

    def __call__(self):
        t = time.perf_counter()
        self.sync()
        self.seconds += time.perf_counter() - t


def _worker(rank: int, world: int, configs: list, steps: int, batch: int, seq: int, threads: int):
    import moedsl
    from moedsl.compiler.collectives import Traffic
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(threads)
    trainers = []
    for data, mode, mb in configs:
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=steps, batch=batch, seq=seq, device="cpu", data="synthetic", seed=0,
                                 progress=False, grad_sync=mode, bucket_mb=mb)
        t = Trainer(spec, o)
        t.train_step.sync = _TimedSync(t.sync)
        trainers.append(t)
    res = [dict(step=[], wait=[], sync=[]) for _ in configs]
    for step in range(steps + 3):  # three warm-up steps (the first one agrees on the bucket order)
        for i, t in enumerate(trainers):
            b = t.source.batch(step, batch, seq, rank, world)
            torch.distributed.barrier()
            Traffic.reset()
            t.train_step.sync.seconds = 0.0
            s = time.perf_counter()
            t.step(b, t.options.lr)
            torch.distributed.barrier()
            if step >= 3:
                res[i]["step"].append(time.perf_counter() - s)
                res[i]["wait"].append(Traffic.wait_s)
                res[i]["sync"].append(t.train_step.sync.seconds)
    return res


def main(argv=None) -> int:
    from moedsl.runtime.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="mixtral")
    ap.add_argument("--meshes", default="sharded,expert-dp")
    ap.add_argument("--buckets", default="0.25,1,4,25", help="bucket sizes (MiB) of the bucketed mode")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--bucketed-first", action="store_true", help="in each round, the bucketed steps first")
    a = ap.parse_args(argv)
    configs, names = [], []
    for name in a.specs.split(","):
        for mesh in a.meshes.split(","):
            data = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
            if MESHES[mesh]:
                data = copy.deepcopy(data)
                data["placement"] = MESHES[mesh]
            these = [((data, "after_backward", 25.0), (name, mesh, "after_backward", "-"))]
            these += [((data, "bucketed", float(mb)), (name, mesh, "bucketed", mb)) for mb in a.buckets.split(",")]
            for config, label in (these[1:] + these[:1]) if a.bucketed_first else these:
                configs.append(config)
                names.append(label)
    res = spawn(_worker, 2, configs, a.steps, a.batch, a.seq, a.threads, timeout=600)
    print(f"2 gloo processes, {a.threads} torch thread(s) each, batch {a.batch} × {a.seq}, "
          f"{a.steps} steps per configuration, interleaved; medians (rank 0; wait and sync: max over ranks); "
          f"{cpu_caps.describe()}\n")
    print("| spec | experts | sync | bucket MiB | step ms | Traffic.wait_s ms / step | sync call ms / step |")
    print("|---|---|---|---|---|---|---|")
    for i, (name, mesh, mode, mb) in enumerate(names):
        step = statistics.median(res[0][i]["step"])
        wait = max(statistics.median(r[i]["wait"]) for r in res)
        sync = max(statistics.median(r[i]["sync"]) for r in res)
        print(f"| {name} | {mesh} | {mode} | {mb} | {step * 1e3:.1f} | {wait * 1e3:.1f} | {sync * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
