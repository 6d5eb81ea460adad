"""The attention of every Hugging Face MoE family moedsl imports computes what transformers'
module computes: each test builds transformers' attention from a tiny random config (float32,
eager attention, the mask and rotary tables its model makes), copies its weights into the
module a moedsl spec builds (through ``hf_parameter_names``), and compares the outputs on the
same input at positions 0..T-1. Plus the spec language of the new fields."""
from __future__ import annotations

import pytest
import torch

from moedsl import SpecError, load_spec
from moedsl.errors import format_path
from moedsl.kinds import layer_kind
from moedsl.nn.attention import hf_parameter_names, rotary, sliding_window_mask

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402

D, T = 32, 12  # model width; sequence longer than every window below


def spec_of(layer_yaml: str, d_model: int = D, norm_eps: float = 1e-6):
    return load_spec(f"""\
moedsl: 1
name: t
model: {{input: vectors, d_model: {d_model}, max_seq_len: 64, norm_eps: {norm_eps}}}
layers:
  - {layer_yaml}
  - moe:
      experts: {{count: 2, hidden: 4}}
      gate: {{type: switch}}
""")


def moedsl_module(layer_yaml: str, **model):
    spec = spec_of(layer_yaml, **model)
    layer = spec.layers[0]
    return layer_kind(layer.kind).module(layer.config, spec.model).eval()


def hf_output(attn_cls, rope_cls, config, x, sliding: bool = False):
    """transformers' attention module (random weights, norms' too), its output on x, the module."""
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    hf = attn_cls(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    pos = torch.arange(x.shape[1])[None]
    cos, sin = rope_cls(config)(x, pos)
    make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
    mask = make_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos,
                     allow_is_causal_skip=False)
    assert mask is not None
    with torch.no_grad():
        return hf(x, position_embeddings=(cos, sin), attention_mask=mask)[0], hf


def assert_same(module, hf, ref, x):
    names = hf_parameter_names(module)
    hf_state = hf.state_dict()
    assert set(names.values()) == set(hf_state), "every weight of transformers' module, and only those"
    module.load_state_dict({ours: hf_state[theirs] for ours, theirs in names.items()}, strict=True)
    with torch.no_grad():
        out = module(x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"max |diff| {err:.3g}, max |ref| {ref.abs().max().item():.3g}"


def inputs(d: int = D, t: int = T):
    return torch.randn(2, t, d, generator=torch.Generator().manual_seed(0))


def rope(theta: float) -> dict:
    return {"rope_theta": theta, "rope_type": "default"}


# ----------------------------------------------------------------------------------- families

@pytest.mark.parametrize("window", [None, 5])
def test_grouped_query_attention_with_and_without_sliding_window_matches_mixtral(window):
    from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding

    config = transformers.MixtralConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                                        sliding_window=window, rope_parameters=rope(1000.0),
                                        max_position_embeddings=64, num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(MixtralAttention, MixtralRotaryEmbedding, config, x, sliding=window is not None)
    sw = "" if window is None else f", sliding_window: {window}"
    assert_same(moedsl_module(f"attention: {{heads: 4, kv_heads: 2, rope_theta: 1000.0{sw}}}"), hf, ref, x)


def test_head_dim_other_than_d_model_over_heads_matches_mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding

    config = transformers.MixtralConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, head_dim=6,
                                        rope_parameters=rope(10000.0), max_position_embeddings=64,
                                        num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(MixtralAttention, MixtralRotaryEmbedding, config, x)
    assert_same(moedsl_module("attention: {heads: 4, head_dim: 6}"), hf, ref, x)


def test_qkv_bias_without_output_bias_matches_qwen2_moe_attention():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention, Qwen2MoeRotaryEmbedding

    config = transformers.Qwen2MoeConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
                                         rope_parameters=rope(10000.0), max_position_embeddings=64,
                                         num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(Qwen2MoeAttention, Qwen2MoeRotaryEmbedding, config, x)
    assert hf.q_proj.bias is not None and hf.o_proj.bias is None
    assert_same(moedsl_module("attention: {heads: 4, kv_heads: 2, qkv_bias: true}"), hf, ref, x)


def test_sliding_layers_of_qwen2_moe_match_its_sliding_window_mask():
    """transformers 5 decides per layer (Qwen2MoeConfig.layer_types): with use_sliding_window, the
    even-numbered layers below max_window_layers slide; those layers' attention is moedsl's with
    ``sliding_window`` = config.sliding_window."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention, Qwen2MoeRotaryEmbedding

    config = transformers.Qwen2MoeConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=4,
                                         use_sliding_window=True, sliding_window=4, max_window_layers=3,
                                         rope_parameters=rope(10000.0), max_position_embeddings=64,
                                         num_hidden_layers=4)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    x = inputs()
    ref, hf = hf_output(Qwen2MoeAttention, Qwen2MoeRotaryEmbedding, config, x, sliding=True)
    assert_same(moedsl_module("attention: {heads: 4, qkv_bias: true, sliding_window: 4}"), hf, ref, x)


@pytest.mark.parametrize("bias", [False, True])
def test_qk_norm_per_head_with_wider_heads_matches_qwen3_moe_attention(bias):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

    config = transformers.Qwen3MoeConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                         attention_bias=bias, rms_norm_eps=1e-6, rope_parameters=rope(10000.0),
                                         max_position_embeddings=64, num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(Qwen3MoeAttention, Qwen3MoeRotaryEmbedding, config, x)
    layer = f"attention: {{heads: 4, kv_heads: 2, head_dim: 12, qk_norm: head, bias: {str(bias).lower()}}}"
    assert_same(moedsl_module(layer, norm_eps=1e-6), hf, ref, x)


def test_qwen3_moe_sliding_window_applies_to_every_layer():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

    config = transformers.Qwen3MoeConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         use_sliding_window=True, sliding_window=3, rope_parameters=rope(10000.0),
                                         max_position_embeddings=64, num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(Qwen3MoeAttention, Qwen3MoeRotaryEmbedding, config, x, sliding=True)
    layer = "attention: {heads: 4, kv_heads: 2, qk_norm: head, qk_norm_eps: 1.0e-6, sliding_window: 3}"
    assert_same(moedsl_module(layer, norm_eps=1e-5), hf, ref, x)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_qk_norm_over_the_projection_and_clip_qkv_match_olmoe_attention(clip):
    from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding

    config = transformers.OlmoeConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, clip_qkv=clip,
                                      rms_norm_eps=1e-5, rope_parameters=rope(10000.0), max_position_embeddings=64,
                                      num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(OlmoeAttention, OlmoeRotaryEmbedding, config, x)
    if clip is not None:  # the clamp bites: some projected value lies outside [-clip, clip]
        assert hf.v_proj(x).abs().max() > clip
    cl = "" if clip is None else f", clip_qkv: {clip}"
    assert_same(moedsl_module(f"attention: {{heads: 4, kv_heads: 2, qk_norm: projection{cl}}}", norm_eps=1e-5),
                hf, ref, x)


@pytest.mark.parametrize("q_lora_rank,interleave,bias,nope", [
    (None, True, False, 6), (10, True, False, 6), (None, False, True, 6), (10, False, True, 6), (10, True, False, 0)],
    ids=["full-q-interleaved", "lora-q-interleaved", "full-q-halves-bias", "lora-q-halves-bias", "no-nope-part"])
def test_latent_attention_matches_deepseek_v3_attention(q_lora_rank, interleave, bias, nope):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                      DeepseekV3RotaryEmbedding)

    config = transformers.DeepseekV3Config(hidden_size=D, num_attention_heads=4, num_key_value_heads=4,
                                           q_lora_rank=q_lora_rank,
                                           kv_lora_rank=8, qk_nope_head_dim=nope, qk_rope_head_dim=4, v_head_dim=5,
                                           rope_interleave=interleave, attention_bias=bias,
                                           rope_parameters=rope(10000.0), max_position_embeddings=64,
                                           num_hidden_layers=1)
    x = inputs()
    ref, hf = hf_output(DeepseekV3Attention, DeepseekV3RotaryEmbedding, config, x)
    q = "null" if q_lora_rank is None else q_lora_rank
    layer = (f"latent_attention: {{heads: 4, q_lora_rank: {q}, kv_lora_rank: 8, qk_nope_head_dim: {nope}, "
             f"qk_rope_head_dim: 4, v_head_dim: 5, rope_interleave: {str(interleave).lower()}, "
             f"bias: {str(bias).lower()}}}")
    assert_same(moedsl_module(layer), hf, ref, x)


# ------------------------------------------------------------------------ rotary and windows

def test_rotary_equals_transformers_default_rope_and_interleaved_rope():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3RotaryEmbedding,
                                                                      apply_rotary_pos_emb,
                                                                      apply_rotary_pos_emb_interleave)

    config = transformers.DeepseekV3Config(hidden_size=D, num_attention_heads=4, qk_rope_head_dim=8,
                                           rope_parameters=rope(500.0), max_position_embeddings=64)
    q, k = torch.randn(2, 3, T, 8), torch.randn(2, 1, T, 8)
    cos, sin = DeepseekV3RotaryEmbedding(config)(q, torch.arange(T)[None])
    for interleave, apply in ((False, apply_rotary_pos_emb), (True, apply_rotary_pos_emb_interleave)):
        rq, rk = apply(q, k, cos, sin)
        assert torch.equal(rotary(q, 500.0, interleave), rq) and torch.equal(rotary(k, 500.0, interleave), rk)


def test_a_sliding_window_of_n_shows_each_query_n_keys_itself_included():
    config = transformers.MixtralConfig(hidden_size=D, num_attention_heads=4, sliding_window=3,
                                        max_position_embeddings=64, num_hidden_layers=1)
    config._attn_implementation = "eager"
    x = torch.zeros(1, 9, D)
    theirs = create_sliding_window_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                                               position_ids=torch.arange(9)[None], allow_is_causal_skip=False)
    ours = sliding_window_mask(9, 3, "cpu")
    assert torch.equal(ours, theirs[0, 0] == 0)
    assert ours.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3]


# --------------------------------------------------------------------------- spec language

def errors_at(layer_yaml: str, **model) -> dict:
    with pytest.raises(SpecError) as ei:
        spec_of(layer_yaml, **model)
    return {format_path(i.path): i.message for i in ei.value.issues}


@pytest.mark.parametrize("layer,where,says", [
    ("attention: {heads: 4, head_dim: 7}", "layers[0].attention.head_dim", "even head_dim, got 7"),
    ("attention: {heads: 5}", "layers[0].attention.heads", "not divisible by 5 heads"),
    ("attention: {heads: 4, sliding_window: 4, causal: false}", "layers[0].attention.sliding_window",
     "needs causal: true"),
    ("attention: {heads: 4, qk_norm: layer}", "layers[0].attention.qk_norm", "not one of: none, head, projection"),
    ("attention: {heads: 4, sliding_window: 0}", "layers[0].attention.sliding_window", ">= 1, got 0"),
    ("attention: {heads: 4, clip_qkv: -1}", "layers[0].attention.clip_qkv", "> 0, got -1"),
    ("latent_attention: {heads: 4, qk_nope_head_dim: 4, qk_rope_head_dim: 4}", "layers[0].latent_attention",
     "kv_lora_rank"),
    ("latent_attention: {heads: 4, kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 3}",
     "layers[0].latent_attention.qk_rope_head_dim", "even qk_rope_head_dim, got 3"),
    ("latent_attention: {heads: 4, kv_lora_rank: 8, qk_nope_head_dim: 0, qk_rope_head_dim: 4}",
     "layers[0].latent_attention.qk_nope_head_dim", "which is 0"),
    ("latent_attention: {heads: 4, kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 4, kv_heads: 2}",
     "layers[0].latent_attention.kv_heads", "unknown key"),
])
def test_bad_attention_fields_are_reported_where_they_are(layer, where, says):
    errors = errors_at(layer)
    assert where in errors, errors
    assert says in errors[where], errors


def test_a_head_dim_makes_heads_that_do_not_divide_d_model_valid():
    cfg = spec_of("attention: {heads: 5, kv_heads: 1, head_dim: 8}").layers[0].config
    assert (cfg.heads, cfg.kv_heads, cfg.head_dim) == (5, 1, 8)


def test_resolved_attention_defaults():
    cfg = spec_of("attention: {heads: 4, bias: true, out_bias: false}", norm_eps=1e-3).layers[0].config
    assert (cfg.head_dim, cfg.qkv_bias, cfg.out_bias, cfg.qk_norm_eps) == (D // 4, True, False, 1e-3)
    assert (cfg.qk_norm, cfg.clip_qkv, cfg.sliding_window) == ("none", None, None)
    mla = spec_of("latent_attention: {heads: 2, kv_lora_rank: 8, qk_nope_head_dim: 6, qk_rope_head_dim: 2}")
    cfg = mla.layers[0].config
    assert (cfg.v_head_dim, cfg.q_lora_rank, cfg.rope_interleave, cfg.norm_eps) == (6, None, True, 1e-6)


def test_attention_parameters_and_flops_follow_head_dim_window_and_latent_ranks():
    from moedsl.kinds import layer_kind

    spec = spec_of("attention: {heads: 4, kv_heads: 2, head_dim: 6, qk_norm: head, qkv_bias: true}")
    cfg, kind = spec.layers[0].config, layer_kind("attention")
    q, kv = 4 * 6, 2 * 6
    want = D * q + q + 2 * (D * kv + kv) + q * D + 2 * 6
    assert kind.parameters(cfg, spec.model) == (want, want)
    assert kind.flops(cfg, spec.model, 8) == 2 * want + 4 * 4.5 * q
    windowed = spec_of("attention: {heads: 4, sliding_window: 2}")
    w = windowed.layers[0].config
    # seq 8, window 2: the keys per query are 1, 2, 2, ..., 2: 15 / 8 on average
    assert kind.flops(w, windowed.model, 8) == 2 * kind.parameters(w, windowed.model)[0] + 4 * (15 / 8) * D
    mla = spec_of("latent_attention: {heads: 2, q_lora_rank: 5, kv_lora_rank: 8, qk_nope_head_dim: 6, "
                  "qk_rope_head_dim: 2, v_head_dim: 3}")
    m = mla.layers[0].config
    want = D * 5 + 5 + 5 * 2 * 8 + D * (8 + 2) + 8 + 8 * 2 * (6 + 3) + 2 * 3 * D
    assert layer_kind("latent_attention").parameters(m, mla.model) == (want, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek-v3-small", "qwen3-moe-small"])
def test_example_specs_with_latent_attention_and_qk_norm_train_a_step(name):
    import moedsl
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / f"{name}.yaml")
    model = moedsl.build_model(spec, device="cpu", seed=0)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.output[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "attention" in n}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
