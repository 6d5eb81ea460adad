"""``torch.compile`` of the graph's dense segments (runtime/compile.py): the compiled model computes
what the eager one does (outputs, aux loss, router statistics, gradients, the gates' state), on one
process and on two, with the MoE layers' routing, dispatch, experts, combine and collectives eager."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moedsl.api import build_model, load_spec
from moedsl.errors import MoedslError
from moedsl.runtime.compile import compile_model, decide, is_dense, schedule, segments

ROOT = Path(__file__).resolve().parents[1]

# a dropless top-2 layer with a balancing bias (state in buffers) and a capacity layer with drops
SPEC = {
    "moedsl": 1, "name": "compile-tiny",
    "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 16, "norm": "rmsnorm"},
    "layers": [
        {"embedding": {}},
        {"attention": {"heads": 4, "kv_heads": 2, "positions": "rotary"}},
        {"moe": {"experts": {"count": 4, "hidden": 24, "activation": "swiglu"},
                 "gate": {"type": "topk", "k": 2, "drop_policy": "dropless", "bias_balancing": {"rate": 0.01}},
                 "losses": {"balance": 0.01}}},
        {"attention": {"heads": 4, "kv_heads": 2, "positions": "rotary"}},
        {"moe": {"experts": {"count": 4, "hidden": 24, "activation": "gelu"},
                 "gate": {"type": "switch", "capacity_factor": 1.0}, "losses": {"balance": 0.01}}},
        {"norm": {}},
        {"head": {}},
    ],
    "train": {"batch_size": 4, "seq_len": 16, "steps": 2},
}


def _run(model, tokens):
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.output.flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    return out


@pytest.fixture(scope="module")
def pair():
    """An eager model and a compiled one with the same weights, after two training forwards and
    backwards of the same batches (one compilation, shared by the tests below)."""
    spec = load_spec(SPEC)
    eager, compiled = build_model(spec), build_model(spec, compile=True)
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(2):
        tokens = torch.randint(0, 64, (4, 16), generator=g)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
        outs.append((_run(eager, tokens), _run(compiled, tokens)))
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return eager, compiled, outs, breaks


@pytest.mark.slow
def test_compiled_model_matches_eager_outputs_aux_loss_router_stats_and_gradients(pair):
    eager, compiled, outs, _ = pair
    for a, b in outs:
        torch.testing.assert_close(b.output, a.output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.aux_loss, a.aux_loss, atol=1e-6, rtol=1e-6)
        assert len(a.router_stats) == len(b.router_stats) == 2
        for s, t in zip(a.router_stats, b.router_stats):
            assert torch.equal(s.tokens_per_expert, t.tokens_per_expert)
            assert torch.equal(s.expert_load, t.expert_load) and torch.equal(s.dropped, t.dropped)
    assert int(outs[0][0].router_stats[1].dropped) > 0  # the capacity layer dropped: its path was exercised
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
    # the gates' state kept updating in the eager MoE nodes: noise counters, the balancing load
    buffers = dict(compiled.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=name)
    assert int(buffers["layers.2.gate.rng_step"]) == 2 and float(buffers["layers.2.gate.load_acc"].sum()) > 0


def test_compiled_segments_have_no_graph_breaks_and_leave_the_model_as_built(pair):
    eager, compiled, _, breaks = pair
    state = compiled.compile_state
    assert state.failed is None and state.segments == 3 and state.compiled == {0, 1, 2}
    assert breaks == 0
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n.name for n in compiled.graph.nodes] == [n.name for n in eager.graph.nodes]
    # without gradients (evaluation) the segments run eagerly: nothing compiles again
    graphs = dict(torch._dynamo.utils.counters["stats"])
    with torch.no_grad():
        tokens = torch.randint(0, 64, (2, 16))
        torch.testing.assert_close(compiled(tokens).output, eager(tokens).output, atol=1e-5, rtol=1e-5)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


def test_dense_segments_span_from_one_moe_combine_to_the_next_router():
    model = build_model(load_spec(SPEC), device="meta")
    segs = segments(schedule(model))
    names = [[n.name for n in s.nodes] for s in segs]
    assert names[0] == ["embedding", "layers_1_attention", "layers_1_residual", "layers_2_norm"] or \
        names[0][0] == "embedding"
    for seg in segs:
        assert all(is_dense(n) for n in seg.nodes)
        assert not any(n.meta.get("role") in ("route", "dispatch", "experts", "combine") for n in seg.nodes)
    # the MoE output's reshape joins the next segment rather than being left alone between eager nodes
    assert any("layers_2_unflatten" in s and "layers_3_attention" in s for s in names)


def test_a_failed_compilation_falls_back_to_eager_in_auto_mode_and_raises_in_on_mode(monkeypatch):
    """No real compilation here: torch.compile is replaced by one whose first call fails."""
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("inductor could not build a kernel")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    spec = load_spec(SPEC)
    tokens = torch.randint(0, 64, (2, 16))
    said = []
    model = build_model(spec)
    ref = build_model(spec)(tokens).output
    state = compile_model(model, "auto", said.append)
    with pytest.raises(IndexError):  # an error of the computation itself is not taken for a compile failure
        model(tokens + 64)
    assert state.failed is None and not said
    torch.testing.assert_close(model(tokens).output, ref)
    assert state.failed and len(said) == 1
    assert said[0] == "torch.compile failed (RuntimeError: inductor could not build a kernel); running eager"
    model = build_model(spec, compile=True)  # `on`
    with pytest.raises(MoedslError, match="--compile on: torch.compile of dense segment 0 failed"):
        model(tokens)


def test_auto_compiles_only_runs_long_enough_to_repay_the_compilation():
    from moedsl.runtime.compile import WARMUP_S, projected_saving

    cpu = torch.device("cpu")
    assert decide("on", cpu) and not decide("off", cpu)
    model = build_model(load_spec(SPEC), device="meta")
    assert not decide("auto", cpu, model, tokens=64, steps=2)  # a test's run: compiling costs more than it saves
    long = 10 * int(2 * WARMUP_S / projected_saving(model, 64, 32, 1))
    assert decide("auto", cpu, model, tokens=64, steps=long)
    assert not decide("auto", "cuda", model, tokens=64, steps=long)  # not measured on a GPU: off
    # the README's quick start (specs/mixtral.yaml, 200 steps of 16 × 64 tokens) runs eager
    quick = build_model(load_spec(ROOT / "specs" / "mixtral.yaml"), device="meta")
    assert not decide("auto", cpu, quick, tokens=16 * 64, steps=200)
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        decide("yes", torch.device("cpu"))


@pytest.mark.slow
def test_trainer_with_compile_on_trains_as_eager(pair, capsys):
    """Two steps of ``RunOptions.compile`` on and off from the same weights: the same losses and
    gradient norms (the fixture's compilation of these shapes is in inductor's cache by now)."""
    from moedsl.runtime.train import RunOptions, Trainer

    spec = load_spec(SPEC)
    losses = {}
    for mode in ("off", "on"):
        t = Trainer(spec, RunOptions.from_spec(spec, device="cpu", data="synthetic", compile=mode, progress=True))
        batch = t.source.batch(0, 4, 16, 0, 1)
        losses[mode] = [(float(o.loss), float(o.grad_norm)) for o in (t.step(batch, 1e-3) for _ in range(2))]
        assert t.compile_on == (mode == "on")
    assert "torch.compile on: 3 dense segments" in capsys.readouterr().out
    for (a, ga), (b, gb) in zip(losses["off"], losses["on"]):
        assert abs(a - b) < 1e-5 and abs(ga - gb) < 1e-4 * ga


@pytest.mark.slow
def test_compiled_processes_equal_one_eager_process():
    """Two gloo processes with compiled dense segments against the single eager process:
    outputs, aux loss, every gradient, router counts (runtime/equivalence.py)."""
    from moedsl.runtime.equivalence import check

    spec = copy.deepcopy(SPEC)
    for d in check(spec, 2, batch=4, seq=8, compile=True):
        assert d.ok(), d
