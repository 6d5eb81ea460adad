"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): transformers' ``modeling_mixtral.py``.

    MixtralForCausalLM: embed_tokens -> [input_layernorm -> MixtralAttention (GQA, rotary)
    -> post_attention_layernorm -> MixtralSparseMoeBlock (router softmax in float32, top-k,
    renormalised over the k; SwiGLU experts silu(x·w1ᵀ) ⊙ (x·w3ᵀ) · w2ᵀ)] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), ``repeat N: [attention(heads,
kv_heads, head_dim, positions: rotary, rope_theta, sliding_window), moe(experts swiglu, gate
topk k dropless, normalize)]``, ``norm`` (rmsnorm, rms_norm_eps), ``head`` (tied if
tie_word_embeddings). moedsl's top-k gate with ``normalize`` equals transformers' softmax over
all E followed by dividing by the k's sum (MixtralTopKRouter.forward). A ``sliding_window``
that is not null applies to every layer (MixtralModel.forward: one sliding mask for all).

On disk (transformers 4 and 5's save_pretrained): per expert
``model.layers.L.block_sparse_moe.experts.e.w1.weight`` [h, d] (gate), ``w3`` [h, d] (up),
``w2`` [d, h] (down), router ``block_sparse_moe.gate.weight`` [E, d]. transformers 5 holds
them in memory fused (``mlp.experts.gate_up_proj`` [E, 2h, d], gate first, and
``mlp.experts.down_proj`` [E, d, h]); a checkpoint written in that layout is accepted too.
moedsl's experts multiply from the right: ``w_gate[e] = w1ᵀ``, ``w_in[e] = w3ᵀ``, ``w_out[e] = w2ᵀ``.
"""
from __future__ import annotations

from typing import Optional

from .. import register
from ..llama_like import LlamaLike


class Mixtral(LlamaLike):
    model_type = "mixtral"
    architectures = ("MixtralForCausalLM",)
    config_class = "MixtralConfig"
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=128)
    # (config overrides, what it covers): tests/test_hf_import.py runs each like tiny_config
    tiny_variants = (({"sliding_window": 5}, "sliding window on every layer"),
                     ({"head_dim": 16}, "head_dim other than hidden / heads"),
                     ({"tie_word_embeddings": True}, "tied embeddings"))
    # MixtralConfig's defaults (transformers' configuration_mixtral.py), for fields a config.json omits
    config_defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                       "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                       "sliding_window": None, "attention_dropout": 0.0, "num_experts_per_tok": 2,
                       "num_local_experts": 8, "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.001,
                       "output_router_logits": False}
    default_theta = 1e6
    moe_prefix = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj (no bias)"
    new_config = {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True,
                  "router_aux_loss_coef": 0.001, "output_router_logits": False}

    def read(self, c, config) -> None:
        if c["router_jitter_noise"]:
            self.refuse("router_jitter_noise", c["router_jitter_noise"], "0 (moedsl's jitter perturbs the "
                        "router's input only, Mixtral's the experts' too)")
        if c["sliding_window"] is not None and (not isinstance(c["sliding_window"], int) or c["sliding_window"] < 1):
            self.refuse("sliding_window", c["sliding_window"], "null or a positive number of keys")

    def layer(self, c, i: int) -> tuple:
        attn = self.attention_fields(c, i)
        if c["sliding_window"] is not None:
            attn.append(("sliding_window", c["sliding_window"], c.where("sliding_window") + " (every layer)"))
        body = self.moe_lines(c, "num_local_experts", "intermediate_size", "num_experts_per_tok", None)
        return attn, ("moe", "block_sparse_moe", body)

    def moe_problem(self, e, at) -> Optional[str]:
        x, g = e.config.experts, e.config.gate
        if x.shared is not None:
            return f"{at(e, 'experts', 'shared')} (shared experts)"
        why = super().moe_problem(e, at)  # first: a top-k gate (whose options hold normalize)
        if why is None and not g.normalize:
            return f"{at(e, 'gate', 'normalize')} false (Mixtral renormalises over the k)"
        return why

    def layer_config(self, spec, a, e) -> tuple:
        x, g = e.config.experts, e.config.gate
        cfg = self.attention_config(spec, a)
        cfg.update({"sliding_window": a.config.sliding_window, "intermediate_size": x.hidden,
                    "num_experts_per_tok": g.k, "num_local_experts": x.count, "router_jitter_noise": 0.0})
        return cfg, {}


register(Mixtral())

