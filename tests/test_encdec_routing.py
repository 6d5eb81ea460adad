"""The gate options Switch and NLLB-MoE need compute what transformers' own modules compute.

A tiny float32 SwitchTransformersSparseMLP (modeling_switch_transformers.py: Top1Router, capacity
counted per sequence) or NllbMoeTop2Router with its NllbMoeExperts (modeling_nllb_moe.py) gets
random weights, which ``moedsl.nn.hf_moe.encdec_moe_state_dict`` copies into a one-MoE-layer spec
over bare vectors; both run on the same random tokens, in training and in evaluation, with a
capacity that drops, over batches whose rows route differently: the same experts kept and dropped
for every token, the same weights, outputs within 1e-5 of the largest.

transformers 5.25's NllbMoeSparseMLP.forward does not compute what its router decides: it hands
the router's [tokens, experts] 0/1 mask to NllbMoeExperts, which one-hot encodes it again, so
every token is computed by expert_1 (weight g1) and expert_0 (weight g2) whatever it chose
(``test_installed_nllb_sparse_mlp_computes_experts_0_and_1_whatever_the_router_chose``). The NLLB
reference below is therefore its router's decisions and its own expert modules, combined as the
router means them (transformers 4.x NllbMoeSparseMLP and fairseq's MOELayer): each token's sum
over experts of combine weight × expert output, times (1 − moe_token_dropout) in evaluation.

The random draws (Gumbel sampling of the second expert, GShard's random keep, token dropout)
come from moedsl's counter-based RNG, not torch's global stream, so they are compared by their
distributions: the frequencies over thousands of tokens against the probabilities the papers
state, and transformers' own frequencies against the same.
"""
from __future__ import annotations

import math

import pytest
import torch

import moedsl
from moedsl.errors import SpecError, format_path
from moedsl.nn.hf_moe import encdec_moe_state_dict

transformers = pytest.importorskip("transformers")
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeConfig, NllbMoeSparseMLP  # noqa: E402
from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersConfig, SwitchTransformersSparseMLP)

D, H = 16, 24
B, T = 3, 7  # 21 tokens


# ----------------------------------------------------------------------------- building

def vectors_spec(moe: dict, batch: int = B, **model) -> dict:
    """A spec of one MoE sublayer over bare vectors, without its residual and pre-norm: the block alone."""
    return {"moedsl": 1, "name": "encdec-block",
            "model": {"input": "vectors", "d_model": D, "max_seq_len": 4096, **model},
            "layers": [{"moe": {**moe, "residual": False, "prenorm": False}}], "train": {"batch_size": batch}}


def randomize(module: torch.nn.Module, seed: int, router_std: float = 1.0) -> None:
    """Every parameter N(0, 0.5²), the router's N(0, router_std²): choices far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (router_std if "router" in name else 0.5))


def load(spec: dict, block: torch.nn.Module, family: str):
    model = moedsl.build_model(moedsl.load_spec(spec), seed=0)
    ours = {f"layers.0.{k}": v for k, v in encdec_moe_state_dict(block.state_dict(), family).items()}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    params = {n for n, _ in model.named_parameters()}
    assert not params & set(missing), f"parameters left at their init: {sorted(params & set(missing))}"
    return model


def tokens(seed: int, batch: int = B, seq: int = T) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(100 + seed))


def run(model, x: torch.Tensor, padding: torch.Tensor | None = None):
    """(output [B, T, D], the layer's Routing). ``padding`` [B, T] (True: not padding) reaches the
    gate as the enc-dec graph's source mask will (``LowerContext.padding``): here by a hook."""
    gate = model.get_submodule("layers.0.gate")
    seen = []
    hooks = [gate.register_forward_hook(lambda m, a, out: seen.append(out))]
    if padding is not None:
        hooks.append(gate.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "padding": padding.reshape(-1)}), with_kwargs=True))
    with torch.no_grad():
        out = model(x).output
    for h in hooks:
        h.remove()
    return out, seen[-1]


def dense_weights(r, E: int) -> torch.Tensor:
    """[S, E]: each token's weight per expert (0 where not chosen or dropped)."""
    w = torch.zeros(r.num_tokens, E)
    return w.index_put_((r.token, r.expert), r.weight.float(), accumulate=True)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max()
    assert scale > 0
    assert (out - ref).abs().max() <= 1e-5 * scale, f"max |diff| {(out - ref).abs().max():.3g} vs {scale:.3g}"


# ----------------------------------------------------------------------------- Switch

def switch_block(E: int, capacity: int, seed: int = 1) -> SwitchTransformersSparseMLP:
    cfg = SwitchTransformersConfig(d_model=D, d_ff=H, num_experts=E, expert_capacity=capacity,
                                   router_jitter_noise=0.0, dropout_rate=0.0, dense_act_fn="relu")
    block = SwitchTransformersSparseMLP(cfg)
    randomize(block, seed)
    return block


def switch_spec(E: int, gate: dict, batch: int = B) -> dict:
    return vectors_spec({"experts": {"count": E, "hidden": H, "activation": "relu"},
                         "gate": {"type": "switch", "jitter": 0, **gate}}, batch)


def whole_batch_kept(expert: torch.Tensor, E: int, capacity: int) -> torch.Tensor:
    """[S] kept if the batch were one routing group: the first `capacity` tokens of each expert."""
    onehot = torch.nn.functional.one_hot(expert, E)
    return ((torch.cumsum(onehot, 0) <= capacity) & onehot.bool()).any(-1)


@pytest.mark.parametrize("training", [True, False])
def test_switch_gate_with_expert_capacity_per_sequence_matches_switch_transformers_sparse_mlp(training):
    E, C = 4, 2
    block = switch_block(E, C).train(training)
    model = load(switch_spec(E, {"expert_capacity": C, "routing_groups": "sequence"}), block,
                 "switch_transformers").train(training)
    x = tokens(1)
    with torch.no_grad():
        ref = block(x.clone())
        index, _, logits = block.router(x.clone())
    out, r = run(model, x)
    hf_expert = logits.argmax(-1).reshape(-1)
    hf_kept = index.reshape(-1, E).any(-1)
    assert torch.equal(r.expert, hf_expert), "a token chose another expert"
    assert torch.equal(r.slot >= 0, hf_kept), "another token was dropped"
    assert (~hf_kept).sum() > 0, "nothing dropped: the capacity is not exercised"
    # the capacity is each sequence's: routed as one group of 21 tokens, others would be dropped
    assert not torch.equal(hf_kept, whole_batch_kept(hf_expert, E, C))
    assert hf_expert.view(B, T).unique(dim=0).shape[0] == B, "the rows should route differently"
    assert_close_to(out, ref)
    assert torch.all(out.reshape(-1, D)[~hf_kept] == 0), "a dropped token's MoE output is 0 (the residual carries it)"


def test_switch_gate_routes_each_sequence_alone_whatever_the_batch():
    E, C = 4, 2
    block = switch_block(E, C, seed=3)
    model = load(switch_spec(E, {"expert_capacity": C, "routing_groups": "sequence"}), block, "switch_transformers")
    x = tokens(3, batch=5)
    whole, r = run(model.eval(), x)
    assert int(r.dropped) > 0
    for b in range(5):  # 5 rows, and each alone: a row's routing does not depend on the others
        alone, a = run(model, x[b:b + 1])
        rows = slice(b * T, (b + 1) * T)
        assert torch.equal(r.expert[rows], a.expert) and torch.equal(r.slot[rows] >= 0, a.slot >= 0)
        assert_close_to(whole[b:b + 1], alone)


def test_dropped_token_passes_as_router_probability_times_input_with_scaled_input():
    """The transformers SwitchTransformersSparseMLP before dropped tokens were zeroed (4.x):
    ``next_states = hidden_states.clone()``; the experts overwrite the rows they took;
    ``hidden_states = router_probs * next_states``: a dropped token comes out as p·x."""
    E, C = 4, 2
    block = switch_block(E, C).eval()
    model = load(switch_spec(E, {"expert_capacity": C, "routing_groups": "sequence",
                                 "dropped_tokens": "scaled_input"}), block, "switch_transformers").eval()
    x = tokens(4)
    with torch.no_grad():
        index, probs, _ = block.router(x.clone())
        xf, mask, p = x.reshape(-1, D), index.reshape(-1, E).bool(), probs.reshape(-1, 1)
        next_states = xf.clone()
        for e in range(E):
            rows = mask[:, e]
            next_states[rows] = block.experts[f"expert_{e}"](xf[rows])
        old = (p * next_states).view(B, T, D)
    out, _ = run(model, x)
    assert (~mask.any(-1)).sum() > 0, "nothing dropped"
    assert_close_to(out, old)


def test_never_drops_equals_switch_transformers_with_room_for_every_token():
    E = 4
    block = switch_block(E, capacity=T, seed=5).eval()  # room for every token of a sequence
    model = load(switch_spec(E, {"dropped_tokens": "never"}), block, "switch_transformers").eval()
    assert model.get_submodule("layers.0.gate").spec.drop_policy == "dropless"
    x = tokens(5)
    with torch.no_grad():
        ref = block(x.clone())
    out, r = run(model, x)
    assert int(r.dropped) == 0
    assert_close_to(out, ref)


# ----------------------------------------------------------------------------- NLLB-MoE

def nllb_block(E: int, seed: int = 2, **cfg) -> NllbMoeSparseMLP:
    config = NllbMoeConfig(d_model=D, num_experts=E, encoder_ffn_dim=H, activation_function="relu",
                           activation_dropout=0.0, **{"moe_token_dropout": 0.0, **cfg})
    block = NllbMoeSparseMLP(config, H)
    randomize(block, seed)
    return block


def nllb_reference(block: NllbMoeSparseMLP, x: torch.Tensor, padding_mask=None):
    """(output [B, T, D], combine weights [S, E]): the router's decisions, each token's sum of
    weight × expert output (transformers 4.x NllbMoeSparseMLP, fairseq's MOELayer), × (1 − p) in
    evaluation (moe_token_dropout)."""
    xf = x.reshape(-1, D)
    with torch.no_grad():
        _, weights, _ = block.router(xf.clone(), padding_mask)
        out = sum(weights[:, e, None] * block.experts[f"expert_{e}"](xf) for e in range(block.num_experts))
        p = block.experts.moe_token_dropout
        if p and not block.training:
            out = out * (1 - p)
    return out.view(x.shape), weights


def nllb_spec(E: int, gate: dict, experts: dict | None = None, batch: int = B) -> dict:
    return vectors_spec({"experts": {"count": E, "hidden": H, "activation": "relu", "bias": True, **(experts or {})},
                         "gate": {"type": "gshard", "jitter": 0, **gate}}, batch)


def nllb_gate(before: bool, prioritized: bool, **more) -> dict:
    """The gate options of NllbMoeConfig's (second_expert_policy all)."""
    return {"second_expert": "always", "normalize": True, "normalize_after_drops": not before,
            "drop_priority": "score" if prioritized else "position", **more}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("before,prioritized", [(False, False), (True, False), (False, True), (True, True)])
def test_gshard_gate_with_nllb_options_matches_nllb_moe_top2_router(training, before, prioritized):
    E, C, fraction = 4, 5, 0.3  # evaluation: ceil(0.3 · 21) = 7 slots
    block = nllb_block(E, expert_capacity=C, normalize_router_prob_before_dropping=before,
                       batch_prioritized_routing=prioritized, moe_eval_capacity_token_fraction=fraction,
                       moe_token_dropout=0.0 if training else 0.2).train(training)
    spec = nllb_spec(E, nllb_gate(before, prioritized, expert_capacity=C, eval_capacity_fraction=fraction),
                     {"token_dropout": 0.0 if training else 0.2})
    model = load(spec, block, "nllb_moe").train(training)
    x = tokens(6)
    ref, hf_weights = nllb_reference(block, x)
    out, r = run(model, x)
    assert int(r.dropped) > 0, "nothing dropped: the capacity is not exercised"
    torch.testing.assert_close(dense_weights(r, E), hf_weights, rtol=1e-6, atol=1e-6)
    assert_close_to(out, ref)


def test_nllb_default_capacity_is_twice_the_ceiling_of_tokens_over_experts():
    """NllbMoeTop2Router with expert_capacity None: 2 · ceil(21 / 8) = 6 (fairseq's top2gating)."""
    E = 8
    block = nllb_block(E, seed=7, expert_capacity=1).train()
    block.router.expert_capacity = None  # 5.25's config wants an int; the router takes None
    spec = nllb_spec(E, nllb_gate(False, False, capacity_factor=1.0, capacity_rounding="ceil_per_choice"))
    model = load(spec, block, "nllb_moe").train()
    x = tokens(7)
    ref, hf_weights = nllb_reference(block, x)
    assert block.router.expert_capacity == 6
    out, r = run(model, x)
    assert int(r.dropped) > 0 and r.capacity == 6
    torch.testing.assert_close(dense_weights(r, E), hf_weights, rtol=1e-6, atol=1e-6)
    assert_close_to(out, ref)


def test_padding_takes_no_expert_and_still_counts_in_the_capacity_as_in_nllb_moe():
    E, fraction = 4, 0.3  # evaluation: ceil(0.3 · 21 tokens, padding included) = 7 slots, not ceil(0.3 · 15)
    block = nllb_block(E, seed=8, expert_capacity=5, moe_eval_capacity_token_fraction=fraction,
                       batch_prioritized_routing=True).eval()
    lengths = torch.tensor([7, 5, 3])
    real = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    # the encoder's additive attention mask [B, 1, T, T], as NllbMoeEncoderLayer hands it to the MLP
    additive = torch.zeros(B, 1, T, T).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    spec = nllb_spec(E, nllb_gate(False, True, expert_capacity=5, eval_capacity_fraction=fraction,
                                  route_padding=False))
    model = load(spec, block, "nllb_moe").eval()
    x = tokens(8)
    ref, hf_weights = nllb_reference(block, x, additive)
    out, r = run(model, x, padding=real)
    assert int(r.dropped) > 0
    assert torch.all(hf_weights[~real.reshape(-1)] == 0)
    torch.testing.assert_close(dense_weights(r, E), hf_weights, rtol=1e-6, atol=1e-6)
    assert_close_to(out, ref)
    assert torch.all(out[~real] == 0), "padding's MoE output is 0"


def test_installed_nllb_sparse_mlp_computes_experts_0_and_1_whatever_the_router_chose():
    """Why the NLLB reference is the router plus the experts, not NllbMoeSparseMLP.forward: in
    transformers 5.25 it computes expert_1 weighted by g1 and expert_0 weighted by g2 for every
    token. When a release fixes it, this fails: compare with the module's forward from then on."""
    block = nllb_block(4, seed=9, expert_capacity=64).eval()
    x = tokens(9)
    xf = x.reshape(-1, D)
    with torch.no_grad():
        got = block(x.clone()).reshape(-1, D)
        top1, weights, _ = block.router(xf.clone())
        g1 = (weights * top1).sum(-1, keepdim=True)
        g2 = (weights * (1 - top1)).sum(-1, keepdim=True)
        swapped = g1 * block.experts["expert_1"](xf) + g2 * block.experts["expert_0"](xf)
        meant, _ = nllb_reference(block, x)
    assert_close_to(got, swapped)
    assert (got - meant.reshape(-1, D)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- random draws

N_DRAWS = 4000


def one_token_many_times(seed: int) -> torch.Tensor:
    """[1, N_DRAWS, D]: the same token N_DRAWS times, so the routing's draws are samples of one law."""
    return tokens(seed, batch=1, seq=1).expand(1, N_DRAWS, D).contiguous()


def second_choice_frequencies(weights: torch.Tensor, first: int, E: int) -> torch.Tensor:
    """[E] how often each expert is the second choice (a non-zero weight besides ``first``)."""
    w = weights.clone()
    w[:, first] = 0
    return (w > 0).float().sum(0) / weights.shape[0]


def test_sampling_draws_the_second_expert_from_the_softmax_over_the_others_as_nllb_moe():
    E = 4
    block = nllb_block(E, seed=10, router_std=1.0, expert_capacity=N_DRAWS,
                       second_expert_policy="sampling").train()
    with torch.no_grad():
        block.router.classifier.weight.mul_(0.1)  # a flat router: every second choice is likely
    model = load(nllb_spec(E, {"second_expert": "sampling", "normalize": True, "normalize_after_drops": True,
                               "expert_capacity": N_DRAWS}, batch=1), block, "nllb_moe").train()
    x = one_token_many_times(10)
    logits = block.router.classifier(x[0, :1]).double()[0]
    p = torch.softmax(logits, -1)
    first = int(p.argmax())
    expected = p / (1 - p[first])
    expected[first] = 0
    _, r = run(model, x)
    torch.manual_seed(0)
    _, hf_weights = nllb_reference(block, x)
    ours = second_choice_frequencies(dense_weights(r, E), first, E)
    theirs = second_choice_frequencies(hf_weights, first, E)
    assert expected[expected > 0].min() > 0.1
    for got in (ours, theirs):  # 5 standard deviations of a frequency over 4000 draws: < 0.04
        assert (got.double() - expected).abs().max() < 0.04, (got, expected)
    # each token's two weights: its two probabilities over their sum (nothing dropped)
    w = dense_weights(r, E)[0]
    second = int((w > 0).nonzero().flatten()[(w > 0).nonzero().flatten() != first][0])
    torch.testing.assert_close(w[[first, second]].double(), p[[first, second]] / (p[first] + p[second]),
                               rtol=1e-5, atol=1e-6)


def test_random_policy_keeps_the_second_expert_with_twice_its_raw_probability_as_nllb_moe():
    """NllbMoeTop2Router (second_expert_policy random, normalising after the drops): kept when
    2·p2 > U(0, 1), p2 the second expert's raw probability, not p2 / (p1 + p2)."""
    E = 4
    block = nllb_block(E, seed=11, expert_capacity=N_DRAWS, second_expert_policy="random").train()
    with torch.no_grad():
        block.router.classifier.weight.mul_(0.1)  # p2 near 1/4: 2·p2 far from 2·p2 / (p1 + p2)
    model = load(nllb_spec(E, {"second_expert": "random", "normalize": True, "normalize_after_drops": True,
                               "expert_capacity": N_DRAWS}, batch=1), block, "nllb_moe").train()
    x = one_token_many_times(11)
    p = torch.softmax(block.router.classifier(x[0, :1]).double()[0], -1)
    p2 = p.sort(descending=True).values[1]
    assert 0.1 < 2 * p2 < 0.9 and abs(2 * p2 - min(1.0, 2 * p2 / (p.max() + p2))) > 0.1
    _, r = run(model, x)
    torch.manual_seed(0)
    _, hf_weights = nllb_reference(block, x)
    for w in (dense_weights(r, E), hf_weights):
        kept = ((w > 0).sum(-1) == 2).double().mean()
        assert abs(kept - 2 * p2) < 0.04, (kept, 2 * p2)


def test_token_dropout_drops_whole_output_elements_in_training_and_scales_in_evaluation():
    E, p = 4, 0.5
    block = nllb_block(E, seed=12, expert_capacity=64, moe_token_dropout=p)
    model = load(nllb_spec(E, nllb_gate(False, False, expert_capacity=64), {"token_dropout": p}), block,
                 "nllb_moe")
    x = tokens(12)
    # evaluation: every routed output × (1 − p), as NllbMoeExperts
    ref, _ = nllb_reference(block.eval(), x)
    out, _ = run(model.eval(), x)
    assert_close_to(out, ref)
    # training: each element of each expert's weighted output is 0 or / (1 − p); with one kept
    # expert per token (the second's weight set to 0 by the capacity) an element is 0 or ref / (1 − p)
    one = load(nllb_spec(E, nllb_gate(False, False, expert_capacity=64), {"token_dropout": p}), block, "nllb_moe")
    gate = one.get_submodule("layers.0.gate")
    gate.spec = type(gate.spec)(**{**gate.spec.__dict__, "second_expert": "random"})
    torch.manual_seed(0)
    out, r = run(one.train(), x)
    w = dense_weights(r, E)
    single = (w > 0).sum(-1) == 1
    assert single.sum() > 3
    base = torch.stack([block.experts[f"expert_{int(e)}"](x.reshape(-1, D)[i]) for i, e in
                        enumerate(w.argmax(-1))]).detach()[single]  # weight 1: normalised over the one kept
    got = out.reshape(-1, D)[single]
    zero, kept = got == 0, torch.isclose(got, base / (1 - p), rtol=1e-5, atol=1e-6)
    assert torch.all(zero | kept)
    assert abs(zero.float().mean() - p) < 0.1


# ----------------------------------------------------------------------------- bfloat16

def separated_tokens(block, seed: int) -> torch.Tensor:
    """[B, T, D] tokens whose three largest router logits are at least 1 apart in float32 (bfloat16
    rounds logits of this size by about 0.05): well-separated choices, first and second."""
    candidates = tokens(seed, batch=1, seq=40 * B * T)[0]
    with torch.no_grad():
        top = block.router.classifier(candidates).topk(3).values
    ok = ((top[:, 0] - top[:, 1]) > 1) & ((top[:, 1] - top[:, 2]) > 1)
    assert ok.sum() >= B * T
    return candidates[ok][:B * T].reshape(B, T, D)


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_the_new_options_keep_their_drop_decisions_under_bfloat16_autocast(family):
    E = 4
    if family == "switch_transformers":
        block = switch_block(E, 2, seed=13)
        spec = switch_spec(E, {"expert_capacity": 2, "routing_groups": "sequence", "dropped_tokens": "scaled_input"})
    else:
        block = nllb_block(E, seed=13, expert_capacity=5)
        spec = nllb_spec(E, nllb_gate(False, True, expert_capacity=5, eval_capacity_fraction=0.3),
                         {"token_dropout": 0.1})
    spec["model"]["router_dtype"] = "bfloat16"
    model = load(spec, block, family).eval()
    x = separated_tokens(block, 13)
    out32, r32 = run(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, r16 = run(model, x)
    assert int(r32.dropped) > 0
    assert torch.equal(r16.expert, r32.expert) and torch.equal(r16.slot >= 0, r32.slot >= 0)
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.05 * float(out32.abs().max()))


# ----------------------------------------------------------------------------- spec mistakes

@pytest.mark.parametrize("gate,where,says", [
    ({"type": "switch", "expert_capacity": 4, "capacity_factor": 1.25}, "expert_capacity",
     "expert_capacity and capacity_factor both set the capacity"),
    ({"type": "switch", "drop_policy": "dropless", "dropped_tokens": "scaled_input"}, "dropped_tokens",
     "scaled_input needs a capacity"),
    ({"type": "switch", "drop_policy": "drop", "dropped_tokens": "never"}, "dropped_tokens",
     "never conflicts with drop_policy: drop"),
    ({"type": "switch", "drop_policy": "dropless", "expert_capacity": 4}, "expert_capacity",
     "conflicts with dropless routing"),
    ({"type": "gshard", "normalize": False, "normalize_after_drops": True}, "normalize_after_drops",
     "needs normalize: true"),
    ({"type": "switch", "normalize_after_drops": True}, "normalize_after_drops", "does not apply to a switch gate"),
    ({"type": "switch", "routing_groups": "sentence"}, "routing_groups",
     "expected a positive integer or sequence, got string 'sentence'"),
    ({"type": "switch", "routing_groups": 0}, "routing_groups", "must be >= 1, got 0"),
])
def test_routing_option_mistakes_are_located(gate, where, says):
    with pytest.raises(SpecError) as ei:
        moedsl.load_spec(vectors_spec({"experts": {"count": 4, "hidden": 8}, "gate": gate}))
    found = {format_path(i.path): i.message for i in ei.value.issues}
    key = f"layers[0].moe.gate.{where}"
    assert key in found and says in found[key], found


def test_a_batch_any_size_splits_into_sequence_routing_groups():
    spec = moedsl.load_spec(vectors_spec({"experts": {"count": 4, "hidden": 8},
                                          "gate": {"type": "switch", "routing_groups": "sequence"}}, batch=7))
    from moedsl.validate import check_batch

    assert check_batch(spec, 7, seq=13) == []
    g = spec.moe_layers[0].config.gate
    assert g.per_sequence and g.group_count(7) == 7 and g.capacity(13, 4) == math.ceil(1.25 * 13 / 4)


# ----------------------------------------------------------------------------- processes

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["auto", "static"])
def test_switch_and_nllb_routing_on_two_processes_equals_one(layout):
    """Per-sequence groups route on the rank holding the rows; NLLB's one group of the whole batch
    is gathered, its second choices after every first choice, normalised after the drops. A
    training step's outputs and every gradient, packed and with static capacity buffers."""
    switch = vectors_spec({"experts": {"count": 4, "hidden": 8, "activation": "relu"},
                           "gate": {"type": "switch", "expert_capacity": 3, "routing_groups": "sequence",
                                    "dropped_tokens": "scaled_input"}}, batch=8)
    nllb = vectors_spec({"experts": {"count": 4, "hidden": 8, "activation": "relu", "bias": True},
                         "gate": {"type": "gshard", **nllb_gate(False, True, expert_capacity=24,
                                                                  eval_capacity_fraction=0.25)}}, batch=8)
    from moedsl.runtime.equivalence import check

    for name, per_rank in zip(("switch", "nllb"), check([switch, nllb], 2, layout=layout)):
        for diff in per_rank:
            assert diff.ok(), f"{name}: {diff}"


# ----------------------------------------------------------------------------- in an encoder-decoder

@pytest.mark.parametrize("route_padding", [False, True])
def test_unrouted_padding_cannot_take_a_real_source_tokens_slot(route_padding):
    """The enc-dec graph hands its source_mask to the encoder's gates (``LowerContext.padding``):
    with route_padding false the padding's ids change nothing (it takes no slot, so no real token
    is dropped for it); routed (transformers' Switch), the padding competes for the capacity."""
    from encdec_helpers import copy_batch, tiny_encdec

    gate = ("{type: gshard, second_expert: always, expert_capacity: 3, normalize_after_drops: true, "
            f"route_padding: {'true' if route_padding else 'false'}}}")
    spec = moedsl.load_spec(tiny_encdec(**{"{type: switch, capacity_factor: 2.0}": gate}))
    model = moedsl.build_model(spec, seed=0).eval()
    source, source_mask, decoder_inputs, _, _ = copy_batch(4, 12, seed=3)
    assert (~source_mask).sum() >= 6
    other_ids = torch.randint(2, 40, source.shape, generator=torch.Generator().manual_seed(4))
    other = torch.where(source_mask, source, other_ids)  # the same real tokens, other padding
    with torch.no_grad():
        a = model(source, decoder_inputs, source_mask)
        b = model(other, decoder_inputs, source_mask)
    encoder = [s for s in a.router_stats if s.layer == "layers.4"][0]  # the encoder's MoE layer
    assert int(encoder.dropped) > 0
    routed = int(encoder.expert_load.sum())
    real = int(source_mask.sum())
    if route_padding:
        assert routed == 2 * source.numel()
        assert not torch.allclose(a.output, b.output)
    else:
        assert routed == 2 * real
        torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
