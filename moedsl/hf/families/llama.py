"""Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", §2.2; Llama 2
and 3): transformers' ``modeling_llama.py``.

    LlamaForCausalLM: embed_tokens -> [input_layernorm -> LlamaAttention (GQA, rotary, biases on
    q, k, v and o with attention_bias) -> post_attention_layernorm -> LlamaMLP (SwiGLU:
    down_proj(silu(gate_proj(x)) ⊙ up_proj(x)))] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), ``repeat N: [attention(heads, kv_heads,
head_dim, positions: rotary, rope_theta, bias), ffn(hidden: intermediate_size, swiglu)]``,
``norm`` (rmsnorm, rms_norm_eps), ``head`` (tied if tie_word_embeddings). Llama never slides
(LlamaModel: causal mask). ``mlp_bias`` (biases on the MLP's three projections) is refused;
``pretraining_tp`` is read by nothing in transformers 5's modeling file.

On disk: ``model.layers.L.self_attn.{q,k,v,o}_proj.weight`` (``.bias``),
``model.layers.L.mlp.{gate,up,down}_proj.weight``, as moedsl's ``attention`` and ``ffn``
(``w_gate``, ``w_in``, ``w_out``) hold them.
"""
from __future__ import annotations

from .. import register
from ..llama_like import DenseLlamaLike


class Llama(DenseLlamaLike):
    model_type = "llama"
    architectures = ("LlamaForCausalLM",)
    config_class = "LlamaConfig"
    tiny_variants = (({"attention_bias": True, "head_dim": 16}, "attention_bias, head_dim other than hidden / heads"),
                     ({"tie_word_embeddings": True, "rope_theta": 500000.0}, "tied embeddings, rope_theta"),
                     ({"hidden_act": "gelu", "num_key_value_heads": None}, "hidden_act gelu (GEGLU MLP), no GQA"))
    # LlamaConfig's defaults (transformers' configuration_llama.py), for fields a config.json omits
    config_defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "head_dim": None}
    ignored = {"pretraining_tp"}  # read by nothing in modeling_llama.py (Llama 2's config.json files carry it)
    attention_features = {"head_dim", "qkv_bias", "out_bias"}
    title = "Llama"
    one_attention_bias = True
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj"
    new_config = {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True,
                  "pretraining_tp": 1}

    def read(self, c, config) -> None:
        if c["mlp_bias"]:
            self.refuse("mlp_bias", c["mlp_bias"], "false (moedsl's imported MLPs have no bias)")

    def attention_extra(self, c, i: int) -> list:
        return [("bias", "true", c.where("attention_bias"))] if c["attention_bias"] else []

    def dense_config(self, cfg: dict, a) -> tuple:
        cfg.update({"attention_bias": a.config.qkv_bias, "mlp_bias": False})
        return cfg, {}


register(Llama())
