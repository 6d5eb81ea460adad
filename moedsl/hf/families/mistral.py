"""Mistral (Jiang et al. 2023, "Mistral 7B", §2: sliding window attention): transformers'
``modeling_mistral.py``.

    MistralForCausalLM: embed_tokens -> [input_layernorm -> MistralAttention (GQA, rotary, no
    bias) -> post_attention_layernorm -> MistralMLP (SwiGLU)] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), ``repeat N: [attention(heads, kv_heads,
head_dim, positions: rotary, rope_theta, sliding_window), ffn(hidden: intermediate_size,
swiglu)]``, ``norm``, ``head``. A ``sliding_window`` that is not null applies to every layer
(MistralModel.forward: one sliding mask for all); MistralConfig's default is 4096, so a
config.json without the field slides by 4096 keys.

On disk: ``model.layers.L.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.L.mlp.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

from .. import register
from ..llama_like import DenseLlamaLike


class Mistral(DenseLlamaLike):
    model_type = "mistral"
    architectures = ("MistralForCausalLM",)
    config_class = "MistralConfig"
    tiny_variants = (({"sliding_window": 5}, "sliding window on every layer"),
                     ({"sliding_window": None, "head_dim": 16, "tie_word_embeddings": True},
                      "no sliding window, head_dim other than hidden / heads, tied embeddings"))
    # MistralConfig's defaults (transformers' configuration_mistral.py), for fields a config.json omits
    config_defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                       "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "sliding_window": 4096, "attention_dropout": 0.0}
    attention_features = {"head_dim", "sliding_window"}
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj (no bias)"
    new_config = {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True}

    def read(self, c, config) -> None:
        w = c["sliding_window"]
        if w is not None and (not isinstance(w, int) or w < 1):
            self.refuse("sliding_window", w, "null or a positive number of keys")

    def attention_extra(self, c, i: int) -> list:
        w = c["sliding_window"]
        return [] if w is None else [("sliding_window", w, c.where("sliding_window") + " (every layer)")]

    def dense_config(self, cfg: dict, a) -> tuple:
        cfg["sliding_window"] = a.config.sliding_window
        return cfg, {}


register(Mistral())
