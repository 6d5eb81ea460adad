"""moedsl's MoE sublayer computes what transformers' MoE blocks compute.

For each family (transformers' modeling_mixtral.py MixtralSparseMoeBlock, modeling_qwen2_moe.py
Qwen2MoeSparseMoeBlock, modeling_qwen3_moe.py Qwen3MoeSparseMoeBlock, modeling_olmoe.py
OlmoeSparseMoeBlock, modeling_deepseek_v3.py DeepseekV3MoE) a tiny float32 block with random
non-zero weights (the router's correction bias included) is built from its Config class (no
download), its weights are copied into a one-MoE-layer moedsl spec through
``moedsl.nn.hf_moe.moe_state_dict``, and both run on the same random tokens: the same experts
for every token, the same weights, and outputs within 1e-5 of the largest.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moedsl
from moedsl.nn.hf_moe import dense_ffn_state_dict, moe_state_dict
from moedsl.nn.routing import group_limited_top

transformers = pytest.importorskip("transformers")

D_MODEL, TOKENS = 16, (3, 7)  # 21 tokens
EAGER = {"experts_implementation": "eager"}  # the experts as the modeling file writes them


# ----------------------------------------------------------------------------- building

def vectors_spec(layer: dict) -> dict:
    """A spec of one sublayer over bare vectors, without its residual and pre-norm: the block alone."""
    return {"moedsl": 1, "name": "hf-block", "model": {"input": "vectors", "d_model": D_MODEL, "max_seq_len": 64},
            "layers": [{**{k: {**v, "residual": False, "prenorm": False} for k, v in layer.items()}}],
            "train": {"batch_size": 3}}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter N(0, 0.5²) (the router N(0, 1): choices far from ties); the correction
    bias U(-0.25, 0.25), of the size of the sigmoid scores' spread, so it changes choices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 1.0 if name == "gate.weight" else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 - 0.25)


def load_moe(spec: dict, block: torch.nn.Module):
    """The moedsl model of ``spec`` holding ``block``'s weights (every parameter replaced)."""
    model = moedsl.build_model(moedsl.load_spec(spec), seed=0)
    ours = {f"layers.0.{k}": v for k, v in moe_state_dict(block.state_dict()).items()}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    params = {n for n, _ in model.named_parameters()}
    assert not params & set(missing), f"parameters left at their init: {sorted(params & set(missing))}"
    return model.eval()


def run_both(block, model, hf_router, seed: int = 0):
    """(HF output, moedsl output, HF experts, moedsl experts, HF weights, moedsl weights) on the
    same tokens; experts and weights [S, k], each token's sorted by expert id."""
    x = torch.randn(*TOKENS, D_MODEL, generator=torch.Generator().manual_seed(100 + seed))
    seen = []
    hook = model.get_submodule("layers.0.gate").register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        ref = block(x.clone())
        _, w_ref, e_ref = hf_router(x.reshape(-1, D_MODEL))
        out = model(x).output
    hook.remove()
    r = seen[-1]
    S, k = e_ref.shape
    e_ours, w_ours = r.expert.view(S, k), r.weight.view(S, k)

    def by_expert(e, w):
        order = e.sort(-1).indices
        return e.gather(-1, order), w.gather(-1, order)

    return (ref, out, *by_expert(e_ref, w_ref), *by_expert(e_ours, w_ours))


def assert_same(block, model, hf_router, seed: int = 0):
    ref, out, e_ref, w_ref, e_ours, w_ours = run_both(block, model, hf_router, seed)
    assert torch.equal(e_ref, e_ours), "a token chose other experts"
    torch.testing.assert_close(w_ours, w_ref.float(), rtol=1e-6, atol=1e-6)
    scale = ref.abs().max()
    assert scale > 0
    assert (out - ref).abs().max() <= 1e-5 * scale, f"max |diff| {(out - ref).abs().max():.3g} vs {scale:.3g}"


def swiglu_experts(count, hidden, shared=None):
    e = {"count": count, "hidden": hidden, "activation": "swiglu"}
    if shared:
        e["shared"] = shared
    return e


# ----------------------------------------------------------------------------- the families

def test_topk_gate_matches_mixtral_sparse_moe_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(**EAGER, hidden_size=D_MODEL, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                        hidden_act="silu")
    block = MixtralSparseMoeBlock(cfg).eval()
    randomize(block, 1)
    model = load_moe(vectors_spec({"moe": {"experts": swiglu_experts(8, 24),
                                           "gate": {"type": "topk", "k": 2, "normalize": True}}}), block)
    assert_same(block, model, block.gate)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_gated_shared_expert_matches_qwen2_moe_sparse_moe_block(norm_topk_prob):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(**EAGER, hidden_size=D_MODEL, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                         num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    assert block.shared_expert_gate.weight.shape == (1, D_MODEL)
    randomize(block, 2)
    spec = vectors_spec({"moe": {"experts": swiglu_experts(6, 12, {"count": 1, "hidden": 20, "gate": True}),
                                 "gate": {"type": "topk", "k": 2, "normalize": norm_topk_prob}}})
    assert_same(block, load_moe(spec, block), block.gate)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_topk_gate_matches_qwen3_moe_sparse_moe_block(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(**EAGER, hidden_size=D_MODEL, moe_intermediate_size=10, num_experts=8, num_experts_per_tok=3,
                         norm_topk_prob=norm_topk_prob, hidden_act="silu")
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    randomize(block, 3)
    spec = vectors_spec({"moe": {"experts": swiglu_experts(8, 10),
                                 "gate": {"type": "topk", "k": 3, "normalize": norm_topk_prob}}})
    assert_same(block, load_moe(spec, block), block.gate)


def test_unnormalised_topk_gate_matches_olmoe_sparse_moe_block():
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock

    cfg = OlmoeConfig(**EAGER, hidden_size=D_MODEL, intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                      hidden_act="silu")
    assert cfg.norm_topk_prob is False  # OLMoE's default: the softmax over all experts, not renormalised
    block = OlmoeSparseMoeBlock(cfg).eval()
    randomize(block, 4)
    spec = vectors_spec({"moe": {"experts": swiglu_experts(8, 12),
                                 "gate": {"type": "topk", "k": 2, "normalize": False}}})
    assert_same(block, load_moe(spec, block), block.gate)


def deepseek_v3(norm_topk_prob=True, n_group=4, topk_group=2, k=3, experts=12, shared=2, scale=2.5, seed=5):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE

    cfg = DeepseekV3Config(**EAGER, hidden_size=D_MODEL, moe_intermediate_size=8, n_routed_experts=experts,
                           num_experts_per_tok=k, n_group=n_group, topk_group=topk_group, n_shared_experts=shared,
                           routed_scaling_factor=scale, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    block = DeepseekV3MoE(cfg).eval()
    randomize(block, seed)
    gate = {"type": "topk", "k": k, "score": "sigmoid", "normalize": norm_topk_prob, "scale": scale,
            "bias_balancing": {"rate": 0}}
    if n_group > 1:
        gate["groups"] = {"count": n_group, "top": topk_group}
    spec = vectors_spec({"moe": {"experts": swiglu_experts(experts, 8, {"count": shared, "hidden": 8}),
                                 "gate": gate}})
    return block, spec


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_group_limited_sigmoid_gate_matches_deepseek_v3_moe(norm_topk_prob):
    block, spec = deepseek_v3(norm_topk_prob)
    model = load_moe(spec, block)
    torch.testing.assert_close(model.get_buffer("layers.0.gate.expert_bias"), block.gate.e_score_correction_bias)
    assert_same(block, model, block.gate)


def test_deepseek_v3_correction_bias_and_group_limit_change_the_choice():
    """The test above is not vacuous: without the loaded bias, or without the group limit, some
    token of the same batch chooses other experts than DeepseekV3TopkRouter."""
    block, spec = deepseek_v3()
    model = load_moe(spec, block)
    with torch.no_grad():
        model.get_buffer("layers.0.gate.expert_bias").zero_()
    _, _, e_ref, _, e_ours, _ = run_both(block, model, block.gate)
    assert not torch.equal(e_ref, e_ours)
    spec["layers"][0]["moe"]["gate"].pop("groups")
    _, _, e_ref, _, e_ours, _ = run_both(block, load_moe(spec, block), block.gate)
    assert not torch.equal(e_ref, e_ours)


def test_ungrouped_deepseek_v3_router_is_the_topk_gate_with_a_fixed_bias():
    """n_group = topk_group = 1 (every expert eligible): the plain sigmoid top-k with the bias."""
    block, spec = deepseek_v3(n_group=1, topk_group=1, k=2, experts=6, shared=1, scale=1.5, seed=6)
    assert_same(block, load_moe(spec, block), block.gate)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_swiglu_ffn_matches_the_dense_mlp(family):
    """Dense layers (Qwen2-MoE's mlp_only_layers / decoder_sparse_step, DeepSeek-V3's
    first_k_dense_replace) are moedsl's ffn with swiglu: gate_proj -> w_gate, up_proj -> w_in,
    down_proj -> w_out, the nn.Linear weights as they are."""
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig as Config, Qwen2MoeMLP as MLP
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config as Config, \
            DeepseekV3MLP as MLP
    mlp = MLP(Config(**EAGER, hidden_size=D_MODEL, intermediate_size=40, hidden_act="silu")).eval()
    randomize(mlp, 7)
    model = moedsl.build_model(moedsl.load_spec(vectors_spec({"ffn": {"hidden": 40, "activation": "swiglu"}})))
    model.load_state_dict({f"layers.0.ffn.{k}": v for k, v in dense_ffn_state_dict(mlp.state_dict()).items()})
    x = torch.randn(*TOKENS, D_MODEL, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref, out = mlp(x), model.eval()(x).output
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_per_expert_checkpoint_names_give_the_fused_weights():
    """On disk a Mixtral checkpoint keeps experts.{e}.w1/w3/w2 (DeepSeek-V3, Qwen and OLMoE:
    gate_proj/up_proj/down_proj), which transformers fuses into gate_up_proj = [w1; w3] per expert."""
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(MixtralConfig(**EAGER, hidden_size=D_MODEL, intermediate_size=6, num_local_experts=3,
                                                num_experts_per_tok=2))
    randomize(block, 9)
    I = 6
    fused = block.state_dict()
    for names in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
        disk = {"gate.weight": fused["gate.weight"]}
        for e in range(3):
            disk[f"experts.{e}.{names[0]}.weight"] = fused["experts.gate_up_proj"][e, :I]
            disk[f"experts.{e}.{names[1]}.weight"] = fused["experts.gate_up_proj"][e, I:]
            disk[f"experts.{e}.{names[2]}.weight"] = fused["experts.down_proj"][e]
        ours, want = moe_state_dict(disk), moe_state_dict(fused)
        assert ours.keys() == want.keys()
        for key in want:
            assert torch.equal(ours[key], want[key]), key


# ----------------------------------------------------------------------------- dense / MoE per layer

def mlp_kinds(spec) -> list:
    return [layer.kind for layer in moedsl.load_spec(spec).layers if layer.kind in ("ffn", "moe")]


def token_spec(layers: list) -> dict:
    return {"moedsl": 1, "name": "stack", "model": {"vocab_size": 32, "d_model": D_MODEL, "max_seq_len": 16},
            "layers": [{"embedding": {}}, *layers, {"norm": {}}, {"head": {}}]}


MOE = {"moe": {"experts": swiglu_experts(4, 8), "gate": {"type": "topk", "k": 2}}}
ATT = {"attention": {"heads": 2}}


def test_qwen2_moe_sparse_step_and_mlp_only_layers_are_a_cycle_with_an_explicit_layer():
    """Qwen2MoeDecoderLayer: MoE where (i + 1) % decoder_sparse_step == 0 and i not in
    mlp_only_layers, else the dense MLP of intermediate_size."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeDecoderLayer

    cfg = Qwen2MoeConfig(**EAGER, hidden_size=D_MODEL, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=8,
                         decoder_sparse_step=2, mlp_only_layers=[5], num_experts=4, moe_intermediate_size=8,
                         intermediate_size=24)
    hf = ["moe" if type(Qwen2MoeDecoderLayer(cfg, i).mlp).__name__.endswith("SparseMoeBlock") else "ffn"
          for i in range(8)]
    dense = {"ffn": {"hidden": 24, "activation": "swiglu"}}
    spec = token_spec([{"repeat": 4, "block": [ATT, {"cycle": [dense, MOE]}]},  # layers 0-3
                       ATT, dense, ATT, dense,  # 4, and 5 (an mlp_only layer)
                       {"repeat": 2, "block": [ATT, {"cycle": [dense, MOE]}]}])  # 6-7
    assert hf == ["ffn", "moe", "ffn", "moe", "ffn", "ffn", "ffn", "moe"]
    assert mlp_kinds(spec) == hf


def test_deepseek_v3_first_k_dense_replace_is_a_dense_block_then_a_moe_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3DecoderLayer

    cfg = DeepseekV3Config(**EAGER, hidden_size=D_MODEL, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=5,
                           first_k_dense_replace=2, n_routed_experts=4, n_group=2, topk_group=1,
                           num_experts_per_tok=2, moe_intermediate_size=8, intermediate_size=24, q_lora_rank=None,
                           kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    hf = ["moe" if type(DeepseekV3DecoderLayer(cfg, i).mlp).__name__ == "DeepseekV3MoE" else "ffn"
          for i in range(5)]
    spec = token_spec([{"repeat": 2, "block": [ATT, {"ffn": {"hidden": 24, "activation": "swiglu"}}]},
                       {"repeat": 3, "block": [ATT, MOE]}])
    assert hf == ["ffn", "ffn", "moe", "moe", "moe"]
    assert mlp_kinds(spec) == hf


# ----------------------------------------------------------------------------- group-limited choice

def loop_group_limited_top(v: list, k: int, groups: int, top: int) -> set:
    """DeepSeek-V3's group-limited choice for one token, with plain loops: a group's score is
    the sum of its two largest values; the k largest values of the ``top`` best groups."""
    per = len(v) // groups
    score = [sum(sorted(v[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(groups)]
    best = sorted(range(groups), key=lambda g: -score[g])[:top]
    eligible = [i for g in best for i in range(g * per, (g + 1) * per)]
    return set(sorted(eligible, key=lambda i: -v[i])[:k])


@st.composite
def group_cases(draw):
    groups = draw(st.integers(1, 5))
    per = draw(st.integers(2, 4))
    top = draw(st.integers(1, groups))
    k = draw(st.integers(1, top * per))
    # distinct values (no ties: the choice is then unique), tokens × experts
    tokens = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(-10 ** 6, 10 ** 6), min_size=tokens * groups * per,
                           max_size=tokens * groups * per, unique=True))
    return groups, per, top, k, torch.tensor(values, dtype=torch.float64).view(tokens, groups * per) / 1e5


@settings(max_examples=60, deadline=None)
@given(group_cases())
def test_group_limited_top_matches_a_plain_loop(case):
    groups, per, top, k, v = case
    got = group_limited_top(v, k, groups, top)
    assert got.shape == (v.shape[0], k)
    for row, chosen in zip(v.tolist(), got.tolist()):
        assert set(chosen) == loop_group_limited_top(row, k, groups, top)


def test_group_limited_top_keeps_leading_dims():
    v = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    got = group_limited_top(v, 2, 4, 2)
    assert got.shape == (2, 3, 2)
    assert torch.equal(got.view(6, 2), group_limited_top(v.view(6, 12), 2, 4, 2))
