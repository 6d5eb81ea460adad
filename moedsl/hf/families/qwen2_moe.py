"""Qwen2-MoE (Qwen1.5-MoE, Qwen2 technical report, Yang et al. 2024, §2.2): transformers'
``modeling_qwen2_moe.py``.

    Qwen2MoeForCausalLM: embed_tokens -> [input_layernorm -> Qwen2MoeAttention (GQA, rotary,
    biases on q, k, v with qkv_bias, none on o) -> post_attention_layernorm -> mlp] × N -> norm -> lm_head

where layer i's ``mlp`` is a Qwen2MoeSparseMoeBlock if ``i not in mlp_only_layers and
num_experts > 0 and (i + 1) % decoder_sparse_step == 0`` (Qwen2MoeDecoderLayer), else a dense
SwiGLU Qwen2MoeMLP of ``intermediate_size``. The sparse block: router softmax over all
``num_experts`` in float32, top ``num_experts_per_tok``, divided by their sum only with
``norm_topk_prob`` (Qwen2MoeTopKRouter); SwiGLU experts of ``moe_intermediate_size``; plus one
shared SwiGLU expert of ``shared_expert_intermediate_size`` whose output is scaled per token by
sigmoid(x·w), w = ``shared_expert_gate.weight`` [1, d]. In the spec language: ``moe`` with
``experts.shared: {count: 1, hidden, gate: true}`` and ``gate: {type: topk, normalize:
norm_topk_prob}``, or ``ffn`` (swiglu).

Sliding windows are per layer (Qwen2MoeConfig.__post_init__): ``sliding_window`` is kept only
with ``use_sliding_window`` (else 0), and ``layer_types`` (if config.json omits it) makes layer i
``sliding_attention`` when ``(i + 1) % 2 and i < max_window_layers and use_sliding_window``; a
sliding layer sees its last ``sliding_window`` keys (create_sliding_window_causal_mask).

On disk (save_pretrained): ``mlp.experts.e.{gate,up,down}_proj.weight``, ``mlp.gate.weight``,
``mlp.shared_expert.{gate,up,down}_proj.weight``, ``mlp.shared_expert_gate.weight``, dense
layers ``mlp.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

from typing import Optional

from .. import register
from ..llama_like import FULL, SLIDING, LlamaLike, dense_export, layer_windows, sparse_layers


class Qwen2Moe(LlamaLike):
    model_type = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    config_class = "Qwen2MoeConfig"
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                       shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    tiny_variants = (
        ({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
         "decoder_sparse_step 2 and mlp_only_layers"),
        ({"norm_topk_prob": True, "qkv_bias": False}, "norm_topk_prob, no qkv bias"),
        ({"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 3},
         "sliding layers from max_window_layers"),
        ({"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 4,
          "layer_types": [FULL, SLIDING, SLIDING]}, "sliding layers from layer_types"),
        ({"tie_word_embeddings": True, "head_dim": 16}, "tied embeddings and a wider head_dim"),
        ({"hidden_act": "gelu", "mlp_only_layers": [0]}, "hidden_act gelu (GEGLU experts and MLP)"),
    )
    config_defaults = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                       "attention_dropout": 0.0, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
                       "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
                       "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": None,
                       "qkv_bias": True, "layer_types": None, "head_dim": None}
    attention_features = {"head_dim", "sliding_window", "qkv_bias"}
    attention_comment = "self_attn: q_proj, k_proj, v_proj (qkv_bias), o_proj (no bias)"
    new_config = {"initializer_range": 0.02, "use_cache": True, "router_aux_loss_coef": 0.001,
                  "output_router_logits": False, "max_window_layers": 28}

    def read(self, c, config) -> None:
        n = c["num_hidden_layers"]
        if not isinstance(c["decoder_sparse_step"], int) or c["decoder_sparse_step"] < 1:
            self.refuse("decoder_sparse_step", c["decoder_sparse_step"], "a positive integer")
        c["sparse"] = sparse_layers(c)
        if any(c["sparse"]) and c["shared_expert_intermediate_size"] < 1:
            self.refuse("shared_expert_intermediate_size", c["shared_expert_intermediate_size"],
                        "a positive width (moedsl's shared expert has one)")
        # Qwen2MoeConfig.__post_init__: every other layer below max_window_layers
        layer_windows(self, c, [SLIDING if (i + 1) % 2 and i < c["max_window_layers"] and c["use_sliding_window"]
                                else FULL for i in range(n)])

    def layer(self, c, i: int) -> tuple:
        attn = self.attention_fields(c, i)
        if c["qkv_bias"]:
            attn.append(("qkv_bias", "true", c.where("qkv_bias")))
        if c["windows"][i] is not None:
            attn.append(("sliding_window", c["windows"][i], f"sliding_window; layer {i} slides by {c['types_from']}"))
        if not c["sparse"][i]:
            why = "in mlp_only_layers" if i in (c["mlp_only_layers"] or []) else "by decoder_sparse_step"
            return attn, ("ffn", f"mlp: dense ({why})", self.dense_lines(c, "intermediate_size"))
        body = self.moe_lines(c, "num_experts", "moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob",
                              shared=("shared_expert_intermediate_size", True))
        return attn, ("moe", "mlp: Qwen2MoeSparseMoeBlock", body)

    def moe_problem(self, e, at) -> Optional[str]:
        s = e.config.experts.shared
        if s is None or s.count != 1 or not s.gate:
            return f"{at(e, 'experts', 'shared')} {s} (Qwen2-MoE's blocks have one shared expert, gated)"
        return super().moe_problem(e, at)

    def ffn_problem(self, f, at) -> Optional[str]:
        return self.dense_ffn_problem(f, at)

    def layer_config(self, spec, a, e) -> tuple:
        cfg = self.attention_config(spec, a)
        cfg["qkv_bias"] = a.config.qkv_bias
        if a.config.out_bias:
            return "attention out_bias (Qwen2-MoE's o_proj has no bias)", None
        w = a.config.sliding_window
        if w is not None:
            cfg["sliding_window"] = w
        if e.kind == "ffn":
            cfg["intermediate_size"] = e.config.hidden
        else:
            x, g = e.config.experts, e.config.gate
            cfg.update({"moe_intermediate_size": x.hidden, "shared_expert_intermediate_size": x.shared.hidden,
                        "num_experts": x.count, "num_experts_per_tok": g.k, "norm_topk_prob": g.normalize})
        return cfg, {"moe": e.kind == "moe", "sliding": w is not None}

    def per_layer_config(self, per: list, cfg: dict, recorded: Optional[dict]) -> dict:
        out = dense_export(per, recorded)
        out["layer_types"] = [SLIDING if p["sliding"] else FULL for p in per]
        out["use_sliding_window"] = any(p["sliding"] for p in per)
        if not out["use_sliding_window"]:
            out["sliding_window"] = 0  # Qwen2MoeConfig.__post_init__ without use_sliding_window
        if "intermediate_size" not in cfg:  # no dense layer: keep config.json's (unused) width
            out["intermediate_size"] = (recorded or {}).get("intermediate_size", 5632)
        if "num_experts" not in cfg:  # no MoE layer
            out["num_experts"] = 0
        return out


register(Qwen2Moe())
