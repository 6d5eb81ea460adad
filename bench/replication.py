"""Hot experts under Zipf-skewed routing: the expert-parallel step without replicas and with the
placement each policy computes (EPLB; FasterMoE's shadowing), measured on 4 gloo processes (CPU)
and modelled at 4, 64 and 2,048 ranks by the plan's cost model (compiler/replication.py).

Routing is a hash gate whose token → expert table gives expert i (by load rank) a Zipf share
1/i^s of the vocabulary; each rank's batch holds every token id equally often, so the loads are
exact: the hottest expert carries 1×, 2×, 4× and 8× the mean. Which expert ids are hot is a
fixed random permutation (hot experts are not neighbours, whom a contiguous placement would put
on one rank). Each layer has E = 4 experts per rank and, with a policy, R = one redundant slot
per rank; a policy's placement runs as ``placement.replication`` with the policy's default
dispatch (eplb ``position``: each source splits its rows of an expert evenly over the copies;
shadow ``nearest``: a source with a copy computes its own rows; compiler/passes/placement.py), the placement fixed from the start (a policy callable returning
it; no migration).

Measured (4 processes): each rank's expert rows per step (a hook on the experts module), the
balancedness (mean/max), the step time (all configurations built once in the same processes,
their steps interleaved; medians, max over ranks) and the all-to-all bytes a rank sends
(``Traffic.sent``, max over ranks). The model's figures for the same placements and loads sit
beside them: it is calibrated in the same processes (the experts' GEMMs' FLOP/s, gloo's
all-to-all latency and bandwidth) and prices the MoE layer only; "predicted step" adds the rest of the step,
measured once (1×, no replicas) as measured step − modelled layer.

    python bench/replication.py                 # 1 to 3 minutes on 2 cores
    python bench/replication.py --steps 4 --skip-simulated
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from moedsl.compiler.replication import LayerCost, balancedness, model_step, place
from moedsl.nn import cpu_caps
from moedsl.spec import Replication

SKEWS = (1.0, 2.0, 4.0, 8.0)  # the hottest expert's load over the mean
POLICIES = ("none", "eplb", "shadow")
WORLD, PER_RANK = 4, 4  # ranks; logical experts per rank
TARGET_BALANCE, TARGET_SPEEDUP = 0.9, 1.10


def dispatch_of(policy: str) -> str:
    """The dispatch a run of ``policy`` uses by default (placement.replication without ``dispatch``)."""
    return "position" if policy == "none" else Replication(policy=policy).dispatch


def zipf_exponent(E: int, ratio: float) -> float:
    """s with E · p_1 = ratio, p_i ∝ 1 / i^s (bisection: E · p_1 rises with s)."""
    lo, hi = 0.0, 8.0
    for _ in range(60):
        s = (lo + hi) / 2
        if E / sum(1.0 / (i + 1) ** s for i in range(E)) < ratio:
            lo = s
        else:
            hi = s
    return (lo + hi) / 2


def zipf_load(E: int, ratio: float, tokens: float, seed: int = 0) -> list:
    """Tokens per expert: Zipf shares over a fixed random permutation of the expert ids."""
    s = zipf_exponent(E, ratio)
    w = [1.0 / (i + 1) ** s for i in range(E)]
    ids = list(range(E))
    random.Random(seed).shuffle(ids)
    load = [0.0] * E
    for rank_by_load, e in enumerate(ids):
        load[e] = w[rank_by_load] / sum(w) * tokens
    return load


def hash_table(vocab: int, E: int, ratio: float) -> torch.Tensor:
    """[vocab] token → expert with Zipf counts (largest remainders, so they sum to vocab)."""
    load = zipf_load(E, ratio, float(vocab))
    counts = [int(x) for x in load]
    for e in sorted(range(E), key=lambda e: load[e] - counts[e], reverse=True)[:vocab - sum(counts)]:
        counts[e] += 1
    table = torch.cat([torch.full((n,), e, dtype=torch.int64) for e, n in enumerate(counts)])
    return table[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]


def spec_data(E: int, d: int, hidden: int, vocab: int, batch: int, seq: int, policy: str) -> dict:
    placement = {"mesh": {"nodes": 1, "devices_per_node": WORLD}}
    if policy != "none":  # E + R slots; the worker's policy callable puts the bench's placement in them
        placement["replication"] = {"policy": policy, "redundant": WORLD, "window": 1, "every": 2**30}
    return {"moedsl": 1, "name": "hot-experts", "model": {"vocab_size": vocab, "d_model": d, "max_seq_len": seq},
            "layers": [{"embedding": {}},
                       {"moe": {"experts": {"count": E, "hidden": hidden, "activation": "relu"},
                                "gate": {"type": "hash"}}},
                       {"norm": {}}, {"head": {}}],
            "placement": placement, "train": {"batch_size": batch * WORLD, "seq_len": seq, "lr": 1e-3}}


def _calibrate(rank: int, world: int, d: int, hidden: int, rows: int) -> dict:
    """The experts' GEMMs' FLOP/s (forward + backward of PER_RANK experts over ``rows`` rows) and
    gloo's all-to-all bandwidth, all ranks at once (the contention of the run itself)."""
    import torch.distributed as dist

    from moedsl.nn.experts import Experts

    torch.set_num_threads(1)
    ex = Experts(d, hidden, "relu", list(range(PER_RANK)), seed=0)
    x = torch.randn(rows, d, requires_grad=True)
    sizes = torch.full((PER_RANK,), rows // PER_RANK, dtype=torch.int64)
    ts = []
    for i in range(6):
        t = time.perf_counter()
        ex(x, sizes).sum().backward()
        if i >= 1:
            ts.append(time.perf_counter() - t)
    flops = 3 * 2 * (2 * d * hidden) * rows / statistics.median(ts)

    def a2a(n: int) -> float:  # seconds of an all-to-all of n rows to each rank
        buf = torch.randn(world * n, d)
        out = torch.empty_like(buf)
        ts = []
        for i in range(8):
            dist.barrier()
            t = time.perf_counter()
            dist.all_to_all_single(out, buf)
            if i >= 2:
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    small, large = a2a(1), a2a(rows // world)  # latency, then latency + bytes / bandwidth
    sent = (rows // world - 1) * d * 4 * (world - 1)
    return {"flops": flops, "latency": small, "bandwidth": sent / max(large - small, 1e-9)}


def _worker(rank: int, world: int, configs: list, steps: int, batch: int, seq: int, vocab: int) -> list:
    import moedsl
    from moedsl.compiler.collectives import Traffic
    from moedsl.nn.experts import Experts
    from moedsl.nn.gates import HashGate
    from moedsl.runtime.data import Batch
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(1)
    trainers, rows = [], []
    for data, table, phy2log in configs:
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=steps, batch=batch * world, seq=seq, device="cpu", data="synthetic",
                                 seed=0, progress=False)
        t = Trainer(spec, o, policy=None if phy2log is None else lambda load, info, p=phy2log: p)
        count = [0]
        for m in t.model.modules():
            if isinstance(m, HashGate):
                m.table.copy_(table)
            if isinstance(m, Experts):  # rows this rank's experts compute (forward)
                m.register_forward_pre_hook(lambda mod, a, c=count: c.__setitem__(0, c[0] + a[0].shape[0]))
        trainers.append(t)
        rows.append(count)
    res = [dict(step=[], sent=[], rows=[]) for _ in configs]
    per_rank = batch * seq
    for step in range(steps + 2):  # two warm-up steps
        g = torch.Generator().manual_seed(1000 * step + rank)
        # every token id equally often in each rank's batch: the loads are exactly the table's
        ids = torch.cat([torch.randperm(vocab, generator=g) for _ in range(-(-per_rank // vocab))])[:per_rank]
        inputs = ids.view(batch, seq)
        b = Batch(inputs, torch.roll(inputs, -1, dims=1))
        for i, t in enumerate(trainers):
            rows[i][0] = 0
            seconds, sent = _timed(t, b, Traffic)
            if step >= 2:
                for key, value in (("step", seconds), ("sent", sent), ("rows", rows[i][0])):
                    res[i][key].append(value)
    return res


def _timed(trainer, batch, traffic) -> tuple:
    """One training step between barriers: its seconds (the slowest rank's) and this rank's
    all-to-all bytes."""
    torch.distributed.barrier()
    traffic.reset()
    start = time.perf_counter()
    trainer.step(batch, trainer.options.lr)
    torch.distributed.barrier()
    return time.perf_counter() - start, traffic.sent


def measured(args) -> None:
    from moedsl.runtime.spawn import spawn

    E, tokens = WORLD * PER_RANK, args.batch * args.seq  # tokens per rank per step (k = 1)
    cal = spawn(_calibrate, WORLD, args.d, args.hidden, tokens, timeout=600)
    flops = min(c["flops"] for c in cal)
    bandwidth = min(c["bandwidth"] for c in cal)
    latency = max(c["latency"] for c in cal)
    cost = LayerCost(flops_per_assignment=3 * 2 * (2 * args.d * args.hidden), row_bytes=4 * args.d,
                     grad_bytes=4 * 2 * args.d * args.hidden, device_flops=flops, intra_node_bandwidth=bandwidth,
                     inter_node_bandwidth=bandwidth, devices_per_node=WORLD, latency_s=latency)
    configs, rows = [], []
    for ratio in SKEWS:
        table = hash_table(args.vocab, E, ratio)
        counts = torch.bincount(table, minlength=E)
        exact = (counts.double() / args.vocab * tokens * WORLD).tolist()  # per step, all ranks
        # each source's rows of each expert: whole counts where every token id appears equally often in
        # a rank's batch, which the model splits over the copies exactly as position dispatch does
        per_source = (counts * tokens // args.vocab).tolist() if tokens % args.vocab == 0 else \
            [x / WORLD for x in exact]
        for policy in POLICIES:
            phy2log = None if policy == "none" else place(Replication(policy=policy, redundant=WORLD, window=1),
                                                          exact, WORLD, 1, None, cost)
            configs.append((spec_data(E, args.d, args.hidden, args.vocab, args.batch, args.seq, policy), table,
                            phy2log))
            model = model_step(phy2log or tuple(range(E)), [per_source] * WORLD, WORLD, cost, dispatch_of(policy))
            rows.append(dict(ratio=ratio, hot=max(exact) / (sum(exact) / E), policy=policy, model=model,
                             copies=WORLD * PER_RANK + (WORLD if phy2log else 0)))
    res = spawn(_worker, WORLD, configs, args.steps, args.batch, args.seq, args.vocab, timeout=1200)
    for i, r in enumerate(rows):
        r["step_s"] = max(statistics.median(x[i]["step"]) for x in res)
        r["sent"] = max(statistics.mean(x[i]["sent"]) for x in res)
        r["rank_rows"] = [statistics.mean(x[i]["rows"]) for x in res]
    rest = rows[0]["step_s"] - rows[0]["model"].total_s  # the step outside the MoE layer (1×, no replicas)
    if (os.cpu_count() or 1) < WORLD:
        print(f"\nNOTE: {os.cpu_count()} cores for {WORLD} processes: ranks share cores, so a step's time follows "
              f"the work of all ranks together, not the busiest rank's; the speed-ups below understate what "
              f"{WORLD} devices would show")
    print(f"\n## Measured: {WORLD} gloo processes (1 torch thread each), E = {E} experts ({PER_RANK} per rank), "
          f"d = {args.d}, hidden {args.hidden}, batch {args.batch} × {args.seq} tokens per rank, hash routing "
          f"(k = 1, dropless), {args.steps} steps per configuration interleaved; {cpu_caps.describe()}")
    print(f"calibrated in the same processes: expert GEMMs {flops / 1e9:.1f} GFLOP/s per rank, gloo all-to-all "
          f"{bandwidth / 1e9:.2f} GB/s per rank after {latency * 1e3:.2f} ms per collective; the rest of the step "
          f"(embedding, head, router, optimizer, non-expert gradient sum) {rest * 1e3:.1f} ms, measured at 1× "
          f"without replicas\n")
    print("| hottest / mean | policy | rows per rank (measured) | balancedness measured | predicted | "
          "step ms measured | predicted | speed-up measured | predicted | a2a sent, busiest rank, measured | "
          "predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        if r["policy"] == "none":
            base[r["ratio"]] = r
        b = base[r["ratio"]]
        pred = rest + r["model"].total_s
        pred_base = rest + b["model"].total_s
        print(f"| {r['hot']:.1f}× | {r['policy']} | {' / '.join(f'{x:.0f}' for x in r['rank_rows'])} | "
              f"{balancedness(r['rank_rows']):.3f} | {r['model'].balancedness:.3f} | {r['step_s'] * 1e3:.0f} | "
              f"{pred * 1e3:.0f} | {b['step_s'] / r['step_s']:.2f}× | {pred_base / pred:.2f}× | "
              f"{r['sent'] / 2**20:.2f} MiB | {max(r['model'].sent_bytes) / 2**20:.2f} MiB |", flush=True)
    targets(rows, lambda r: balancedness(r["rank_rows"]), lambda r, b: b["step_s"] / r["step_s"], "measured")


def targets(rows: list, balance, speedup, what: str) -> None:
    """One line per policy: the rows that meet the issue's targets, and the skews of those that do not."""
    base = {r["ratio"]: r for r in rows if r["policy"] == "none"}

    def missed(rs):
        skews = ", ".join(f"{r['hot']:.1f}×" for r in rs)
        return f" (not at {skews})" if rs else ""

    for policy in POLICIES[1:]:
        these = [r for r in rows if r["policy"] == policy]
        skewed = [r for r in these if r["ratio"] >= 2]
        bal = [r for r in these if balance(r) < TARGET_BALANCE]
        slow = [r for r in skewed if speedup(r, base[r["ratio"]]) < TARGET_SPEEDUP]
        print(f"{what}, {policy}: balancedness ≥ {TARGET_BALANCE} in {len(these) - len(bal)} of {len(these)} "
              f"rows{missed(bal)}; ≥ {TARGET_SPEEDUP:.2f}× faster at ≥ 2× skew in {len(skewed) - len(slow)} of "
              f"{len(skewed)}{missed(slow)}")


def simulated(args) -> None:
    """The cost model alone at 64 and 2,048 ranks: nodes of 8 devices with the spec defaults'
    figures (placement.hardware), a DeepSeek-V3-sized expert (d 7168, SwiGLU hidden 2048,
    bfloat16 rows), 16,384 assignments per rank per step, the load split evenly over sources."""
    from moedsl.spec import Hardware

    hw = Hardware()
    d, h = 7168, 2048
    per = 3 * d * h
    cost = LayerCost(flops_per_assignment=6 * per, row_bytes=2 * d, grad_bytes=4 * per, device_flops=hw.device_flops,
                     intra_node_bandwidth=hw.intra_node_bandwidth, inter_node_bandwidth=hw.inter_node_bandwidth,
                     devices_per_node=8)
    print(f"\n## Modelled: nodes of 8 devices at the placement.hardware defaults ({hw.device_flops / 1e12:.0f} "
          f"TFLOP/s, {hw.intra_node_bandwidth / 1e9:.0f} GB/s in a node, {hw.inter_node_bandwidth / 1e9:.0f} GB/s "
          f"across), expert d = {d}, SwiGLU hidden {h}, bf16 rows, {PER_RANK} experts + 1 redundant slot per rank, "
          f"16,384 assignments per rank per step, EPLB global (no expert groups), each policy's default "
          "dispatch (eplb: position, shadow: nearest)\n")
    print("| ranks | hottest / mean | policy | balancedness | layer step ms | compute | all-to-all | replica grads | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for P in (64, 2048):
        E = P * PER_RANK
        rows = []
        for ratio in SKEWS:
            load = zipf_load(E, ratio, 16384.0 * P)
            for policy in POLICIES:
                t = time.perf_counter()
                phy2log = tuple(range(E)) if policy == "none" else \
                    place(Replication(policy=policy, redundant=P, window=1), load, P, P // 8, None, cost)
                m = model_step(phy2log, load, P, cost, dispatch_of(policy))
                rows.append(dict(ratio=ratio, hot=max(load) / (sum(load) / E), policy=policy, model=m,
                                 place_s=time.perf_counter() - t))
        base = {r["ratio"]: r for r in rows if r["policy"] == "none"}
        for r in rows:
            m, b = r["model"], base[r["ratio"]]["model"]
            print(f"| {P} | {r['hot']:.1f}× | {r['policy']} | {m.balancedness:.3f} | {m.total_s * 1e3:.2f} | "
                  f"{m.compute_s * 1e3:.2f} | {m.all_to_all_s * 1e3:.2f} | {m.sync_s * 1e3:.2f} | "
                  f"{b.total_s / m.total_s:.2f}× |", flush=True)
        targets(rows, lambda r: r["model"].balancedness, lambda r, b: b["model"].total_s / r["model"].total_s,
                f"{P} ranks, modelled")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--skip-simulated", action="store_true")
    a = ap.parse_args(argv)
    if not a.skip_measured:
        measured(a)
    if not a.skip_simulated:
        simulated(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
