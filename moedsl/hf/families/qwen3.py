"""Qwen3 (Yang et al. 2025, "Qwen3 Technical Report", §2: QK-Norm, no QKV bias): transformers'
``modeling_qwen3.py``.

    Qwen3ForCausalLM: embed_tokens -> [input_layernorm -> Qwen3Attention (GQA, an RMSNorm of each
    head's query and key before the rotary positions, biases on all four projections with
    attention_bias, head_dim possibly ≠ hidden / heads) -> post_attention_layernorm -> Qwen3MLP
    (SwiGLU)] × N -> norm -> lm_head

is, in the spec language, ``embedding``, per layer ``attention`` (``qk_norm: head``, eps
rms_norm_eps) and ``ffn`` (swiglu), ``norm``, ``head``. Qwen3Config's ``head_dim`` defaults to
128 whatever hidden_size / num_attention_heads is. Sliding windows are per layer as in Qwen2
(Qwen3Config.__post_init__: ``layer_types``, else ``i >= max_window_layers`` with
``use_sliding_window``).

On disk: ``model.layers.L.self_attn.{q,k,v,o}_proj.weight`` (``.bias``),
``self_attn.q_norm.weight`` / ``k_norm.weight`` [head_dim], ``mlp.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

from .. import register
from ..llama_like import FULL, SLIDING, DenseLayerTypes


class Qwen3(DenseLayerTypes):
    model_type = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    config_class = "Qwen3Config"
    tiny_config = {**DenseLayerTypes.tiny_config, "head_dim": 8}
    tiny_variants = (
        ({"head_dim": 16, "attention_bias": True}, "head_dim other than hidden / heads, attention_bias"),
        ({"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
         "sliding layers from max_window_layers"),
        ({"tie_word_embeddings": True}, "tied embeddings"),
    )
    # Qwen3Config's defaults (transformers' configuration_qwen3.py), for fields a config.json omits
    config_defaults = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                       "max_window_layers": 28, "layer_types": None, "attention_dropout": 0.0}
    attention_features = {"head_dim", "sliding_window", "qk_norm", "qkv_bias", "out_bias"}
    title = "Qwen3"
    qk_norm = ("head", "normalises each head's query and key")
    one_attention_bias = True
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm"
    new_config = {"initializer_range": 0.02, "use_cache": True, "max_window_layers": 28}

    def attention_own(self, c) -> list:
        out = [("qk_norm", "head", "q_norm, k_norm: RMSNorm over each head, eps rms_norm_eps")]
        if c["attention_bias"]:
            out.append(("bias", "true", c.where("attention_bias")))
        return out

    def attention_own_config(self, cfg: dict, a) -> None:
        cfg["attention_bias"] = a.config.qkv_bias


register(Qwen3())
