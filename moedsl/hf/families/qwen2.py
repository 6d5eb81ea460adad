"""Qwen2 (Yang et al. 2024, "Qwen2 Technical Report", §2.2.1; Qwen2.5): transformers'
``modeling_qwen2.py``.

    Qwen2ForCausalLM: embed_tokens -> [input_layernorm -> Qwen2Attention (GQA, rotary, biases on
    q, k and v always, none on o) -> post_attention_layernorm -> Qwen2MLP (SwiGLU)] × N -> norm
    -> lm_head

is, in the spec language, ``embedding``, per layer ``attention`` (``qkv_bias: true``) and
``ffn`` (swiglu), ``norm``, ``head``. Sliding windows are per layer (Qwen2Config.__post_init__):
``sliding_window`` is kept only with ``use_sliding_window`` (else null), and ``layer_types`` (if
config.json omits it) makes layer i ``sliding_attention`` when ``i >= max_window_layers`` and a
window is kept; a sliding layer sees its last ``sliding_window`` keys. Qwen2Config has no
``head_dim`` field, but Qwen2Attention reads one from config.json when it is there.

On disk: ``model.layers.L.self_attn.{q,k,v}_proj.{weight,bias}``, ``self_attn.o_proj.weight``,
``model.layers.L.mlp.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

from typing import Optional

from .. import register
from ..llama_like import FULL, SLIDING, DenseLayerTypes


class Qwen2(DenseLayerTypes):
    model_type = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    config_class = "Qwen2Config"
    tiny_variants = (
        ({"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
         "sliding layers from max_window_layers"),
        ({"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 4,
          "layer_types": [SLIDING, FULL, SLIDING]}, "sliding layers from layer_types"),
        ({"tie_word_embeddings": True, "head_dim": 16}, "tied embeddings, head_dim other than hidden / heads"),
    )
    # Qwen2Config's defaults (transformers' configuration_qwen2.py), for fields a config.json omits
    config_defaults = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                       "layer_types": None, "attention_dropout": 0.0, "head_dim": None}
    attention_features = {"head_dim", "sliding_window", "qkv_bias"}
    title = "Qwen2"
    attention_comment = "self_attn: q_proj, k_proj, v_proj (with bias), o_proj (no bias)"
    new_config = {"initializer_range": 0.02, "use_cache": True, "max_window_layers": 28}

    def attention_own(self, c) -> list:
        return [("qkv_bias", "true", "q_proj, k_proj, v_proj have a bias in every Qwen2")]

    def attention_problem(self, spec, a, at) -> Optional[str]:
        if not a.config.qkv_bias:
            return f"{at(a, 'qkv_bias')} false (Qwen2's q_proj, k_proj, v_proj always have a bias)"
        return super().attention_problem(spec, a, at)


register(Qwen2())
