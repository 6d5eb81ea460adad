"""OLMoE (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models"):
transformers' ``modeling_olmoe.py``.

    OlmoeForCausalLM: embed_tokens -> [input_layernorm -> OlmoeAttention (GQA; RMSNorm of the
    whole q projection [hidden] and k projection [hidden / heads · kv_heads], then q, k, v
    clamped to ±clip_qkv, then rotary; biases on all four projections with attention_bias)
    -> post_attention_layernorm -> OlmoeSparseMoeBlock] × N -> norm -> lm_head

The sparse block: router softmax over all experts in float32, top ``num_experts_per_tok``,
divided by their sum only with ``norm_topk_prob``; SwiGLU experts of ``intermediate_size``. In
the spec language: ``attention`` with ``qk_norm: projection`` (eps rms_norm_eps), ``clip_qkv``,
``bias: attention_bias``; ``moe`` in every layer. OLMoE never slides (OlmoeModel: causal mask)
and its norms are built for head_dim = hidden / heads.

config.json calls the expert count ``num_experts`` (OlmoeConfig.attribute_map:
``num_local_experts`` is an alias); on disk ``mlp.experts.e.{gate,up,down}_proj.weight``,
``mlp.gate.weight``, ``self_attn.q_norm.weight`` [hidden], ``k_norm.weight`` [kv_heads · head_dim].
"""
from __future__ import annotations

from .. import register
from ..llama_like import LlamaLike


class Olmoe(LlamaLike):
    model_type = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    config_class = "OlmoeConfig"
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=128, eos_token_id=2, pad_token_id=1)
    tiny_variants = (
        ({"clip_qkv": 0.05, "norm_topk_prob": True}, "clip_qkv and norm_topk_prob"),
        ({"attention_bias": True, "tie_word_embeddings": True}, "attention_bias and tied embeddings"),
        ({"hidden_act": "gelu"}, "hidden_act gelu (GEGLU experts)"),
    )
    config_defaults = {"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
                       "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu",
                       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                       "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
                       "num_experts_per_tok": 8, "num_experts": 64, "router_aux_loss_coef": 0.01,
                       "norm_topk_prob": False, "head_dim": None}
    understood = {"num_local_experts"}
    attention_features = {"qk_norm", "clip_qkv", "qkv_bias", "out_bias"}
    title = "OLMoE"
    qk_norm = ("projection", "normalises the whole q and k projections")
    one_attention_bias = True
    shared_experts = False
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm"
    new_config = {"initializer_range": 0.02, "use_cache": True, "router_aux_loss_coef": 0.01,
                  "output_router_logits": False, "pad_token_id": 1, "eos_token_id": 50279}

    def read(self, c, config) -> None:
        if "num_local_experts" in config and "num_experts" not in config:
            c["num_experts"] = config["num_local_experts"]
            c.given.add("num_experts")
        if self.head_dim(c) is not None:
            self.refuse("head_dim", c["head_dim"], f"null or hidden_size / num_attention_heads = "
                        f"{c['hidden_size'] // c['num_attention_heads']} (OlmoeAttention's norms are built for it)")
        if c["clip_qkv"] is not None and not c["clip_qkv"] > 0:
            self.refuse("clip_qkv", c["clip_qkv"], "null or a positive bound")
        if c["num_experts"] < 1:
            self.refuse("num_experts", c["num_experts"], "a positive count")

    def layer(self, c, i: int) -> tuple:
        attn = self.attention_fields(c, i)
        attn.append(("qk_norm", "projection", "q_norm [hidden], k_norm [kv_heads · head_dim], eps rms_norm_eps"))
        if c["clip_qkv"] is not None:
            attn.append(("clip_qkv", c["clip_qkv"], c.where("clip_qkv")))
        if c["attention_bias"]:
            attn.append(("bias", "true", c.where("attention_bias")))
        body = self.moe_lines(c, "num_experts", "intermediate_size", "num_experts_per_tok", "norm_topk_prob")
        return attn, ("moe", "mlp: OlmoeSparseMoeBlock", body)

    def layer_config(self, spec, a, e) -> tuple:
        cfg = self.attention_config(spec, a)
        del cfg["head_dim"]
        x, g = e.config.experts, e.config.gate
        cfg.update({"attention_bias": a.config.qkv_bias, "clip_qkv": a.config.clip_qkv,
                    "intermediate_size": x.hidden, "num_experts": x.count, "num_experts_per_tok": g.k,
                    "norm_topk_prob": g.normalize})
        return cfg, {}


register(Olmoe())
