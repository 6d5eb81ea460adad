"""``overlap: {chunks: D}``: an MoE layer's dispatch, experts and combine pipelined over D chunks
compute what the whole layer computes (the routing is done once), on one process and with
asynchronous all-to-alls on two gloo processes, in both layouts; the graph shows the chunks."""
from __future__ import annotations

import copy

import pytest
import torch

from moedsl.api import build_model, load_spec
from moedsl.errors import SpecError

# 4 sequences × 5 tokens = 20 tokens: D = 3 divides neither the tokens (20) nor, at capacity factor
# 1.25 (top-2, 4 experts, 2 routing groups of 10 tokens: C = 7 slots per group), the slots (14 on one
# process, 7 a rank on 2); routing_groups 2 keeps the capacity layer routed locally on 2 ranks, so it
# keeps its static [E, C, d] buffer and all-to-alls
BASE = {
    "moedsl": 1,
    "name": "overlap-tiny",
    "model": {"vocab_size": 32, "d_model": 8, "max_seq_len": 8, "norm": "rmsnorm"},
    "layers": [
        {"embedding": {}},
        {"moe": {"experts": {"count": 4, "hidden": 12, "activation": "swiglu"},
                 "gate": {"type": "topk", "k": 2}, "losses": {"balance": 0.01}}},
        {"head": {}},
    ],
    "train": {"batch_size": 4, "seq_len": 5},
}
GATES = {
    "capacity": {"type": "topk", "k": 2, "capacity_factor": 1.25, "routing_groups": 2},
    "packed": {"type": "topk", "k": 2, "drop_policy": "dropless"},
}
LAYOUT = {"capacity": "static", "packed": "grouped"}  # how each family's layer computes


def spec_data(gate: str, chunks: int) -> dict:
    d = copy.deepcopy(BASE)
    moe = d["layers"][1]["moe"]
    moe["gate"] = dict(GATES[gate])
    if chunks != 1:
        moe["overlap"] = {"chunks": chunks}
    return d


def run(model, tokens):
    """One training forward/backward: output, aux loss, every gradient."""
    model.train()
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.output.flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.output.detach(), out.aux_loss.detach(), grads, out.router_stats


def assert_same(a, b, what: str):
    out_a, aux_a, grads_a, stats_a = a
    out_b, aux_b, grads_b, stats_b = b
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6, msg=f"{what}: output")
    torch.testing.assert_close(aux_b, aux_a, rtol=0, atol=1e-6, msg=f"{what}: aux loss")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=1e-6, msg=f"{what}: gradient of {n}")
    for sa, sb in zip(stats_a, stats_b):  # the same routing: the same drops
        assert torch.equal(sa.tokens_per_expert, sb.tokens_per_expert) and int(sa.dropped) == int(sb.dropped)


def tokens(seed: int = 1):
    return torch.randint(0, 32, (4, 5), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", ["capacity", "packed"])
@pytest.mark.parametrize("chunks", [2, 3])
def test_chunked_layer_equals_the_whole_layer_on_one_process(gate, chunks):
    x = tokens()
    whole = run(build_model(spec_data(gate, 1), layout=LAYOUT[gate]), x)
    chunked = build_model(spec_data(gate, chunks), layout=LAYOUT[gate])
    assert sum(n.name.startswith("layers_1_experts_c") for n in chunked.graph.nodes) == chunks
    result = run(chunked, x)
    assert_same(whole, result, f"{gate}, {chunks} chunks")
    if gate == "capacity":  # the check saw drops: slots split by range keep exactly what was kept
        assert int(result[3][0].dropped) > 0


def _two_ranks(rank: int, world: int, gate: str, chunks: int):
    torch.set_num_threads(1)
    from moedsl.compiler.collectives import Traffic

    x = tokens()[rank * 2:(rank + 1) * 2]  # this rank's 2 sequences
    results = []
    for d in (1, chunks):
        model = build_model(spec_data(gate, d), rank=rank, world_size=world, layout=LAYOUT[gate])
        Traffic.reset()
        results.append(run(model, x))
        if d > 1:  # forward and backward: two trips per chunk each way, issued asynchronously
            assert Traffic.calls == 4 * chunks, Traffic.calls
            assert Traffic.wait_s > 0
    assert_same(results[0], results[1], f"rank {rank}: {gate}, {chunks} chunks")
    return True


@pytest.mark.slow
@pytest.mark.parametrize("gate,chunks", [("capacity", 3), ("packed", 2), ("packed", 3)])
def test_chunked_layer_equals_the_whole_layer_on_two_processes(gate, chunks):
    from moedsl.runtime.spawn import spawn

    assert spawn(_two_ranks, 2, gate, chunks, timeout=120.0) == [True, True]


@pytest.mark.parametrize("gate", ["capacity", "packed"])
def test_graph_shows_every_chunk_and_issues_its_trips_in_pipeline_order(gate):
    from moedsl.compiler import compile_graph
    from moedsl.compiler.passes.verify import collective_signature

    spec = load_spec(spec_data(gate, 3))
    c = compile_graph(spec, 0, 2, layout=LAYOUT[gate])
    names = [n.name for n in c.module.graph.nodes]
    for what in ("dispatch", "a2a_dispatch", "a2a_dispatch_wait", "experts", "a2a_combine", "a2a_combine_wait",
                 "combine"):
        assert [f"layers_1_{what}_c{j}" in names for j in range(3)] == [True] * 3, what
    pos = {n: i for i, n in enumerate(names)}
    # chunk 1's dispatch is issued before chunk 0's experts, whose combine is issued before chunk 1's
    # experts, and waited for only after them
    assert pos["layers_1_a2a_dispatch_c1"] < pos["layers_1_experts_c0"] < pos["layers_1_a2a_combine_c0"] \
        < pos["layers_1_experts_c1"] < pos["layers_1_a2a_combine_wait_c0"]
    sig = collective_signature(c.module.graph)
    if gate == "packed":  # the row trips' splits: every chunk's counts in one exchange, before any trip
        assert [s[1] for s in sig if s[1] != "route_gather"][0] == "a2a_counts"
    assert [(s[1], s[-1]) for s in sig if s[1] in ("a2a_dispatch", "a2a_combine")] == [
        ("a2a_dispatch", 0), ("a2a_dispatch", 1), ("a2a_combine", 0), ("a2a_dispatch", 2), ("a2a_combine", 1),
        ("a2a_combine", 2)]
    if gate == "capacity":  # static shapes: the chunks' slot ranges tile the buffer's C = 7 slots
        shapes = c.static.shapes
        assert [shapes[f"layers_1_dispatch_c{j}"] for j in range(3)] == [(4, 3, 8), (4, 2, 8), (4, 2, 8)]
        assert shapes["layers_1_experts_c0"] == (2, 6, 8) and c.static.capturable
    # the whole-layer trips are gone; one process keeps the chunks, without trips
    assert "layers_1_a2a_dispatch" not in names
    one = [n.name for n in compile_graph(spec, layout=LAYOUT[gate]).module.graph.nodes]
    assert [f"layers_1_experts_c{j}" in one for j in range(3)] == [True] * 3
    assert not any("a2a" in n for n in one)


def test_every_node_calling_a_collective_has_a_role_in_the_one_list_of_collective_roles():
    """The roles the passes give the nodes that call a module of moedsl.compiler.collectives (the token
    gather, the whole-layer trips, and the chunks' issues, waits and count exchange) are exactly
    ``COLLECTIVE_ROLES``: the verify pass compares each of them across ranks and the dense segments
    of runtime/compile.py never move across one."""
    from moedsl.compiler import collectives as C
    from moedsl.compiler import compile_graph
    from moedsl.compiler.passes.verify import collective_signature
    from moedsl.runtime.compile import is_collective

    seen = set()
    # packed: routed globally (one routing group, a balance loss) so its tokens are gathered first
    for gate in ("capacity", "packed"):
        for chunks in (1, 2):
            gm = compile_graph(load_spec(spec_data(gate, chunks)), 0, 2, layout=LAYOUT[gate]).module
            calls = [n for n in gm.graph.nodes
                     if n.op == "call_module" and type(gm.get_submodule(n.target)).__module__ == C.__name__]
            roles = [n.meta.get("role") for n in calls]
            assert set(roles) <= C.COLLECTIVE_ROLES, (gate, chunks, roles)
            assert all(is_collective(gm, n) for n in calls)
            assert [s[1] for s in collective_signature(gm.graph)] == roles
            seen.update(roles)
    assert seen == C.COLLECTIVE_ROLES  # no role in the list that no pass assigns


@pytest.mark.parametrize("value,message", [
    (0, "layers[1].moe.overlap.chunks: must be >= 1, got 0"),
    ("two", "layers[1].moe.overlap.chunks"),
    (21, "layers[1].moe.overlap.chunks: 21 chunks exceed the 20 tokens of a routing group"),
])
def test_bad_chunks_are_one_located_error(value, message):
    d = spec_data("packed", 1)
    d["layers"][1]["moe"]["overlap"] = {"chunks": value}
    with pytest.raises(SpecError) as e:
        load_spec(d)
    assert len(e.value.issues) == 1
    assert message in str(e.value)


def test_too_many_chunks_for_a_batch_is_refused_at_compile_with_its_line(tmp_path, capsys):
    """The spec's own batch fits 4 chunks; ``--batch 2 --seq 1`` on 2 processes routes 1 token a rank."""
    import yaml

    from moedsl.cli import main

    path = tmp_path / "overlap.yaml"
    path.write_text(yaml.safe_dump(spec_data("packed", 4), sort_keys=False))
    assert main(["compile", str(path), "--world-size", "2"]) == 0
    capsys.readouterr()
    assert main(["compile", str(path), "--world-size", "2", "--batch", "2", "--seq", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:" in err[0] and "overlap.chunks: 4 chunks exceed the 1 token of" in err[0], err


def test_finishing_a_trip_blocks_on_it_and_counts_the_wait():
    """The wait node of a trip blocks until the all-to-all completes (a missing wait reads a buffer
    still being written: on tiny tensors gloo is often done anyway, so the race alone cannot show it)."""
    import time

    from moedsl.compiler import collectives as C

    class Work:
        waited = False

        def wait(self):
            time.sleep(0.02)
            self.waited = True

    work = Work()
    flight = C.InFlight(rows=torch.ones(2, 3), counts=[[2]], topo=None, work=work)
    C.Traffic.reset()
    out = C.finish_all_to_all(flight)
    assert work.waited and flight.work is None and C.Traffic.wait_s >= 0.02
    assert torch.equal(out, torch.ones(2, 3))
