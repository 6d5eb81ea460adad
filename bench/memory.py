"""Memory per rank of a training step under the scale settings (placement.shard, train.recompute,
train.micro_batches), measured on 1, 2 and 4 gloo processes (CPU) for a Mixtral-shaped spec,
beside the plan's figures and the unsharded run's step time.

Per setting and process count, on rank 0 (the ranks hold the same bytes within a shard's
rounding):
- parameters + gradients and optimizer state: counted from the rank's tensors
  (moedsl.runtime.memory.held_bytes: a DTensor's local piece, each storage once);
- peak activations: the bytes made in the forward (activations) and in the backward
  (temporaries: a recomputed layer's activations among them) live at the step's peak, from
  torch's MemTracker (moedsl.runtime.memory.step_peak);
- the plan's figures for the same rank, batch and settings (moedsl.compiler.memory_plan);
- the step time (median of --steps steps, rank 0), and its ratio to the unsharded run's.

A setting whose field the runtime does not build yet (RunOptions has no such field) is
reported as not runnable rather than measured as if it were the default.

    python bench/memory.py                                   # mixtral, 1, 2 and 4 processes
    python bench/memory.py --procs 2 --steps 3 --settings none/none/1,optimizer/none/1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from moedsl.nn import cpu_caps

ROOT = Path(__file__).resolve().parents[1]
# shard/recompute/micro-batches; the first is the baseline the others are compared with
SETTINGS = "none/none/1,optimizer/none/1,full/none/1,none/experts/1,none/layers/1,none/none/2"
FIELDS = {"shard": "shard", "recompute": "recompute", "micro_batches": "micro_batches"}  # RunOptions names


def parse_setting(text: str) -> tuple:
    shard, recompute, micro = text.split("/")
    return shard, recompute, int(micro)


def with_setting(data: dict, setting: tuple) -> dict:
    shard, recompute, micro = setting
    d = copy.deepcopy(data)
    d.setdefault("placement", {})["shard"] = shard
    d.setdefault("train", {}).update(recompute=recompute, micro_batches=micro)
    return d


def missing(setting: tuple) -> list:
    """The settings' fields, away from their default, that RunOptions does not carry yet."""
    from moedsl.runtime.train import RunOptions

    have = {f.name for f in fields(RunOptions)}
    shard, recompute, micro = setting
    away = {"shard": shard != "none", "recompute": recompute != "none", "micro_batches": micro != 1}
    return [name for name, on in away.items() if on and FIELDS[name] not in have]


def _worker(rank: int, world: int, configs: list, steps: int, batch: int, seq: int, threads: int):
    import moedsl
    from moedsl.compiler import compile_graph
    from moedsl.compiler.memory_plan import Settings, is_expert
    from moedsl.compiler.plan import make_plan
    from moedsl.runtime.memory import held_bytes, step_peak
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(threads)
    out = []
    for data in configs:
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=steps, batch=batch, seq=seq, device="cpu", data="synthetic", seed=0,
                                 progress=False)
        t = Trainer(spec, o)
        times = []
        for step in range(steps + 2):  # two warm-up steps: the optimizer's state, the bucket order
            b = t.source.batch(step, batch, seq, rank, world)
            if world > 1:
                torch.distributed.barrier()
            s = time.perf_counter()
            t.step(b, o.lr)
            if step >= 2:
                times.append(time.perf_counter() - s)
        b = t.source.batch(steps + 2, batch, seq, rank, world)
        try:
            peak = step_peak(lambda: t.step(b, o.lr), t.model, t.opt).to_dict()
        except Exception as e:  # noqa: BLE001 - reported in the table: a tracker that cannot follow the tensors
            peak = {"error": f"{type(e).__name__}: {e}"}
        held = held_bytes(t.model, t.opt).to_dict()
        held["dense_optimizer"] = held_bytes(t.model, t.opt, where=lambda n: not is_expert(n)).optimizer
        t.sync.close()
        plan = make_plan(spec, compile_graph(spec, rank, world, device="meta", batch=(batch, seq), target="cpu"),
                         Settings.of(spec))
        out.append(dict(held=held, peak=peak, step=statistics.median(times),
                        plan=dict(params_grads=plan.memory_params + plan.memory_grads,
                                  optimizer=plan.memory_optimizer, activations=plan.memory_activations)))
    return out


def _mib(n) -> str:
    return f"{n / 2**20:.2f}"


def main(argv=None) -> int:
    from moedsl.runtime.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="mixtral")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--settings", default=SETTINGS, help="shard/recompute/micro-batches, comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    a = ap.parse_args(argv)
    data = yaml.safe_load((ROOT / "specs" / f"{a.spec}.yaml").read_text())
    settings = [parse_setting(s) for s in a.settings.split(",")]
    runnable = [s for s in settings if not missing(s)]
    print(f"{a.spec}, global batch {a.batch} × {a.seq}, float32, {a.threads} torch thread(s) per process, "
          f"{a.steps} timed steps (median, rank 0); bytes of rank 0 in MiB, measured (plan); {cpu_caps.describe()}\n")
    print("| procs | shard | recompute | micro | params + grads | optimizer | peak activations + temporaries | "
          "step ms | step / unsharded |")
    print("|---|---|---|---|---|---|---|---|---|")
    targets = []
    for world in map(int, a.procs.split(",")):
        configs = [with_setting(data, s) for s in runnable]
        res = spawn(_worker, world, configs, a.steps, a.batch, a.seq, a.threads, timeout=1200) if world > 1 else \
            [_worker(0, 1, configs, a.steps, a.batch, a.seq, a.threads)]
        base = res[0][0]["step"] if runnable and runnable[0] == settings[0] else None
        for s in settings:
            if s not in runnable:
                print(f"| {world} | {s[0]} | {s[1]} | {s[2]} | not runnable on this branch: RunOptions has no "
                      f"{', '.join(missing(s))} | | | | |")
                continue
            r = res[0][runnable.index(s)]
            h, p, pk = r["held"], r["plan"], r["peak"]
            act = "n/a: " + pk["error"] if "error" in pk else \
                f"{_mib(pk['activations'])} + {_mib(pk['temporary'])} ({_mib(p['activations'])})"
            ratio = f"{r['step'] / base:.2f}" if base else "-"
            print(f"| {world} | {s[0]} | {s[1]} | {s[2]} | {_mib(h['params'] + h['grads'])} ({_mib(p['params_grads'])}) "
                  f"| {_mib(h['optimizer'])} ({_mib(p['optimizer'])}) | {act} | {r['step'] * 1e3:.1f} | {ratio} |")
        targets.extend(_targets(world, settings, runnable, res[0]))
    print()
    for line in targets or ["targets: the settings they compare (optimizer, recompute experts) are not runnable yet"]:
        print(line)
    return 0


def _targets(world: int, settings: list, runnable: list, res: list) -> list:
    """The issue's targets, as measured: ``optimizer`` holds about 1/N of the optimizer state per rank;
    ``recompute: experts`` lowers the peak activations by at least the experts' share (the plan's)."""
    def of(setting):
        return res[runnable.index(setting)] if setting in runnable else None

    base, opt, experts = of(settings[0]), of(("optimizer", "none", 1)), of(("none", "experts", 1))
    out = []
    if base and opt and world > 1:
        share = opt["held"]["dense_optimizer"] / base["held"]["dense_optimizer"]
        out.append(f"{world} procs: optimizer holds {share:.3f} of the unsharded dense optimizer state per rank "
                   f"(target about 1/{world} = {1 / world:.3f})")
    if base and experts and "error" not in base["peak"] and "error" not in experts["peak"]:
        def peak(r):
            return r["peak"]["activations"] + r["peak"]["temporary"]

        drop = 1 - peak(experts) / peak(base)
        planned = 1 - experts["plan"]["activations"] / base["plan"]["activations"]
        out.append(f"{world} procs: recompute experts lowers peak activations by {drop:.1%} (the plan: {planned:.1%})")
    return out


if __name__ == "__main__":
    sys.exit(main())
