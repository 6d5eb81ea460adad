"""The plan's training memory per rank (compiler/memory_plan.py) against what a rank holds and
keeps, measured (runtime/memory.py); shard modes, recomputation and micro-batches in its
figures; ``moedsl plan --device-memory``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import moedsl
from moedsl import dtypes
from moedsl.cli import main
from moedsl.compiler import compile_graph
from moedsl.compiler.memory_plan import Settings, fit, is_expert, rank_memory
from moedsl.compiler.plan import human_bytes, make_plan
from moedsl.kinds import layer_kind
from moedsl.runtime.spawn import spawn

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def spec_data(name: str, **placement) -> dict:
    d = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
    d.setdefault("placement", {}).update(placement)
    return d


def _held_worker(rank: int, world: int, data: dict, batch: tuple):
    """One training step of the run's own step (TrainStep.for_run) on this rank; then the bytes its
    tensors hold, and the plan of this rank's graph."""
    from moedsl.runtime.memory import held_bytes
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    torch.set_num_threads(1)
    spec = moedsl.load_spec(data)
    model = moedsl.build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32)
    step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), rank, world, amp=None, capturable=False)
    step.lr.fill_(1e-3)
    B, T = batch
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, spec.model.vocab_size, (B // world, T), generator=g)
    try:
        step(x, torch.roll(x, -1, 1))
    finally:
        step.sync.close()
    held = held_bytes(model, step.opt)
    plan = make_plan(spec, compile_graph(spec, rank, world, device="meta", batch=batch, target="cpu"))
    return held.to_dict(), {"params": plan.memory_params, "grads": plan.memory_grads,
                            "optimizer": plan.memory_optimizer}


# shard modes join the list as the runtime builds them (placement.shard: optimizer | full)
@pytest.mark.parametrize("shard", ["none"])
@pytest.mark.parametrize("world,placement", [(1, {}), (2, {}), (2, {"expert_parallel": 1, "data_parallel": 2})],
                         ids=["1", "2-expert-parallel", "2-data-parallel"])
def test_plan_per_rank_states_match_the_bytes_each_rank_holds(world, placement, shard):
    data = spec_data("mixtral", **placement, shard=shard)
    results = spawn(_held_worker, world, data, (8, 32)) if world > 1 else [_held_worker(0, 1, data, (8, 32))]
    for rank, (held, planned) in enumerate(results):
        for part in ("params", "grads", "optimizer"):
            assert held[part] == pytest.approx(planned[part], rel=0.05), (rank, part, held, planned)


def test_held_bytes_counts_each_storage_once():
    """A tied weight is one storage; gradients that are views of one flat buffer are that buffer."""
    from moedsl.runtime.memory import held_bytes

    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    m = torch.nn.ModuleDict(dict(emb=emb, head=head, norm=torch.nn.LayerNorm(4)))
    params = list(m.parameters())
    flat = torch.zeros(sum(p.numel() for p in params) + 3)  # 3 spare elements: the buffer is what is held
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    held = held_bytes(m)
    assert held.params == (10 * 4 + 4 + 4) * 4
    assert held.grads == flat.numel() * 4 and held.optimizer == 0
    norm = held_bytes(m, where=lambda name: name.startswith("norm."))  # the norm's weight and bias alone
    assert norm.params == (4 + 4) * 4


def _fsdp2_worker(rank: int, world: int):
    from torch.distributed.fsdp import fully_shard

    from moedsl.compiler.memory_plan import shard_numel
    from moedsl.runtime.memory import held_bytes

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 7))  # 7 rows: uneven pieces
    planned = 4 * sum(shard_numel(tuple(p.shape), world) for p in m.parameters())
    for layer in m:
        fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 16)).sum().backward()
    opt.step()
    kinds = {type(p).__name__ for p in m.parameters()}
    return kinds, held_bytes(m, opt).to_dict(), planned


def test_held_bytes_counts_fsdp2_pieces_as_the_plan_splits_them():
    """fully_shard on 2 gloo processes: each parameter, gradient and AdamW moment is a DTensor;
    a rank holds its local piece, which for rank 0 is the plan's ``shard_numel``."""
    (kinds0, held0, planned), (_, held1, _) = spawn(_fsdp2_worker, 2)
    assert kinds0 == {"DTensor"}
    assert held0["params"] == held0["grads"] == planned
    assert held0["optimizer"] == pytest.approx(2 * planned, abs=64)  # m, v and a step scalar per parameter
    assert held1["optimizer"] <= held0["optimizer"]  # rank 1's pieces are the shorter ones


@pytest.mark.parametrize("name,low,high", [("mixtral", 0.9, 1.1), ("deepseek-v3-small", 0.9, 1.1),
                                           ("switch", 1.0, 1.2)])
def test_activation_estimate_is_within_10_percent_of_the_measured_peak(name, low, high):
    """float32 on the CPU: the bytes the forward keeps for the backward, measured by torch's MemTracker
    at the step's peak, against the plan's estimate for the same batch. Switch's capacity drops
    tokens the plan counts (it assumes none dropped): there the plan is an upper bound."""
    from moedsl.runtime.memory import step_peak
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    torch.set_num_threads(1)
    spec = moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32)
    step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), 0, 1, amp=None, capturable=False)
    step.lr.fill_(1e-3)
    x = torch.randint(0, spec.model.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    step(x, x)  # the optimizer's state exists before the measured step
    peak = step_peak(lambda: step(x, x), model, step.opt)
    step.sync.close()
    plan = make_plan(spec, compile_graph(spec, 0, 1, device="meta", batch=(8, 32), target="cpu"))
    assert low <= plan.memory_activations / peak.activations <= high


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3-small"])
def test_recompute_experts_estimate_matches_a_step_that_checkpoints_each_experts_module(name):
    """The plan's ``recompute: experts`` figure (the rows kept, plus one layer's hidden rows made
    again in its backward) against a step whose experts modules run under torch.utils.checkpoint
    (non-reentrant): the activations and temporaries MemTracker finds live at its peak."""
    from torch.utils.checkpoint import checkpoint

    from moedsl.runtime.memory import step_peak
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    def checkpointed(forward):
        return lambda *a, **k: checkpoint(forward, *a, use_reentrant=False, **k)

    torch.set_num_threads(1)
    spec = moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32)
    wrapped = 0
    for info in spec.moe_layers:
        m = model.get_submodule(f"layers.{info.index}.experts")
        m.forward = checkpointed(m.forward)
        wrapped += 1
    assert wrapped == len(spec.moe_layers) > 0
    step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), 0, 1, amp=None, capturable=False)
    step.lr.fill_(1e-3)
    x = torch.randint(0, spec.model.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    step(x, x)
    peak = step_peak(lambda: step(x, x), model, step.opt)
    step.sync.close()
    c = compile_graph(spec, 0, 1, device="meta", batch=(8, 64), target="cpu")
    planned = make_plan(spec, c, Settings(recompute="experts")).memory_activations
    assert planned == pytest.approx(peak.activations + peak.temporary, rel=0.10)
    assert planned < make_plan(spec, c).memory_activations


def _meta(name: str, world: int, batch=None, **placement):
    s = moedsl.load_spec(spec_data(name, **placement))
    return s, compile_graph(s, 0, world, device="meta", batch=batch, target="cuda")


def test_optimizer_shard_holds_each_parameters_data_parallel_share_of_the_moments_and_full_of_everything():
    s, c = _meta("mixtral", 4, expert_parallel=2, data_parallel=2)  # experts split over 2 ranks, the rest over 4
    dense = sum(p.numel() for n, p in c.module.named_parameters() if not is_expert(n))
    experts = sum(p.numel() for n, p in c.module.named_parameters() if is_expert(n))
    none, opt, full = (rank_memory(s, c, Settings(shard=m)) for m in ("none", "optimizer", "full"))
    assert none.optimizer == 8 * (dense + experts) and none.params == 4 * (dense + experts)
    assert opt.optimizer == pytest.approx(8 * (dense / 4 + experts / 2), rel=0.01)
    assert (opt.params, opt.grads) == (none.params, none.grads)
    assert full.states == pytest.approx(16 * (dense / 4 + experts / 2), rel=0.01)
    assert full.working > 0  # the gathered layers


def test_recompute_and_micro_batches_lower_the_activations_the_plan_counts():
    s, c = _meta("mixtral-8x7b", 8)
    none = rank_memory(s, c, Settings())
    experts = rank_memory(s, c, Settings(recompute="experts"))
    layers = rank_memory(s, c, Settings(recompute="layers"))
    # SwiGLU experts of hidden 14336 keep 4 hidden rows per routed row: most of what a token keeps
    kind = layer_kind("moe")
    cfg = s.moe_layers[0].config
    hidden = 32 * cfg.experts_per_token * kind.expert_hidden(cfg, s.model)
    per_token_none = none.activations / (8 * 4096 * 2)  # the rank's 8 sequences × 4096 tokens, bfloat16
    assert experts.activations / (8 * 4096 * 2) == pytest.approx(per_token_none - hidden * 31 / 32, rel=1e-6)
    assert layers.activations < experts.activations < none.activations
    assert 0 < experts.extra_flops < layers.extra_flops <= 1 / 3 + 1e-9
    quarter = rank_memory(s, c, Settings(micro_batches=4))
    assert quarter.activations == pytest.approx(none.activations / 4, rel=1e-6)
    assert quarter.states == none.states


def test_deepseek_v3_at_64_gpus_holds_what_the_issue_counts():
    s, c = _meta("deepseek-v3", 64)
    plan = make_plan(s, c)
    assert plan.params_total == pytest.approx(671e9, rel=0.01)
    assert plan.params_on_device == pytest.approx(27.3e9, rel=0.01)
    assert plan.expert_params_on_device == pytest.approx(10.2e9, rel=0.01)
    assert plan.memory_weights / GiB == pytest.approx(50.9, rel=0.01)
    assert plan.memory_train_states / GiB == pytest.approx(407, rel=0.01)


def test_plan_device_memory_lists_fitting_settings_cheapest_first(capsys):
    assert main(["plan", str(ROOT / "specs" / "mixtral-8x7b.yaml"), "--world-size", "16", "--nodes", "2",
                 "--device", "cuda", "--device-memory", "80GiB", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["fit"]
    assert found["fits"] and found["fitting"]
    assert all(r["total"] <= 80 * GiB for r in found["fitting"])
    # each listed setting costs more than the one before and holds less
    totals = [r["total"] for r in found["fitting"]]
    assert totals == sorted(totals, reverse=True)
    # recomputation costs FLOPs: listed first only because no setting without it fits
    assert found["fitting"][0]["settings"]["recompute"] == "experts"
    s, c = _meta("mixtral-8x7b", 16, mesh={"nodes": 2, "devices_per_node": 8})
    assert all(rank_memory(s, c, Settings(shard, "none", M)).total > 80 * GiB
               for shard in ("none", "optimizer", "full") for M in (1, 2, 4))
    assert main(["plan", str(ROOT / "specs" / "mixtral-8x7b.yaml"), "--world-size", "16", "--nodes", "2",
                 "--device", "cuda", "--device-memory", "80GiB"]) == 0
    assert "settings that fit a step in 80 GiB per device, cheapest first" in capsys.readouterr().out


def test_plan_device_memory_says_by_how_much_the_best_misses_and_exits_1(capsys):
    s, c = _meta("deepseek-v3", 64)
    best = fit(s, c, 80 * GiB).best
    assert main(["plan", str(ROOT / "specs" / "deepseek-v3.yaml"), "--device", "cuda", "--device-memory", "80GiB"]) == 1
    out = capsys.readouterr().out
    assert f"no setting fits 80 GiB per device: the best ({best.settings}) needs" in out
    # expert parallel 64 on 64 GPUs: every rank's experts are its own, their 16 bytes a parameter unsplittable
    alone = human_bytes(16 * make_plan(s, c).expert_params_on_device)
    assert f"of which {alone} are the states of parameters this rank alone holds" in out
    assert best.settings.shard == "full" and best.total > 80 * GiB


def test_plan_device_memory_and_micro_batches_mistakes_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["plan", str(ROOT / "specs" / "mixtral.yaml"), "--device-memory", "80 parsecs"])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'80 parsecs' is not a memory size" in err[0]
    assert main(["plan", str(ROOT / "specs" / "mixtral.yaml"), "--micro-batches", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro-batches 3 does not split the 16 sequences" in err[0]
    assert main(["plan", str(ROOT / "specs" / "mixtral.yaml"), "--world-size", "4", "--nodes", "3"]) == 2
    assert "--nodes 3 does not divide the 4 processes" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_step_total_is_within_15_percent_of_cuda_max_memory_allocated(dtype):
    """On a GPU: everything a step holds at its peak (torch.cuda.max_memory_allocated, from the
    allocator) against the plan's training step (states + working copies + activations)."""
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    data = spec_data("mixtral")
    data["model"]["dtype"] = dtype
    spec = moedsl.load_spec(data)
    model = moedsl.build_model(spec, seed=0, device="cuda", dtype=torch.float32)
    amp = dtypes.autocast_dtype(dtype)
    step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), 0, 1, amp=amp, capturable=False)
    step.lr.fill_(1e-3)
    x = torch.randint(0, spec.model.vocab_size, (32, 128), device="cuda")
    step(x, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x, x)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    step.sync.close()
    plan = make_plan(spec, compile_graph(spec, 0, 1, device="meta", batch=(32, 128), target="cuda"))
    assert plan.memory_train_total == pytest.approx(measured, rel=0.15)
