"""placement.replication's runtime: E + R physical slots over the EP ranks, dispatch among
replicas, replicas' gradients summed into the logical one, experts (weights and AdamW moments)
moved between steps by a policy, the balancedness a run logs, and checkpoints that stay
logical. The policies themselves (EPLB, shadowing) are tested with compiler/replication.py;
these tests pass their own."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import moedsl
from moedsl.compiler import replication
from moedsl.compiler.passes.placement import LayerPlacement, initial_phy2log
from moedsl.errors import SpecError
from moedsl.mesh import resolve_mesh
from moedsl.runtime.metrics import rank_tokens, reduce_step
from moedsl.runtime.replicate import plan_moves
from moedsl.runtime.spawn import spawn
from test_checkpoints import TINY as CHECKPOINT_TINY

# the checkpoint tests' tiny model (4 experts in each of 2 MoE layers), without jitter, 2 sequences a rank on 4
TINY = copy.deepcopy(CHECKPOINT_TINY)
TINY.update(name="tiny-replicas",
            train={**TINY["train"], "batch_size": 8, "steps": 20, "warmup": 2, "eval_every": 1000})
TINY["layers"][1]["block"][1]["moe"]["gate"] = {"type": "switch", "capacity_factor": 1.25}


def tiny(redundant=None, dropless=False, every=1000, window=2, dispatch=None, chunks=1, groups=None,
         gate=None) -> dict:
    """``groups``: the capacity gate's routing groups (2 on 2 ranks: each rank routes its own tokens, so
    the static layout keeps its [E, C, d] buffers and their capacity all-to-all); ``dispatch``: None
    for the spec's default; ``gate``: another gate (the losses go: a hash gate has none)."""
    d = copy.deepcopy(TINY)
    moe = d["layers"][1]["block"][1]["moe"]
    if dropless:
        moe["gate"] = {"type": "topk", "k": 2, "drop_policy": "dropless"}
    if groups:
        moe["gate"]["routing_groups"] = groups
    if gate is not None:
        moe["gate"] = gate
        moe.pop("losses", None)
    if chunks > 1:  # the overlap pass's chunked trips: their modules hold the layer's dispatch tables
        moe["overlap"] = {"chunks": chunks}
    if redundant is not None:
        d["placement"] = {"replication": {"policy": "eplb", "redundant": redundant, "every": every, "window": window}}
        if dispatch is not None:
            d["placement"]["replication"]["dispatch"] = dispatch
    return d


# ----------------------------------------------------------------------------- placement, on paper


def test_a_replicated_layer_has_experts_plus_redundant_slots_spread_evenly_over_the_ranks():
    spec = moedsl.load_spec(tiny(redundant=2))
    compiled = moedsl.compiler.compile_graph(spec, rank=0, world_size=2, device="meta")
    for lp in compiled.placements.values():
        assert [len(s) for s in lp.slots] == [3, 3]
        assert lp.phy2log == initial_phy2log(4, 2) == (0, 1, 2, 3, 0, 1)
        assert lp.hosts == ((0, 1), (0, 1), (0,), (1,))
    one = moedsl.compiler.compile_graph(spec, rank=0, world_size=1, device="meta")
    assert all(lp.slots == ((0, 1, 2, 3),) for lp in one.placements.values())  # one process: one copy of each


def test_a_placement_that_puts_two_copies_on_one_rank_or_forgets_an_expert_is_refused():
    with pytest.raises(ValueError, match="slot 2 puts a second copy of expert 0 on rank 0"):
        LayerPlacement.of((0, 1, 0, 2, 3, 1), ep=2)
    with pytest.raises(ValueError, match="expert 2 has no slot"):
        LayerPlacement.of((0, 1, 3, 0, 1, 3), ep=2)
    with pytest.raises(ValueError, match="expert 3 has no slot"):  # the last one too, when the count is known
        LayerPlacement.of((0, 1, 2, 0, 1, 2), ep=2, experts=4)
    with pytest.raises(ValueError, match=r"slot 5 holds expert 4: the experts are 0\.\.3"):
        LayerPlacement.of((0, 1, 2, 3, 0, 4), ep=2, experts=4)


def test_nearest_dispatch_takes_the_sources_own_copy_then_splits_over_those_on_its_node():
    # 4 ranks, 2 per node, 2 slots each; expert 0 on rank 0 (node 0) and rank 3 (node 1)
    phy = (0, 1, 2, 3, 4, 5, 0, 6)
    lp = LayerPlacement.of(phy, ep=4, dispatch="nearest", per_node=2)
    assert lp.hosts[0] == (0, 3)
    assert [lp.host_for(0, s) for s in range(4)] == [0, 0, 3, 3]  # the copy on the source's node
    source = LayerPlacement.of(phy, ep=4, dispatch="source")
    assert [source.host_for(0, s) for s in range(4)] == [0, 3, 0, 3]  # copy s mod 2
    # 6 ranks, 3 per node; expert 0 on ranks 0, 1 (node 0) and 4 (node 1): rank 2 splits its rows of
    # expert 0 by position over the two copies of its node, ranks 3 and 5 send theirs to rank 4's
    lp = LayerPlacement.of((0, 1, 0, 2, 3, 4, 5, 6, 0, 7, 8, 9), ep=6, dispatch="nearest", per_node=3)
    assert [lp.targets(0, s) for s in range(6)] == [(0,), (1,), (0, 1), (4,), (4,), (4,)]


def test_position_dispatch_splits_every_sources_block_over_all_copies():
    lp = LayerPlacement.of((0, 1, 2, 3, 0, 1), ep=2, dispatch="position")
    assert [lp.targets(0, s) for s in range(2)] == [(0, 1), (0, 1)] and lp.targets(2, 1) == (0,)
    with pytest.raises(ValueError, match="position dispatch splits expert 0's rows over ranks"):
        lp.host_for(0, 1)
    # a capacity block of 5 slots: copies take 3 and 2 of each replicated expert, the rest whole
    assert lp.split(0, 1, 5) == [(0, 3), (1, 2)]
    assert lp.sends(1, 5) == [3 + 3 + 5, 2 + 2 + 5]
    assert lp.split(0, 1, 2, offset=3) == [(0, 1), (1, 1)]  # an overlap chunk of slots 3..4
    source = LayerPlacement.of((0, 1, 2, 3, 0, 1), ep=2, dispatch="source")
    assert source.sends(1, 5) == [5, 15]  # source 1's blocks of experts 0 and 1 to its own copies


def test_the_default_dispatch_of_replication_is_position_and_of_static_replicas_source():
    spec = moedsl.load_spec(tiny(redundant=2))
    assert spec.placement.replication.dispatch == "position"
    compiled = moedsl.compiler.compile_graph(spec, rank=0, world_size=2, device="meta")
    assert {lp.dispatch for lp in compiled.placements.values()} == {"position"}
    static = tiny()
    static["placement"] = {"experts": {"replicas": {0: 2}}}
    compiled = moedsl.compiler.compile_graph(moedsl.load_spec(static), rank=0, world_size=2, device="meta")
    assert {lp.dispatch for lp in compiled.placements.values()} == {"source"}


def test_the_mesh_check_names_redundant_slots_that_do_not_divide_or_that_double_an_expert_on_a_rank():
    with pytest.raises(SpecError, match=r"placement\.replication\.redundant.*4 experts \+ 1 redundant slots"):
        resolve_mesh(moedsl.load_spec(tiny(redundant=1)), 2)
    with pytest.raises(SpecError, match="a rank would hold two copies of one expert"):
        resolve_mesh(moedsl.load_spec(tiny(redundant=6)), 2)
    both = tiny(redundant=2)
    both["placement"]["experts"] = {"replicas": {0: 2}}
    with pytest.raises(SpecError, match="cannot be combined with placement.experts.replicas"):
        resolve_mesh(moedsl.load_spec(both), 2)
    assert resolve_mesh(moedsl.load_spec(tiny(redundant=6)), 1).expert_parallel == 1  # one process: ignored


def test_a_move_takes_each_expert_a_rank_lacks_from_an_old_holder_and_nothing_it_has():
    old = LayerPlacement.of((0, 1, 2, 3, 0, 1), ep=2)
    new = LayerPlacement.of((3, 2, 1, 0, 1, 2), ep=2)
    moves = plan_moves(old, new)
    assert [(m.expert, m.src, m.src_slot, m.dst, m.dst_slot) for m in moves] == [(2, 0, 2, 1, 2), (3, 1, 0, 0, 0)]
    assert plan_moves(new, new) == []


def test_balancedness_is_the_mean_over_the_max_of_the_tokens_each_rank_computes():
    # experts 0, 1 on both ranks; 2 on rank 0, 3 on rank 1
    lp = LayerPlacement.of((0, 1, 2, 3, 0, 1), ep=2, dispatch="source")
    stats = [SimpleNamespace(layer="layers.2", tokens_per_expert=torch.tensor([6, 2, 4, 0]),
                             expert_load=torch.tensor([6.0, 2, 4, 0]), dropped=torch.tensor(0), assignments=12)]
    # source EP rank 1 sends experts 0 and 1 to its own copies: rank 0 gets expert 2's 4, rank 1 gets 8
    (layer, sent), = rank_tokens(stats, {"layers.2": lp}, ep_rank=1)
    assert layer == "layers.2" and sent.tolist() == [4.0, 8.0]
    zero = torch.zeros(())
    out = SimpleNamespace(loss=zero, aux_loss=zero, grad_norm=zero, skipped=zero, router_stats=stats)
    m = reduce_step(out, 1, placements={"layers.2": lp}, ep_rank=1)
    assert m.balancedness == {"layers.2": pytest.approx(6 / 8)}
    # position dispatch: expert 0's 7 rows split 4 (copy on rank 0) and 3, expert 1's 2 split 1 and 1
    stats[0].tokens_per_expert = torch.tensor([7, 2, 4, 0])
    position = LayerPlacement.of(lp.phy2log, ep=2, dispatch="position")
    (_, sent), = rank_tokens(stats, {"layers.2": position}, ep_rank=1)
    assert sent.tolist() == [4.0 + 1 + 4, 3.0 + 1]
    assert sent.tolist() == replication.rank_tokens(lp.phy2log, [[0, 0, 0, 0], [7, 2, 4, 0]], 2, "position")


# ----------------------------------------------------------------------------- on gloo processes


def _logical(model, grads: bool = False, optimizer=None, state: str = "") -> dict:
    """(parameter, expert id) -> value of each slot this rank holds (its gradient with ``grads``,
    its optimizer state ``state`` with ``optimizer``); replicated parameters by (name, None)."""
    out = {}
    ids = {n: m.expert_ids.tolist() for n, m in model.named_modules() if n.endswith(".experts")}
    for name, p in model.named_parameters():
        v = p.grad if grads else optimizer.state[p][state] if optimizer is not None else p.detach()
        v = torch.zeros_like(p) if v is None else v.clone()
        owner = name.rsplit(".", 1)[0]
        if owner in ids:
            for j, e in enumerate(ids[owner]):
                out[(name, e)] = v[j].numpy()  # numpy: a tensor would leave the process as a shared-memory handle
        else:
            out[(name, None)] = v.numpy()
    return out


def _forward_backward(rank: int, world: int, datas: list):
    from moedsl.runtime.grads import GradSync

    torch.set_num_threads(1)
    results = []
    for data in datas:
        spec = moedsl.load_spec(data)
        model = moedsl.build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32, layout="static")
        g = torch.Generator().manual_seed(7 + rank)
        inputs = torch.randint(0, spec.model.vocab_size, (4, 8), generator=g)
        out = model(inputs)
        loss = F.cross_entropy(out.output.flatten(0, 1), inputs.flatten()) + out.aux_loss
        (loss / world).backward()
        GradSync(model, model.compiled.mesh, rank, mode="after_backward")()
        results.append((out.output.detach().numpy(), _logical(model, grads=True)))
    return results


def _close(a, b, tol: float = 1e-6) -> bool:
    """Equal to ``tol`` of b's largest value: float32 sums in another order (a copy's gradient
    summed with another's, where one expert computed all rows), never a missing term."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return bool((a - b).abs().max() <= tol * float(b.abs().max()) + 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["position", "source", "nearest"])
def test_replicas_give_the_outputs_and_gradients_of_the_model_without_them(dispatch):
    """2 ranks; capacity layers (routed over the gathered batch, packed rows; and each rank its own
    routing group, static [E, C, d] buffers, whole and in 2 overlapped chunks) and dropless ones
    (whole and in 2 chunks); experts 0 and 1 on both ranks: each copy computes its share of the
    rows, and only their summed gradients are the logical one."""
    kinds = [{}, {"groups": 2}, {"groups": 2, "chunks": 2}, {"dropless": True}, {"dropless": True, "chunks": 2}]
    datas = [d for kind in kinds for d in (tiny(redundant=2, dispatch=dispatch, **kind), tiny(**kind))]
    per_rank = spawn(_forward_backward, 2, datas)
    for case in range(0, len(datas), 2):
        for rank in range(2):
            (out_r, g_r), (out_b, g_b) = per_rank[rank][case], per_rank[rank][case + 1]
            assert _close(out_r, out_b), kinds[case // 2]
        base = {**per_rank[0][case + 1][1], **per_rank[1][case + 1][1]}
        for rank in range(2):  # every copy of an expert: its logical gradient
            for key, g in per_rank[rank][case][1].items():
                assert _close(g, base[key]), (kinds[case // 2], rank, key)
        replicated = [k for k in per_rank[0][case][1] if k in per_rank[1][case][1] and k[1] is not None]
        assert {k[1] for k in replicated} == {0, 1}


def _rows_per_copy(rank: int, world: int, datas: list, layout: str):
    """Rank 0's tokens all hash to expert 0 (a copy on each rank), rank 1's to expert 3 (one copy, on
    rank 1). Per case: the rows each local slot's expert computed (non-zero rows: a static buffer's
    empty slots are zero), this rank's kept assignments per expert and the balancedness the run
    would log."""
    from moedsl.nn.experts import Experts
    from moedsl.nn.gates import HashGate

    torch.set_num_threads(1)
    out = []
    for data in datas:
        spec = moedsl.load_spec(data)
        model = moedsl.build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32, layout=layout)
        table = next(m for m in model.modules() if isinstance(m, HashGate)).table
        token = int((table == (0 if rank == 0 else 3)).nonzero()[0])
        rows = {}

        def count(mod, args, name):
            x, sizes = args[0], args[1] if len(args) > 1 else None
            parts = torch.split(x.reshape(-1, x.shape[-1]), sizes.tolist()) if sizes is not None else list(x)
            for e, part in zip(mod.expert_ids.tolist(), parts):
                rows[(name, e)] = rows.get((name, e), 0) + int((part.abs().sum(-1) > 0).sum())

        for name, m in model.named_modules():
            if isinstance(m, Experts):
                m.register_forward_pre_hook(lambda mod, args, name=name.rsplit(".", 1)[0]: count(mod, args, name))
        with torch.no_grad():
            o = model(torch.full((4, 8), token))
        zero = torch.zeros(())
        metrics = reduce_step(SimpleNamespace(loss=zero, aux_loss=zero, grad_norm=zero, skipped=zero,
                                              router_stats=o.router_stats), world,
                              placements=model.compiled.placements, ep_rank=rank)
        out.append((rows, {s.layer: s.tokens_per_expert.tolist() for s in o.router_stats}, metrics.balancedness))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["static", "grouped"])
def test_each_copy_computes_an_equal_share_when_one_source_sends_all_of_its_experts_rows(layout):
    """Under the default (position) dispatch expert 0's copies on ranks 0 and 1 each compute half
    of rank 0's rows of it (±1), though rank 1 sends it none (source dispatch: rank 0's copy takes
    them all); capacity (11 slots of a routing group per rank: 6 and 5; the static layout's
    buffers and the grouped layout's rows) and dropless. The balancedness the run logs, and the
    model's from the sources' loads, are those of the rows counted in the experts."""
    datas = [tiny(redundant=2, groups=2, gate={"type": "hash", "capacity_factor": 1.375, "routing_groups": 2}),
             tiny(redundant=2, gate={"type": "hash"})]
    per_rank = spawn(_rows_per_copy, 2, datas, layout)
    for case, data in enumerate(datas):
        for layer in ("layers.2", "layers.4"):
            loads = [per_rank[r][case][1][layer] for r in range(2)]  # [source][expert] kept rows
            assert loads[1][0] == 0 and loads[0][0] > 0
            on = [per_rank[r][case][0].get((layer, 0), 0) for r in range(2)]  # expert 0's rows on each copy
            assert sum(on) == loads[0][0] and abs(on[0] - on[1]) <= 1, (data["layers"][1], layer, on)
            measured = [sum(n for (name, _), n in per_rank[r][case][0].items() if name == layer) for r in range(2)]
            model = replication.rank_tokens(initial_phy2log(4, 2), loads, 2, "position")
            assert measured == model, (layer, measured, model)
            assert per_rank[0][case][2][layer] == pytest.approx(replication.balancedness(measured), rel=1e-6)
        assert loads[0][0] % 2 == (1 if case == 0 else 0)  # the capacity case splits an odd count


def _everywhere(load, info):
    """A policy placing expert 0 on every rank, whatever the load (4 experts; 3 slots per rank on 2
    ranks, 2 on 4)."""
    return {2: (0, 1, 2, 3, 0, 1), 4: (0, 1, 0, 2, 0, 3, 0, 1)}[info.ep]


def _swap(load, info):
    """A policy alternating between two placements of 4 experts on 6 slots: every expert moves."""
    a, b = (0, 1, 2, 3, 0, 1), (3, 2, 1, 0, 1, 2)
    return b if tuple(info.phy2log) == a else a


def _train(rank: int, world: int, runs: list):
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(1)
    results = []
    for data, policy, out, steps, *layout in runs:
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=steps, out=Path(out), progress=False, compile="off")
        trainer = Trainer(spec, o, layout=layout[0] if layout else "auto", policy=policy)
        summary = trainer.fit()
        placements = {n: lp.phy2log for n, lp in trainer.model.compiled.placements.items()}
        moments = {k: _logical(trainer.model, optimizer=trainer.opt, state=k) for k in ("exp_avg", "exp_avg_sq")}
        results.append((summary.losses, _logical(trainer.model), placements, moments))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_parameters_after_20_steps_equal_the_baseline_with_an_expert_on_every_rank(world, tmp_path):
    redundant = {2: 2, 4: 4}[world]
    runs = [(tiny(redundant=redundant), _everywhere, str(tmp_path / "replicas"), 20),
            (tiny(), None, str(tmp_path / "baseline"), 20)]
    per_rank = spawn(_train, world, runs, timeout=300)
    placed = per_rank[0][0][2]
    assert all(sum(1 for e in phy if e == 0) == world for phy in placed.values())
    base = {k: v for r in range(world) for k, v in per_rank[r][1][1].items()}
    assert per_rank[0][0][0] == pytest.approx(per_rank[0][1][0], rel=1e-6)
    for r in range(world):
        for key, v in per_rank[r][0][1].items():
            assert _close(v, base[key]), (r, key, float(abs(v - base[key]).max()))


@pytest.mark.slow
def test_a_migrating_run_has_the_losses_and_parameters_of_the_fixed_run(tmp_path):
    """Every expert moves every 3 steps (weights and both AdamW moments: stale moments would
    change the next updates); the run is the run whose placement never moves, to float32
    rounding: capacity layers with their static buffers (each rank its own routing group: the
    capacity all-to-all's tables follow the move), and in 2 overlapped chunks, and with their
    kept rows grouped; dropless layers in 2 chunks. Position dispatch (the default)."""
    runs = []
    for name, layout, kind in (("static", "static", {"groups": 2}), ("grouped", "grouped", {}),
                               ("chunks", "static", {"chunks": 2, "groups": 2}),
                               ("dropless", "grouped", {"chunks": 2, "dropless": True})):
        runs += [(tiny(redundant=2, every=3, window=2, **kind), _swap, str(tmp_path / f"moving-{name}"), 10, layout),
                 (tiny(redundant=2, **kind), _swap, str(tmp_path / f"fixed-{name}"), 10, layout)]
    per_rank = spawn(_train, 2, runs, timeout=300)
    for i in range(0, len(runs), 2):
        moving, fixed = per_rank[0][i], per_rank[0][i + 1]
        assert moving[2] != fixed[2]  # 3 moves (at steps 3, 6, 9) from where both started
        assert moving[0] == pytest.approx(fixed[0], rel=1e-6)
        for r in range(2):
            fixed_all = {k: v for rr in range(2) for k, v in per_rank[rr][i + 1][1].items()}
            for key, v in per_rank[r][i][1].items():
                assert _close(v, fixed_all[key]), (r, key)
            for k in ("exp_avg", "exp_avg_sq"):
                fixed_m = {key: v for rr in range(2) for key, v in per_rank[rr][i + 1][3][k].items()}
                for key, v in per_rank[r][i][3][k].items():
                    assert _close(v, fixed_m[key]), (r, k, key)
    rows = [json.loads(line) for line in (tmp_path / "moving-static" / "metrics.jsonl").read_text().splitlines()]
    moved = {r["step"]: r["replication"] for r in rows if "replication" in r}
    assert sorted(moved) == [3, 6, 9]
    for m in moved.values():
        assert m["seconds"] > 0 and m["bytes"] > 0
        assert sorted(m["layers"]) == ["layers.2", "layers.4"]
        assert all(len(layer["moved"]) == 2 and len(layer["phy2log"]) == 6 for layer in m["layers"].values())
    assert all(set(r["balancedness"]) == {"layers.2", "layers.4"} and 0.5 <= min(r["balancedness"].values()) <= 1
               for r in rows)


def _checkpoints(rank: int, world: int, tmp: str):
    """A run with replicas (moved twice) saves; a model without them loads it. A run without
    replicas saves; a model with them loads it. Both: logical weights and AdamW moments."""
    from moedsl.runtime import checkpoint as ckpt
    from moedsl.runtime.optim import make_optimizer
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(1)
    out = []
    for saved, loads in ((tiny(redundant=2, every=2), tiny()), (tiny(), tiny(redundant=2))):
        spec, other = moedsl.load_spec(saved), moedsl.load_spec(loads)
        where = Path(tmp) / ("replicas" if saved.get("placement") else "plain")
        o = RunOptions.from_spec(spec, steps=4, out=where, progress=False, compile="off")
        trainer = Trainer(spec, o, policy=_swap)
        trainer.fit()
        model = moedsl.build_model(other, seed=1, rank=rank, world_size=world, dtype=torch.float32)
        opt = make_optimizer(model, o, torch.tensor(o.lr), capturable=False)
        ckpt.load(where / "checkpoints" / "step-00000004", model, opt, other)
        pair = []
        for m, optimizer in ((trainer.model, trainer.opt), (model, opt)):
            pair.append({"weights": _logical(m), **{k: _logical(m, optimizer=optimizer, state=k)
                                                   for k in ("exp_avg", "exp_avg_sq")},
                         "placement": [lp.phy2log for lp in m.compiled.placements.values()]})
        out.append(pair)
    return out


@pytest.mark.slow
def test_a_checkpoint_with_replicas_loads_without_them_and_the_reverse(tmp_path, capsys):
    per_rank = spawn(_checkpoints, 2, str(tmp_path), timeout=300)
    for case in range(2):
        trained = {what: {k: v for r in range(2) for k, v in per_rank[r][case][0][what].items()}
                   for what in ("weights", "exp_avg", "exp_avg_sq")}
        for r in range(2):
            loaded = per_rank[r][case][1]
            for what in ("weights", "exp_avg", "exp_avg_sq"):  # every copy, each expert's values
                for key, v in loaded[what].items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(trained[what][key])), (case, r, what, key)
    assert per_rank[0][0][0]["placement"][0] == (3, 2, 1, 0, 1, 2)  # the policy's, moved away at step 2 and back at 4
    assert per_rank[0][1][1]["placement"][0] == (0, 1, 2, 3, 0, 1)  # the replicas of a model built to load
    # and into one process: each logical expert once
    spec = moedsl.load_spec(tiny())
    one = moedsl.build_model(spec, seed=1, dtype=torch.float32)
    from moedsl.runtime import checkpoint as ckpt

    ckpt.load(tmp_path / "replicas" / "checkpoints" / "step-00000004", one, None, spec)
    trained = {k: v for r in range(2) for k, v in per_rank[r][0][0]["weights"].items()}
    single = _logical(one)
    assert set(single) == set(trained)
    assert all(torch.equal(torch.as_tensor(single[k]), torch.as_tensor(trained[k])) for k in single)
    # inspect reads the run as one process would: each layer's load over its 4 logical experts
    from moedsl.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "replicas"), "--data", "synthetic", "--tokens", "64", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert len(layers) == 2 and all(len(layer["load"]) == 4 for layer in layers)


def test_the_run_summary_shows_the_least_even_layers_balancedness_beside_the_dropped_share():
    from rich.console import Console

    from moedsl.runtime.report import summary_table
    from moedsl.runtime.train import Summary

    s = Summary(spec="tiny", steps=4, tokens=256, seconds=1.0, tokens_per_s=256.0, train_loss=3.0, eval_loss=None,
                eval_ppl=None, balance=1.5, dropped=0.02, first_loss=3.4, checkpoint=None, metrics="m.jsonl",
                plot=None, world=2, cuda_graphs=False, balancedness={"layers.2": 0.91, "layers.4": 0.62})
    console = Console(record=True, width=200)
    console.print(summary_table(s))
    text = console.export_text()
    assert "0.62 mean / max tokens per rank, at layers.4" in text
    lines = text.splitlines()
    dropped = next(i for i, line in enumerate(lines) if "dropped" in line)
    assert "balancedness" in lines[dropped + 1]


@pytest.mark.slow
def test_experts_migrate_inside_each_expert_parallel_group_of_a_data_parallel_mesh(tmp_path):
    """4 ranks = 2 EP × 2 DP, nearest dispatch: each EP group moves its copies, the copies in
    the other group take the same gradient sums, and the run is the fixed one's."""
    def mesh(d):
        d["placement"]["expert_parallel"] = 2
        return d

    runs = [(mesh(tiny(redundant=2, every=3, dispatch="nearest")), _swap, str(tmp_path / "moving"), 7),
            (mesh(tiny(redundant=2, dispatch="nearest")), _swap, str(tmp_path / "fixed"), 7)]
    per_rank = spawn(_train, 4, runs, timeout=300)
    assert per_rank[0][0][0] == pytest.approx(per_rank[0][1][0], rel=1e-6)
    fixed = {k: v for r in range(4) for k, v in per_rank[r][1][1].items()}
    for r in range(4):
        assert per_rank[r][0][2] == per_rank[0][0][2]  # one placement in both EP groups
        for key, v in per_rank[r][0][1].items():
            assert _close(v, fixed[key]), (r, key)
    rows = [json.loads(line) for line in (tmp_path / "moving" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("replication", {}).get("bytes")] == [3, 6]


_ASKED: list = []  # this process's policy calls: (layer, placement then, load over the window)


def _recorded_swap(load, info):
    """``_swap``, keeping what it was asked: the loads show which steps the window held."""
    _ASKED.append((info.name, tuple(info.phy2log), [float(x) for x in load]))
    return _swap(load, info)


def _resumed(rank: int, world: int, runs: list):
    """Each run: (spec data, out, steps, checkpoint to resume or None, checkpoint_every). Its losses,
    logical weights and moments, placements, the policy's calls and the lines rank 0 said."""
    from moedsl.runtime.train import RunOptions, Trainer

    torch.set_num_threads(1)
    results = []
    for data, out, steps, resume, every in runs:
        _ASKED.clear()
        spec = moedsl.load_spec(data)
        o = RunOptions.from_spec(spec, steps=steps, out=Path(out), progress=False, compile="off",
                                 checkpoint_every=every, resume=resume)
        trainer = Trainer(spec, o, policy=_recorded_swap)
        said, once = [], trainer.say.once
        trainer.say.once = lambda text: (said.append(text), once(text))
        summary = trainer.fit()
        moments = {k: _logical(trainer.model, optimizer=trainer.opt, state=k) for k in ("exp_avg", "exp_avg_sq")}
        results.append({"losses": summary.losses, "weights": _logical(trainer.model), "moments": moments,
                        "placement": {n: lp.phy2log for n, lp in trainer.model.compiled.placements.items()},
                        "asked": list(_ASKED), "said": said})
    return results


def _replication_rows(out: Path) -> dict:
    """step -> what metrics.jsonl says moved (the seconds aside: they are the clock's)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r["replication"].items() if k != "seconds"} for r in rows if "replication" in r}


@pytest.mark.slow
def test_a_replicated_run_resumed_from_a_checkpoint_continues_the_uninterrupted_run(tmp_path):
    """12 steps, experts moved every 4 from the last 3 steps' load, checkpointed at step 6 (between
    two migrations, the window full of steps 4..6); a run resumed there to step 12 moves at steps 8
    and 12 to the same placements from the same loads, with the same losses, weights and AdamW
    moments. A resume under other replication settings, or without replication, starts from its
    own placement and says so in one line."""
    whole, step6 = tmp_path / "whole", tmp_path / "whole" / "checkpoints" / "step-00000006"
    data = tiny(redundant=2, every=4, window=3)
    runs = [(data, str(whole), 12, None, 6),
            (data, str(tmp_path / "resumed"), 12, str(step6), None),
            (tiny(redundant=2, every=4, window=4), str(tmp_path / "window4"), 8, str(step6), None),
            (tiny(), str(tmp_path / "plain"), 8, str(step6), None)]
    per_rank = spawn(_resumed, 2, runs, timeout=300)
    (a, b, *_), (a1, b1, *_) = per_rank
    # the checkpoint's placement (the step-8 call's) is not where a fresh run starts (the step-4 call's):
    # restoring it is what makes the resumed run go on
    assert a["asked"][2][0] == a["asked"][4][0] == "layers.2" and a["asked"][2][1] != a["asked"][4][1]
    assert b["losses"] == a["losses"][6:]
    for whole_r, resumed_r in ((a, b), (a1, b1)):
        assert resumed_r["placement"] == whole_r["placement"]
        for key, v in whole_r["weights"].items():
            assert torch.equal(torch.as_tensor(resumed_r["weights"][key]), torch.as_tensor(v)), key
        for k in ("exp_avg", "exp_avg_sq"):
            for key, v in whole_r["moments"][k].items():
                assert torch.equal(torch.as_tensor(resumed_r["moments"][k][key]), torch.as_tensor(v)), (k, key)
    # the policy's calls after the resume's initial placement: those of steps 8 and 12, from the same windows
    assert b["asked"][2:] == a["asked"][4:] and len(b["asked"]) == 6
    moved = _replication_rows(whole)
    assert sorted(moved) == [4, 8, 12]
    resumed_rows = _replication_rows(tmp_path / "resumed")
    assert resumed_rows == {8: moved[8], 12: moved[12]} and moved[8]["bytes"] > 0
    assert not any("not restored" in line for line in b["said"])
    meta = json.loads((step6 / "meta.json").read_text())
    assert meta["format"] == 1 and meta["replication"]["window_steps"] == 3  # a new key; the format stays
    assert meta["replication"]["phy2log"]["layers.2"] == list(a["asked"][4][1])
    assert meta["replication"]["steps_since_move"] == 2
    window4, plain = per_rank[0][2], per_rank[0][3]
    assert [line for line in window4["said"] if "not restored" in line] == [
        "placement.replication: the placement and load window of step-00000006 are not restored "
        "(placement.replication.window 3 in the checkpoint, 4 now): the experts start from this run's initial "
        "placement, the window empty"]
    assert len(window4["losses"]) == 2
    assert [line for line in plain["said"] if "replicated experts" in line] == [
        "placement.replication: step-00000006 was saved with replicated experts over 2 expert-parallel ranks; "
        "this run has no placement.replication: the experts load logically, their placement and load window "
        "are reset"]
    assert len(plain["losses"]) == 2 and plain["placement"]["layers.2"] == (0, 1, 2, 3)
    # one process (one copy of each expert): the same spec loads the checkpoint logically and goes on
    threads = torch.get_num_threads()
    try:
        one, = _resumed(0, 1, [(data, str(tmp_path / "one"), 8, str(step6), None)])
    finally:
        torch.set_num_threads(threads)
    assert [line for line in one["said"] if "replicated experts" in line] == [
        "placement.replication: step-00000006 was saved with replicated experts over 2 expert-parallel ranks; "
        "this run has one expert-parallel rank: the experts load logically, their placement and load window "
        "are reset"]
    assert len(one["losses"]) == 2 and one["placement"]["layers.2"] == (0, 1, 2, 3)

def _doubled(load, info):
    """A wrong policy: two copies of expert 0 on rank 0."""
    return (0, 0, 1, 2, 3, 1)


@pytest.mark.slow
def test_a_policy_that_doubles_an_expert_on_a_rank_is_refused_naming_the_layer_and_slot(tmp_path):
    with pytest.raises(RuntimeError, match="MoedslError: placement.replication: the eplb policy's placement of the "
                                           "MoE layer layers.2: slot 1 puts a second copy of expert 0 on rank 0"):
        spawn(_train, 2, [(tiny(redundant=2), _doubled, str(tmp_path / "run"), 2)])
