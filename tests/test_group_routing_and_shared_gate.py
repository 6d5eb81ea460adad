"""The spec options for the MoE blocks of Hugging Face families: group-limited routing
(``gate.groups``), the routed scale (``gate.scale``), a fixed choice bias
(``bias_balancing: {rate: 0}``) and the gated shared expert (``experts.shared.gate``):
their located errors, the bias kept in checkpoints and never moved where it must not be,
and expert parallelism. Their computations against transformers are in test_hf_moe_blocks.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moedsl
from moedsl.errors import SpecError, format_path
from moedsl.params import count_parameters
from moedsl.runtime import checkpoint as ckpt
from moedsl.runtime.equivalence import check
from moedsl.runtime.train import RunOptions, Trainer

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
moedsl: 1
name: groups
model: {{input: vectors, d_model: 8, max_seq_len: 16}}
layers:
  - moe:
      experts: {{count: {E}, hidden: 8, shared: {{count: 1, gate: {shared_gate}}}}}
      gate: {gate}
train: {{batch_size: 4, seq_len: 8}}
"""


def load(gate: str, E: int = 8, shared_gate: str = "true"):
    return moedsl.load_spec(SPEC.format(gate=gate, E=E, shared_gate=shared_gate))


def errors(gate: str, E: int = 8, shared_gate: str = "true") -> dict:
    """{json path: (line, column, message)} of every issue."""
    with pytest.raises(SpecError) as ei:
        load(gate, E, shared_gate)
    return {format_path(i.path): (i.line, i.column, i.message) for i in ei.value.issues}


G = "layers[0].moe.gate"


@pytest.mark.parametrize("gate,where,says", [
    ("{type: topk, k: 2, groups: {count: 3, top: 1}}", f"{G}.groups.count", "does not divide the 8 experts"),
    ("{type: topk, k: 2, groups: {count: 8, top: 2}}", f"{G}.groups.count", "leaves 1 expert per group"),
    ("{type: topk, k: 2, groups: {count: 4, top: 5}}", f"{G}.groups.top", "groups.top = 5 exceeds the 4 groups"),
    ("{type: topk, k: 5, groups: {count: 4, top: 2}}", f"{G}.k", "k = 5 exceeds the 4 experts of the 2 eligible"),
    ("{type: switch, groups: {count: 4, top: 2}}", f"{G}.groups", "'groups' does not apply to a switch gate"),
    ("{type: gshard, scale: 2.5}", f"{G}.scale", "'scale' does not apply to a gshard gate"),
    ("{type: topk, k: 2, scale: 0}", f"{G}.scale", "must be > 0"),
    ("{type: topk, k: 2, groups: {count: 4}}", f"{G}.groups", "'top'"),
    ("{type: topk, k: 2, bias_balancing: {rate: -0.1}}", f"{G}.bias_balancing.rate", "must be >= 0"),
])
def test_group_and_scale_mistakes_are_located(gate, where, says):
    found = errors(gate)
    assert where in found, found
    line, column, message = found[where]
    assert line == 7 and column > 1 and says in message


def test_shared_gate_must_be_a_boolean_and_is_located():
    found = errors("{type: topk, k: 2}", shared_gate="1")
    where = "layers[0].moe.experts.shared.gate"
    assert where in found and found[where][0] == 6


def test_group_options_resolve_into_the_gate():
    spec = load("{type: topk, k: 3, score: sigmoid, scale: 2.5, groups: {count: 4, top: 2}, "
                "bias_balancing: {rate: 0}}", E=12)
    moe = spec.moe_layers[0].config
    assert (moe.gate.groups.count, moe.gate.groups.top, moe.gate.scale) == (4, 2, 2.5)
    assert moe.gate.bias_balancing_rate == 0 and moe.experts.shared.gate
    plain = load("{type: topk, k: 2}", shared_gate="false").moe_layers[0].config
    assert plain.gate.groups is None and plain.gate.scale == 1.0 and not plain.experts.shared.gate


def test_gated_shared_expert_is_counted_and_named():
    spec = load("{type: topk, k: 2}")
    model = moedsl.build_model(spec)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if ".shared." in n}
    assert shapes["layers.0.shared.gate.weight"] == (1, 8)
    ungated = load("{type: topk, k: 2}", shared_gate="false")
    total, active = count_parameters(spec)
    assert (total, active) == tuple(n + 8 for n in count_parameters(ungated))  # w [1, d], no bias, every token


def test_a_fixed_choice_bias_is_saved_and_not_moved_by_training(tmp_path):
    """bias_balancing: {rate: 0} (an imported DeepSeek-V3's e_score_correction_bias): it chooses,
    it is in the checkpoint, and training steps leave it as loaded."""
    spec = load("{type: topk, k: 2, score: sigmoid, groups: {count: 4, top: 2}, bias_balancing: {rate: 0}}")
    bias = torch.linspace(-0.2, 0.2, 8)
    trainer = Trainer(spec, RunOptions.from_spec(spec, steps=2, out=tmp_path, progress=False))
    trainer.model.get_buffer("layers.0.gate.expert_bias").copy_(bias)  # as an import would
    trainer.fit()
    assert torch.equal(trainer.model.get_buffer("layers.0.gate.expert_bias"), bias)
    loaded = moedsl.build_model(spec)
    ckpt.load(ckpt.latest(tmp_path / "checkpoints"), loaded, None, spec)
    assert torch.equal(loaded.get_buffer("layers.0.gate.expert_bias"), bias)


def test_the_balancing_bias_does_not_move_in_eval_mode():
    spec = load("{type: topk, k: 2, score: sigmoid, groups: {count: 4, top: 2}, bias_balancing: {rate: 0.1}}")
    model = moedsl.build_model(spec).eval()
    gate = model.get_submodule("layers.0.gate")
    with torch.no_grad():
        model(torch.randn(4, 8, 8))
    gate.balance_step()
    assert not gate.expert_bias.any()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 8, 8))
    gate.balance_step()
    assert gate.expert_bias.any()  # the same calls in training do move it


def test_scale_multiplies_the_routed_weights_only():
    """scale = 2.5: the routed part of the output × 2.5, the shared expert's unchanged."""
    x = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs, models = {}, {}
    for scale in (1.0, 2.5):
        spec = load(f"{{type: topk, k: 2, scale: {scale}, groups: {{count: 4, top: 2}}}}", shared_gate="false")
        models[scale] = moedsl.build_model(spec, seed=1).eval()  # the same weights: a function of the seed
        with torch.no_grad():
            outs[scale] = models[scale](x).output
    with torch.no_grad():
        sh = models[1.0].get_submodule("layers.0.shared")(models[1.0].get_submodule("layers.0.norm")(x))
    routed = outs[1.0] - x - sh  # the output is residual + routed + shared
    assert routed.abs().max() > 0.01
    torch.testing.assert_close(outs[2.5], x + sh + 2.5 * routed, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_new_example_specs_equal_single_process_on_two_ranks():
    """Group-limited routing with its bias, and the gated shared expert (a replicated parameter,
    its gradient summed over the ranks), under expert parallelism: a training step's outputs and
    every gradient. ~6 s: two gloo runs (the only test that trains these two specs)."""
    names = ["deepseek-v3-routing", "qwen2-moe"]
    results = check([ROOT / "specs" / f"{n}.yaml" for n in names], 2)
    for name, per_rank in zip(names, results):
        for diff in per_rank:
            assert diff.ok(), f"{name}: {diff}"

