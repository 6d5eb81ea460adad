"""Qwen3-MoE (Qwen3 technical report, Yang et al. 2025): transformers' ``modeling_qwen3_moe.py``.

    Qwen3MoeForCausalLM: embed_tokens -> [input_layernorm -> Qwen3MoeAttention (GQA, an RMSNorm of
    each head's query and key before the rotary positions, biases on all four projections with
    attention_bias, head_dim possibly ≠ hidden / heads) -> post_attention_layernorm -> mlp] × N
    -> norm -> lm_head

where layer i's ``mlp`` is a Qwen3MoeSparseMoeBlock if ``i not in mlp_only_layers and
num_experts > 0 and (i + 1) % decoder_sparse_step == 0`` (Qwen3MoeDecoderLayer), else a dense
SwiGLU Qwen3MoeMLP of ``intermediate_size``. The sparse block: router softmax over all experts in
float32, top ``num_experts_per_tok``, divided by their sum only with ``norm_topk_prob``; SwiGLU
experts of ``moe_intermediate_size``; no shared expert. In the spec language: ``attention``
with ``qk_norm: head`` (eps rms_norm_eps), ``moe`` (``gate: {type: topk, normalize:
norm_topk_prob}``) or ``ffn``. ``sliding_window`` applies to every layer when
``use_sliding_window`` (Qwen3MoeConfig.__post_init__ drops it otherwise; Qwen3MoeModel: one mask).

config.json calls the expert count ``num_local_experts`` (Qwen3MoeConfig.attribute_map:
``num_experts`` is an alias); on disk ``mlp.experts.e.{gate,up,down}_proj.weight``,
``mlp.gate.weight``, ``self_attn.q_norm.weight`` / ``k_norm.weight`` [head_dim].
"""
from __future__ import annotations

from typing import Optional

from .. import register
from ..llama_like import LlamaLike, dense_export, sparse_layers


class Qwen3Moe(LlamaLike):
    model_type = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    config_class = "Qwen3MoeConfig"
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=128)
    tiny_variants = (
        ({"head_dim": 16, "attention_bias": True}, "head_dim other than hidden / heads, attention_bias"),
        ({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [1, 2], "norm_topk_prob": True},
         "decoder_sparse_step, mlp_only_layers and norm_topk_prob"),
        ({"use_sliding_window": True, "sliding_window": 5}, "sliding window"),
        ({"tie_word_embeddings": True}, "tied embeddings"),
    )
    config_defaults = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                       "attention_dropout": 0.0, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
                       "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
                       "router_aux_loss_coef": 0.001, "mlp_only_layers": None, "head_dim": None}
    understood = {"num_local_experts"}
    # read by nothing in modeling_qwen3_moe.py (Qwen3's real config.json files carry it)
    ignored = {"max_window_layers"}
    attention_features = {"head_dim", "sliding_window", "qk_norm", "qkv_bias", "out_bias"}
    title = "Qwen3-MoE"
    qk_norm = ("head", "normalises each head's query and key")
    one_attention_bias = True
    shared_experts = False
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm"
    new_config = {"initializer_range": 0.02, "use_cache": True, "router_aux_loss_coef": 0.001,
                  "output_router_logits": False}

    def read(self, c, config) -> None:
        if "num_local_experts" in config:  # Qwen3MoeConfig.attribute_map: the name save_pretrained writes
            c["num_experts"] = config["num_local_experts"]
            c.given.add("num_experts")
            c["experts_from"] = "num_local_experts"
        else:
            c["experts_from"] = c.where("num_experts")
        if not isinstance(c["decoder_sparse_step"], int) or c["decoder_sparse_step"] < 1:
            self.refuse("decoder_sparse_step", c["decoder_sparse_step"], "a positive integer")
        c["sparse"] = sparse_layers(c)
        w = c["sliding_window"] if c["use_sliding_window"] else None
        if w is not None and (not isinstance(w, int) or w < 1):
            self.refuse("sliding_window", w, "null or a positive number of keys")
        c["window"] = w

    def layer(self, c, i: int) -> tuple:
        attn = self.attention_fields(c, i)
        attn.append(("qk_norm", "head", "q_norm, k_norm: RMSNorm over each head, eps rms_norm_eps"))
        if c["attention_bias"]:
            attn.append(("bias", "true", c.where("attention_bias")))
        if c["window"] is not None:
            attn.append(("sliding_window", c["window"], "sliding_window (use_sliding_window: every layer)"))
        if not c["sparse"][i]:
            why = "in mlp_only_layers" if i in (c["mlp_only_layers"] or []) else "by decoder_sparse_step"
            return attn, ("ffn", f"mlp: dense ({why})", self.dense_lines(c, "intermediate_size"))
        body = self.moe_lines(c, "num_experts", "moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob")
        body[1] = body[1].split("#")[0] + f"# {c['experts_from']}"
        return attn, ("moe", "mlp: Qwen3MoeSparseMoeBlock", body)

    def ffn_problem(self, f, at) -> Optional[str]:
        return self.dense_ffn_problem(f, at)

    def layer_config(self, spec, a, e) -> tuple:
        cfg = self.attention_config(spec, a)
        cfg.update({"attention_bias": a.config.qkv_bias, "sliding_window": a.config.sliding_window,
                    "use_sliding_window": a.config.sliding_window is not None})
        if e.kind == "ffn":
            cfg["intermediate_size"] = e.config.hidden
        else:
            x, g = e.config.experts, e.config.gate
            cfg.update({"moe_intermediate_size": x.hidden, "num_local_experts": x.count,
                        "num_experts_per_tok": g.k, "norm_topk_prob": g.normalize})
        return cfg, {"moe": e.kind == "moe"}

    def per_layer_config(self, per: list, cfg: dict, recorded: Optional[dict]) -> dict:
        out = dense_export(per, recorded)
        cfg.pop("num_experts", None)  # an alias of num_local_experts
        if "intermediate_size" not in cfg:
            out["intermediate_size"] = (recorded or {}).get("intermediate_size", 6144)
        if "num_local_experts" not in cfg:
            out["num_local_experts"] = 0
        return out


register(Qwen3Moe())
