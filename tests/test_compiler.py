"""The compiler: graph structure, passes, the plan, and the compile / plan commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moedsl
from moedsl.cli import main
from moedsl.compiler import compile_graph
from moedsl.compiler.passes.verify import GraphError, verify
from moedsl.compiler.plan import make_plan
from moedsl.params import count_parameters

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["shazeer-lstm-moe", "hierarchical-moe", "gshard", "switch", "st-moe", "glam", "expert-choice",
         "mixtral", "dropless", "hash", "deepseek-shared"]


def spec(name):
    return moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_parameter_count_equals_the_modules(name):
    s = spec(name)
    model = moedsl.build_model(s)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(s)[0]


@pytest.mark.parametrize("name", ["switch-c-2048", "shazeer-131k", "mixtral-8x7b"])
def test_full_size_specs_compile_on_meta(name):
    s = spec(name)
    compiled = compile_graph(s, world_size=1, device="meta")
    n = sum(p.numel() for p in compiled.module.parameters())
    assert n == count_parameters(s)[0]
    assert all(p.device.type == "meta" for p in compiled.module.parameters())


def test_experts_are_stacked_parameters_not_modules():
    small = compile_graph(spec("switch"), device="meta").module
    big = compile_graph(spec("switch-c-2048"), world_size=1, device="meta").module
    n_small = sum(1 for _ in small.get_submodule("layers.2").parameters())
    n_big = sum(1 for _ in big.get_submodule("layers.2").parameters())
    assert n_small == n_big  # 8 or 2048 experts: the same few tensors
    assert big.get_submodule("layers.2.experts").w_in.shape == (2048, 2080, 6144)


def test_moe_layers_lower_to_named_nodes():
    gm = compile_graph(spec("switch"), device="meta").module
    names = [n.name for n in gm.graph.nodes]
    for i in (2, 4, 6, 8):
        seq = [f"layers_{i}_route", f"layers_{i}_dispatch", f"layers_{i}_experts", f"layers_{i}_combine"]
        assert [names.index(n) for n in seq] == sorted(names.index(n) for n in seq)
    assert not any("a2a" in n for n in names)


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_inserted_where_experts_are_remote(world):
    c = compile_graph(spec("switch"), rank=1, world_size=world, device="meta")
    roles = [(n.meta.get("moe_layer"), n.meta.get("role")) for n in c.module.graph.nodes
             if n.meta.get("role") in ("a2a_dispatch", "a2a_combine")]
    assert len(roles) == 2 * 4
    # static capacity layout, local routing (4 routing groups split over 2 and 4 ranks)
    assert {(cm.scope, cm.layout) for cm in c.comms.values()} == {("local", "capacity")}
    assert c.static.capturable
    # the experts of rank 1
    assert c.module.get_submodule("layers.2.experts").expert_ids.tolist() == (
        [4, 5, 6, 7] if world == 2 else [2, 3])


def test_global_routing_gathers_and_goes_packed():
    c = compile_graph(spec("mixtral"), rank=0, world_size=2, device="meta")  # dropless + balance loss
    comm = next(iter(c.comms.values()))
    assert (comm.scope, comm.layout, comm.expert_parallel) == ("global", "packed", True)
    roles = {n.meta.get("role") for n in c.module.graph.nodes}
    assert {"route_gather", "route_local", "a2a_dispatch", "a2a_combine"} <= roles
    assert not c.static.capturable


def test_expert_parallel_one_has_no_all_to_all():
    s = moedsl.load_spec({**spec("switch").data, "placement": {"expert_parallel": 1, "data_parallel": 2}})
    c = compile_graph(s, rank=1, world_size=2, device="meta")
    assert not any(n.meta.get("role", "").startswith("a2a") for n in c.module.graph.nodes)


def test_static_shapes_recorded():
    c = compile_graph(spec("switch"), rank=0, world_size=4, device="meta", batch=(16, 64))
    shapes = c.static.shapes
    # per rank 4 sequences × 64 tokens, 1 group: C = ceil(1.25 · 256 / 8) = 40
    assert shapes["layers_2_dispatch"] == (8, 40, 128)
    assert shapes["layers_2_experts"] == (2, 160, 128)
    dyn = compile_graph(spec("dropless"), device="meta")
    assert not dyn.static.capturable and len(dyn.static.dynamic_layers) == 4


def test_verifier_catches_broken_graphs():
    gm = compile_graph(spec("switch"), device="meta").module
    g = gm.graph
    combine = next(n for n in g.nodes if n.name == "layers_2_combine")
    combine.meta["role"] = "something_else"
    with pytest.raises(GraphError, match="no combine node"):
        verify(g)
    combine.meta["role"] = "combine"
    verify(g)
    fake = [("layers.2", "a2a_dispatch", "capacity", "flat")]
    with pytest.raises(GraphError, match="would hang"):
        verify(g, [(3, fake)])


def test_model_output_and_router_stats():
    model = moedsl.build_model(spec("switch"))
    out = model(torch.randint(0, 256, (2, 32)))
    assert out.output.shape == (2, 32, 256)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    assert len(out.router_stats) == 4
    st = out.router_stats[0]
    assert st.tokens_per_expert.sum() + st.dropped == st.assignments == 64
    assert st.capacity == 4 * 3  # 4 groups of 16 tokens: ceil(1.25 · 16 / 8) = 3


def test_decode_graph_is_one_decode_moe_call_a_layer_reading_one_routing_key_node():
    """compile_decode on one process: each MoE layer's route, dispatch, experts and combine nodes
    are one DecodeMoE call over the model's own gate and experts (fuse decode MoE), every layer
    reads one routing-key node (share token keys), and a static graph keeps its [E, C, d]
    buffers unfused. Each pass run again changes nothing."""
    from moedsl.compiler import compile_decode
    from moedsl.compiler.passes.fuse_decode_moe import fuse_decode_moe
    from moedsl.compiler.passes.share_token_keys import share_token_keys
    from moedsl.kinds.moe import decode_token_keys
    from moedsl.nn import moe_ops
    from moedsl.nn.decode import DecodeMoE

    model = moedsl.build_model(spec("switch"))
    dec = compile_decode(model.spec, model.compiled, model)
    calls = [n for n in dec.graph.nodes if n.op == "call_module" and isinstance(dec.get_submodule(n.target), DecodeMoE)]
    assert [n.meta["moe_layer"] for n in calls] == ["layers.2", "layers.4", "layers.6", "layers.8"]
    for n in calls:
        fused = dec.get_submodule(n.target)
        assert fused.gate is model.get_submodule(f"{n.meta['moe_layer']}.gate")
        assert fused.experts is model.get_submodule(f"{n.meta['moe_layer']}.experts")
    fns = [n.target for n in dec.graph.nodes if n.op == "call_function"]
    assert fns.count(decode_token_keys) == 1 and moe_ops.dispatch_packed not in fns
    assert fuse_decode_moe(dec.graph, {}) == (dec.graph, False) and share_token_keys(dec.graph) == (dec.graph, False)
    static = compile_decode(model.spec, model.compiled, model, static=True)
    fns = [n.target for n in static.graph.nodes if n.op == "call_function"]
    assert fns.count(moe_ops.dispatch) == 4 and fns.count(decode_token_keys) == 1
    assert not any(isinstance(m, DecodeMoE) for m in static.modules())


@pytest.mark.slow
def test_weights_do_not_depend_on_world_size():
    one = dict(moedsl.build_model(spec("switch"), seed=3).named_parameters())
    c = compile_graph(spec("switch"), rank=1, world_size=2, device="cpu", seed=3)
    two = dict(c.module.named_parameters())
    for name, p in two.items():
        if ".experts." in name:
            ids = c.module.get_submodule(name.rsplit(".", 1)[0]).expert_ids
            torch.testing.assert_close(p, one[name][ids])
        else:
            torch.testing.assert_close(p, one[name])


def test_bfloat16_spec_keeps_router_in_float32():
    data = spec("switch").data
    s = moedsl.load_spec({**data, "model": {**data["model"], "dtype": "bfloat16"}})
    model = moedsl.build_model(s)
    assert model.get_submodule("layers.2.experts").w_in.dtype == torch.bfloat16
    out = model(torch.randint(0, 256, (2, 16)))
    assert out.output.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32


def test_compile_cli_shows_all_to_alls_only_with_several_ranks(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--world-size", "4", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert out.count("a2a_dispatch(") == 4 and out.count("a2a_combine(") == 4
    assert "digraph" in dot.read_text() and "#fca5a5" in dot.read_text()
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--world-size", "1"]) == 0
    assert "a2a" not in capsys.readouterr().out


def test_plan_cli_switch_c(capsys):
    assert main(["plan", str(ROOT / "specs" / "switch-c-2048.yaml"), "--json", "--device", "cuda"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params_total"] == pytest.approx(1.571e12, rel=0.01)
    assert plan["world"] == 2048 and plan["expert_parallel"] == 2048
    assert plan["a2a_send_bytes"]["inter"] > 0 and plan["capturable"]


def test_compile_cli_prints_the_packed_graph_a_cpu_run_executes_by_default(capsys):
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "graph of rank 0 of 2 (torch.fx), layout packed (as a CPU run executes)" in out
    assert "dispatch_packed(" in out and "combine_packed(" in out and "ops_dispatch(" not in out
    # the model a CPU run builds has the same nodes
    cpu = moedsl.build_model(spec("switch"))
    assert "dispatch_packed(" in cpu.code


def test_compile_cli_device_cuda_prints_the_padded_graph(capsys):
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--world-size", "2", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "layout padded [E, C, d] (as a GPU run executes)" in out
    assert "ops_dispatch(" in out and "dispatch_packed(" not in out
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--layout", "static"]) == 0
    out = capsys.readouterr().out
    assert "layout padded [E, C, d] (--layout static; a CPU run executes packed)" in out
    assert "ops_dispatch(" in out


def test_plan_json_says_which_layout_and_device(capsys):
    for argv, want in ((["--json"], ("grouped", "cpu", False, "packed")),
                       (["--json", "--device", "cuda"], ("static", "cuda", True, "capacity")),
                       (["--json", "--device", "cuda", "--layout", "grouped"], ("grouped", "cuda", False, "packed"))):
        assert main(["plan", str(ROOT / "specs" / "switch.yaml"), *argv]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["layout"], plan["device"], plan["capturable"], plan["layers"][0]["layout"]) == want
    assert main(["plan", str(ROOT / "specs" / "switch.yaml")]) == 0
    assert "layout packed (as a CPU run executes)" in capsys.readouterr().out


@pytest.mark.slow
def test_forward_on_a_batch_the_routing_groups_do_not_divide_names_the_gate():
    model = moedsl.build_model(spec("switch"))  # routing_groups: 4
    with pytest.raises(ValueError, match=r"^layers\.2\.moe\.gate\.routing_groups = 4 does not divide the batch "
                       r"of 21 sequences × 5 tokens \(105 tokens\)$") as ei:
        model(torch.randint(0, 256, (21, 5)))
    assert isinstance(ei.value, moedsl.MoedslError)
    assert model(torch.randint(0, 256, (2, 32))).output.shape == (2, 32, 256)  # 64 tokens: 4 groups of 16


def test_compile_cli_batch_the_routing_groups_do_not_divide_is_one_line_exit_2(capsys):
    assert main(["plan", str(ROOT / "specs" / "switch.yaml"), "--batch", "21", "--seq", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "layers[1].block[1].moe.gate.routing_groups: routing_groups = 4 does not divide the batch of 21 " \
           "sequences × 5 tokens (105 tokens) (--batch is 21" in err[0]
    assert main(["plan", str(ROOT / "specs" / "switch.yaml"), "--batch", "21"]) == 0  # 21 × 64 tokens: 4 groups
    capsys.readouterr()
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--batch", "8", "--world-size", "4"]) == 0
    capsys.readouterr()


def test_check_batch_returns_every_issue_of_a_batch():
    from moedsl.validate import check_batch

    s = spec("switch")
    assert check_batch(s, 16, 4) == []
    issues = check_batch(s, 6, 4, origin="--batch")
    assert [i.message for i in issues] == ["routing_groups = 4 does not divide the batch of 6 sequences",
                                          "the batch of 6 sequences does not split over 4 processes"]
    assert issues[0].line == 25 and "--batch is 6" in issues[0].hint
    assert check_batch(s, 6, 1, seq=32) == []  # a run's batch: its 192 tokens split into 4 groups
    with pytest.raises(moedsl.SpecError, match="routing_groups = 4 does not divide the batch of 6 sequences × 5"):
        compile_graph(s, world_size=1, batch=(6, 5))


def test_plan_bytes_for_a_static_layer():
    s = spec("switch")
    c = compile_graph(s, rank=0, world_size=4, device="meta", batch=(16, 64))
    plan = make_plan(s, c)
    layer = plan.layers[0]
    # rank 0 sends 6 of 8 experts' buffers (C = 40 slots × 128 × 4 bytes) to 3 ranks, 4 trips per step
    assert layer.send_bytes["intra"] == 4 * 6 * 40 * 128 * 4
    assert plan.params_on_device == plan.params_total - 4 * 6 * (2 * 128 * 256)


def test_compile_errors_are_clear(capsys):
    assert main(["compile", str(ROOT / "specs" / "switch.yaml"), "--world-size", "3"]) == 2
    assert "expert-parallel ranks" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "specs" / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
