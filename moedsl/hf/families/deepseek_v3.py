"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"): transformers'
``modeling_deepseek_v3.py``.

    DeepseekV3ForCausalLM: embed_tokens -> [input_layernorm -> DeepseekV3Attention (multi-head
    latent attention) -> post_attention_layernorm -> DeepseekV3MLP (the first
    first_k_dense_replace layers) or DeepseekV3MoE] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), ``repeat K: [latent_attention, ffn
(swiglu, intermediate_size)]``, ``repeat N-K: [latent_attention, moe]``, ``norm``, ``head``.
The MoE layer (DeepseekV3TopkRouter, §2.1.2 of the report): sigmoid scores, the choice made on
score + ``e_score_correction_bias`` (moedsl's ``gate.expert_bias`` with ``bias_balancing``; rate 0
keeps it as loaded), restricted to the ``topk_group`` best of ``n_group`` groups (a group scored
by the sum of its two best), the chosen scores renormalised if ``norm_topk_prob`` and multiplied
by ``routed_scaling_factor``; plus one shared SwiGLU FFN of ``n_shared_experts ×
moe_intermediate_size`` (DeepseekV3MoE builds it even for 0 shared experts: zero-width tensors).

On disk (transformers 5.24's save_pretrained, and the released checkpoints): per expert
``model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight``, the router ``mlp.gate.weight`` [E, d]
and ``mlp.gate.e_score_correction_bias`` [E], ``mlp.shared_experts.*``, the dense layers'
``mlp.{gate,up,down}_proj.weight``, attention ``self_attn.*`` (``LatentAttention.HF_NAMES``). The
fused in-memory layout (``mlp.experts.gate_up_proj``) is accepted on import too.

Rotary positions: rope_type "default", or "yarn" (the released configs: transformers 4's
``rope_scaling: {type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow,
mscale, mscale_all_dim}``, transformers 5's ``rope_parameters``) as ``latent_attention``'s
``rope_scaling``; other rope types are refused.

Multi-token prediction (§2.2): the released checkpoints carry ``num_nextn_predict_layers`` MTP
modules as ``model.layers.{num_hidden_layers + i}.*`` (transformers skips them on load, its
``_keys_to_ignore_on_load_unexpected``). They do not take part in the model's logits (they predict
one more token from the last hidden state, for training and speculative decoding), so the import
skips them, saying so in the spec's header, rather than refusing every real checkpoint; the
export writes ``num_nextn_predict_layers: 0`` since it carries none.
"""
from __future__ import annotations

from typing import Optional

import torch

from moedsl.dtypes import NAMES
from moedsl.errors import UserError, format_path
from moedsl.nn.attention import LatentAttention

from .. import Family, Tensor, register, same
from ..llama_like import IGNORED as _IGNORED_LLAMA
from ..llama_like import at
from ..llama_like import changed as _changed
from ..llama_like import (count_experts, fused_experts, head_problem, moe_problem, spec_header, spec_tail,
                          stack_problem, stack_t, transposed)
from ..llama_like import yaml_float as _yaml_float

# DeepseekV3Config's defaults (transformers' configuration_deepseek_v3.py), for fields a config.json omits
DEFAULTS = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
            "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False,
            "attention_dropout": 0.0, "num_nextn_predict_layers": 1, "rope_theta": 10000.0}
# config.json fields of DeepSeek's own code (the released configs) with the one value transformers computes
FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
# fields that do not change the logits: DeepseekV3Config recomputes head_dim and qk_head_dim;
# pretraining_tp, ep_size, seq_aux, aux_loss_alpha, auto_map are bookkeeping or training-only
IGNORED = _IGNORED_LLAMA | {"head_dim", "qk_head_dim", "pretraining_tp", "ep_size", "seq_aux", "aux_loss_alpha",
                              "auto_map", "num_mtp_layers"}
UNDERSTOOD = set(DEFAULTS) | set(FIXED) | {"rope_parameters", "rope_scaling"}
MLA_NORM_EPS = 1e-6  # DeepseekV3Attention builds q_a_layernorm and kv_a_layernorm with the default eps


def _refuse(field: str, value, supported: str):
    raise UserError(f"config.json: {field} = {value!r} is not supported for deepseek_v3 yet (supported: {supported})")


YARN = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
        "attention_factor", "truncate")  # transformers' yarn fields (_validate_yarn_rope_parameters), the spec's too


def _rope(config: dict) -> dict:
    """rope_theta, where it came from and the yarn scaling (or None), from transformers 5's
    ``rope_parameters`` or transformers 4's ``rope_theta`` + ``rope_scaling`` (the released
    configs: ``{"type": "yarn", ...}``)."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    field = "rope_scaling" if legacy else "rope_parameters"
    if legacy:
        params = {**({"rope_theta": params["rope_theta"]} if "rope_theta" in params else {}), **legacy}
    key = "rope_type" if "rope_type" in params else "type"
    kind = params.get(key, "default")
    if kind not in ("default", "yarn"):
        _refuse(f"{field}.{key}", kind, "'default' and 'yarn'")
    allowed = {"rope_type", "type", "rope_theta"} | (set(YARN) if kind == "yarn" else set())
    extra = sorted(set(params) - allowed)
    if extra:
        _refuse(f"{field}.{extra[0]}", params[extra[0]],
                f"rope_type {kind!r} with {', '.join(sorted(allowed - {'type'}))}")
    if "rope_theta" in params:
        out = {"rope_theta": float(params["rope_theta"]), "rope_from": f"{field}.rope_theta"}
    elif "rope_theta" in config:
        out = {"rope_theta": float(config["rope_theta"]), "rope_from": "rope_theta"}
    else:
        out = {"rope_theta": DEFAULTS["rope_theta"], "rope_from": "DeepseekV3Config's default"}
    out["yarn"] = _yarn(params, field, config) if kind == "yarn" else None
    return out


def _yarn(params: dict, field: str, config: dict) -> dict:
    """The spec's ``rope_scaling`` fields (each with the config field it came from)."""
    orig = params.get("original_max_position_embeddings")
    if not isinstance(orig, int) or orig < 1:
        _refuse(f"{field}.original_max_position_embeddings", orig, "a positive integer (yarn needs it)")
    y = {"factor": (params.get("factor"), f"{field}.factor")}
    if y["factor"][0] is None:  # _compute_yarn_parameters: the ratio of the context lengths
        maxpos = config.get("max_position_embeddings", DEFAULTS["max_position_embeddings"])
        y["factor"] = (maxpos / orig, f"max_position_embeddings / {field}.original_max_position_embeddings")
    if not isinstance(y["factor"][0], (int, float)) or y["factor"][0] <= 0:
        _refuse(f"{field}.factor", y["factor"][0], "a positive number")
    for name in YARN[1:]:
        if params.get(name) is not None:
            y[name] = (params[name], f"{field}.{name}")
    return y


def read_config(config: dict) -> dict:
    """The architecture fields of a DeepSeek-V3 config.json, defaults filled in; refuses (one
    line, naming the field) what the spec language cannot express yet."""
    for key in sorted(config):
        if key == "quantization_config":
            _refuse(key, config[key].get("quant_method", "?") if isinstance(config[key], dict) else config[key],
                    "unquantized weights (float32, bfloat16, float16): dequantize the checkpoint first")
        if key not in UNDERSTOOD and key not in IGNORED:
            _refuse(key, config[key], "the fields of transformers' DeepseekV3Config")
    for key, want in FIXED.items():
        if key in config and config[key] != want:
            _refuse(key, config[key], repr(want))
    c = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    if "num_mtp_layers" in config and "num_nextn_predict_layers" not in config:
        c["num_nextn_predict_layers"] = config["num_mtp_layers"]
    c["given"] = set(config)
    c.update(_rope(config))
    heads = c["num_attention_heads"]
    if c["num_key_value_heads"] is None:  # DeepseekV3Config.__post_init__
        c["num_key_value_heads"] = heads
    if c["num_key_value_heads"] != heads:
        _refuse("num_key_value_heads", c["num_key_value_heads"],
                f"num_attention_heads = {heads}: latent attention has one key and value per head")
    if c["v_head_dim"] is None:
        _refuse("v_head_dim", None, "a positive integer")
    if c["hidden_act"] != "silu":
        _refuse("hidden_act", c["hidden_act"], "'silu' (SwiGLU experts and MLPs)")
    E = c["n_routed_experts"]
    if c["num_experts_per_tok"] is None or not 0 < c["num_experts_per_tok"] <= E:
        _refuse("num_experts_per_tok", c["num_experts_per_tok"], f"1 to n_routed_experts = {E}")
    if c["first_k_dense_replace"] is None:
        c["first_k_dense_replace"] = 0  # DeepseekV3DecoderLayer: layer_idx >= None fails; the reference reads 0
    if c["norm_topk_prob"] is None:
        c["norm_topk_prob"] = False
    groups, top = c["n_group"], c["topk_group"]
    if groups not in (None, 1):
        if E % groups or E // groups < 2:
            _refuse("n_group", groups, f"a divisor of n_routed_experts = {E} leaving at least 2 experts a group "
                    "(a group is scored by its two best)")
        if top is None or not 0 < top <= groups:
            _refuse("topk_group", top, f"1 to n_group = {groups}")
        if top * (E // groups) < c["num_experts_per_tok"]:
            _refuse("topk_group", top, f"enough groups for num_experts_per_tok = {c['num_experts_per_tok']} "
                    f"(at least {-(-c['num_experts_per_tok'] // (E // groups))})")
    if c["n_shared_experts"] is None:
        c["n_shared_experts"] = 0
    dtype = config.get("dtype", config.get("torch_dtype", NAMES[0]))
    if dtype not in NAMES:
        _refuse("dtype", dtype, ", ".join(NAMES))
    c["dtype"] = dtype
    return c


def _where(c: dict, key: str) -> str:
    return key if key in c["given"] else f"{key} (DeepseekV3Config's default)"


def _mla_lines(c: dict, w, indent: str) -> list:
    q = c["q_lora_rank"]
    lines = [
        f"{indent}heads: {c['num_attention_heads']}  # {w('num_attention_heads')}",
        f"{indent}q_lora_rank: {'null' if q is None else q}  # {w('q_lora_rank')}"
        f"{': q_proj' if q is None else ': q_a_proj, q_a_layernorm, q_b_proj'}",
        f"{indent}kv_lora_rank: {c['kv_lora_rank']}  # {w('kv_lora_rank')}",
        f"{indent}qk_nope_head_dim: {c['qk_nope_head_dim']}  # {w('qk_nope_head_dim')}",
        f"{indent}qk_rope_head_dim: {c['qk_rope_head_dim']}  # {w('qk_rope_head_dim')}",
        f"{indent}v_head_dim: {c['v_head_dim']}  # {w('v_head_dim')}",
        f"{indent}rope_theta: {_yaml_float(c['rope_theta'])}  # {c['rope_from']}",
        f"{indent}rope_interleave: {'true' if c['rope_interleave'] else 'false'}  # {w('rope_interleave')}",
    ]
    if c["yarn"] is not None:
        lines.append(f"{indent}rope_scaling:  # rope_type yarn (YaRN): frequencies, cos/sin and softmax scale")
        lines.append(f"{indent}  type: yarn")
        for name, (value, where) in c["yarn"].items():
            text = ("true" if value else "false") if isinstance(value, bool) else \
                value if isinstance(value, int) else _yaml_float(value)
            lines.append(f"{indent}  {name}: {text}  # {where}")
    lines += [
        f"{indent}norm_eps: {_yaml_float(MLA_NORM_EPS)}  # DeepseekV3RMSNorm's default: q_a_ and kv_a_layernorm",
        f"{indent}bias: {'true' if c['attention_bias'] else 'false'}  # {w('attention_bias')}",
    ]
    if c["attention_dropout"]:
        lines.append(f"{indent}dropout: {c['attention_dropout']}  # attention_dropout")
    return lines


def spec_text(config: dict, source: str, name: str) -> str:
    c = read_config(config)
    w = lambda key: _where(c, key)  # noqa: E731
    tie = bool(c["tie_word_embeddings"])
    N, K = c["num_hidden_layers"], min(c["first_k_dense_replace"], c["num_hidden_layers"])
    mtp = c["num_nextn_predict_layers"] or 0
    lines = spec_header(source, "deepseek_v3", config.get("architectures") or ["DeepseekV3ForCausalLM"])
    if mtp:
        lines += [
            f"# Not imported: num_nextn_predict_layers = {mtp} multi-token-prediction module(s)"
            f" (model.layers.{N}{'' if mtp == 1 else f'-{N + mtp - 1}'}.* if the",
            "# checkpoint has them): they predict one more token for training and speculative decoding and",
            "# take no part in the logits, which transformers does not load either.",
        ]
    lines += [
        "moedsl: 1",
        f"name: {name}",
        f"description: {name} imported from Hugging Face (deepseek_v3)",
        "model:",
        f"  vocab_size: {c['vocab_size']}  # {w('vocab_size')}",
        f"  d_model: {c['hidden_size']}  # {w('hidden_size')}",
        f"  max_seq_len: {c['max_position_embeddings']}  # {w('max_position_embeddings')}",
        f"  dtype: {c['dtype']}  # dtype of config.json (the weights' dtype on disk)",
        "  router_dtype: float32  # DeepseekV3TopkRouter: float32 weight (_keep_in_fp32_modules_strict), logits and "
        "sigmoid",
        "  norm: rmsnorm  # DeepseekV3RMSNorm, before each sublayer",
        f"  norm_eps: {_yaml_float(c['rms_norm_eps'])}  # {w('rms_norm_eps')}",
        f"  tie_embeddings: {'true' if tie else 'false'}  # {w('tie_word_embeddings')}",
        "layers:",
        "  - embedding: {}  # model.embed_tokens (no positions: rotary attention)",
    ]
    first = True
    for count, dense in ((K, True), (N - K, False)):
        if not count:
            continue
        what = f"{w('first_k_dense_replace')}: model.layers.0-{K - 1}" if dense else \
            (f"num_hidden_layers - first_k_dense_replace: model.layers.{K}-{N - 1}" if K else
             f"{w('num_hidden_layers')}: model.layers.*")
        lines += [f"  - repeat: {count}  # {what}", "    block:"]
        if first:
            lines.append("      - latent_attention: &mla  # self_attn (DeepseekV3Attention)")
            lines += _mla_lines(c, w, "          ")
            first = False
        else:
            lines.append("      - latent_attention: *mla  # self_attn, as above")
        if dense:
            lines += [
                "      - ffn:  # mlp (DeepseekV3MLP): gate_proj, up_proj, down_proj",
                f"          hidden: {c['intermediate_size']}  # {w('intermediate_size')}",
                "          activation: swiglu  # hidden_act silu, gated",
            ]
            continue
        lines += [
            "      - moe:  # mlp (DeepseekV3MoE)",
            "          experts:",
            f"            count: {c['n_routed_experts']}  # {w('n_routed_experts')}",
            f"            hidden: {c['moe_intermediate_size']}  # {w('moe_intermediate_size')}",
            "            activation: swiglu  # hidden_act silu: experts.e.gate_proj, up_proj, down_proj",
        ]
        if c["n_shared_experts"]:
            lines.append(f"            shared: {{count: {c['n_shared_experts']}, hidden: {c['moe_intermediate_size']}}}"
                         f"  # {w('n_shared_experts')} × moe_intermediate_size: shared_experts")
        else:
            lines.append(f"            # no shared experts: {w('n_shared_experts')} = 0 (zero-width shared_experts)")
        groups = c["n_group"]
        lines += [
            "          gate:",
            "            type: topk  # mlp.gate (DeepseekV3TopkRouter)",
            f"            k: {c['num_experts_per_tok']}  # {w('num_experts_per_tok')}",
            "            score: sigmoid  # scoring_func sigmoid",
            f"            normalize: {'true' if c['norm_topk_prob'] else 'false'}  # {w('norm_topk_prob')}",
            f"            scale: {_yaml_float(c['routed_scaling_factor'])}  # {w('routed_scaling_factor')}",
        ]
        if groups not in (None, 1):
            lines.append(f"            groups: {{count: {groups}, top: {c['topk_group']}}}  # {w('n_group')}, "
                         f"{w('topk_group')}")
        else:
            lines.append(f"            # no group limit: {w('n_group')} = {groups!r}")
        lines += [
            "            bias_balancing: {rate: 0}  # gate.e_score_correction_bias, as loaded; a rate > 0 moves it "
            "(aux-loss-free balancing, §2.1.2)",
            "            drop_policy: dropless  # DeepSeek-V3 drops no token",
        ]
    return "\n".join(lines + spec_tail(tie))


# -- the spec's structure ------------------------------------------------------------------

def layout(spec):
    """(the problem, or None; [(attention index, ffn or moe index, dense?)], final norm index)."""
    layers = spec.layers
    why = stack_problem(spec, "DeepSeek-V3", "[latent_attention, ffn or moe] × N", 5)
    if why is None and _changed(layers[0].config, set()):
        name, value = _changed(layers[0].config, set())
        why = f"{at(layers[0], name)} {value!r} (DeepSeek-V3's embedding has no positions)"
    why = why or head_problem(spec, "DeepSeek-V3")
    if why:
        return why, None, None
    norm = layers[-2]
    body = layers[1:-2]
    out, seen = [], {}
    for i in range(0, len(body), 2):
        a, f = body[i], body[i + 1] if i + 1 < len(body) else None
        if a.kind != "latent_attention" or f is None or f.kind not in ("ffn", "moe"):
            bad = a if a.kind != "latent_attention" else (f or a)
            return f"{format_path(bad.path)}: {bad.kind} where DeepSeek-V3 has [latent_attention, ffn or moe] " \
                   "pairs", None, None
        dense = f.kind == "ffn"
        if not dense:
            seen["moe"] = True
        elif seen.get("moe"):
            return f"{format_path(f.path)}: a dense ffn after a moe layer (DeepSeek-V3's dense layers come first)", \
                None, None
        why = _attention_problem(a, at) or (_ffn_problem(f, at) if dense else _moe_problem(f, at))
        if why:
            return why, None, None
        for key, cfg in (("attention", a.config), (f.kind, f.config)):
            if seen.setdefault(key + "_cfg", cfg) != cfg:
                return f"{format_path(a.path if key == 'attention' else f.path)}: a {key} layer that differs " \
                       f"from the first (DeepSeek-V3's are all alike)", None, None
        out.append((a.index, f.index, dense))
    return None, out, norm.index


def _attention_problem(a, at) -> Optional[str]:
    c = a.config
    for name, want in (("causal", True), ("residual", True), ("prenorm", True), ("norm_eps", MLA_NORM_EPS)):
        if getattr(c, name) != want:
            return f"{at(a, name)} {getattr(c, name)!r} (DeepSeek-V3: {want!r})"
    changed = _changed(c, {"heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                           "v_head_dim", "rope_theta", "rope_interleave", "rope_scaling", "norm_eps", "causal",
                           "dropout", "bias", "residual", "prenorm"})
    return f"{at(a, changed[0])} {changed[1]!r}" if changed else None


def _ffn_problem(f, at) -> Optional[str]:
    c = f.config
    if c.activation != "swiglu":
        return f"{at(f, 'activation')} {c.activation} (DeepSeek-V3's MLP is swiglu)"
    for name, want in (("bias", False), ("residual", True), ("prenorm", True)):
        if getattr(c, name) != want:
            return f"{at(f, name)} {getattr(c, name)!r} (DeepSeek-V3: {want!r})"
    changed = _changed(c, {"hidden", "activation", "bias", "residual", "prenorm"})
    return f"{at(f, changed[0])} {changed[1]!r}" if changed else None


def _shared_problem(e, x) -> Optional[str]:
    if x.shared.gate:
        return f"{at(e, 'experts', 'shared', 'gate')} true (DeepSeek-V3's shared experts have no gate)"
    if x.shared.hidden != x.hidden:
        return f"{at(e, 'experts', 'shared', 'hidden')} {x.shared.hidden} (DeepSeek-V3's shared experts are " \
               f"as wide as the routed ones, experts.hidden {x.hidden})"
    return None


def _moe_problem(e, at) -> Optional[str]:
    """DeepseekV3MoE: sigmoid scores, the correction bias, group limits, the routed scaling factor,
    ungated shared experts as wide as the routed ones, no jitter."""
    return moe_problem(e, at, "DeepSeek-V3", activations=("swiglu",), score="sigmoid",
                       score_says="DeepSeek-V3 scores with a sigmoid", balancing_bias=True, groups=True, scale=True,
                       jitter=False, shared=lambda x: _shared_problem(e, x), gate_also=frozenset({"capacity_rounding"}))


def _mla_names(spec, a: int) -> list:
    """(moedsl name, name under ``self_attn.``) of latent attention layer ``a``'s parameters."""
    c = spec.layers[a].config
    mine = ["wq.weight"] if c.q_lora_rank is None else ["wq_a.weight", "q_norm.weight", "wq_b.weight"]
    mine += ["wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"]
    if c.bias:
        mine += (["wq_a.bias"] if c.q_lora_rank is not None else []) + ["wkv_a.bias", "wo.bias"]
    out = []
    for name in mine:
        prefix, _, rest = name.partition(".")
        out.append((f"layers.{a}.latent_attention.{name}", f"self_attn.{LatentAttention.HF_NAMES[prefix]}.{rest}"))
    return out


def _rope_parameters(a) -> dict:
    """transformers 5's ``rope_parameters`` of a latent attention config."""
    out = {"rope_type": "default", "rope_theta": a.rope_theta}
    y = a.rope_scaling
    if y is not None:
        out["rope_type"] = "yarn"
        out.update({name: getattr(y, name) for name in YARN if getattr(y, name) is not None})
        if y.truncate:  # transformers' default
            del out["truncate"]
    return out


_FFN = (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj"))


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    config_class = "DeepseekV3Config"
    # every feature at once: low-rank queries, a dense first layer, groups, shared experts
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                       num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                       q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       max_position_embeddings=128)
    # (config overrides, what it covers): tests/test_hf_import.py and bench/hf_parity.py run each
    tiny_variants = (
        (dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, n_group=1, topk_group=1,
              n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.75,
              tie_word_embeddings=True),
         "full q, half-split rope, attention_bias, no groups, no shared expert, all MoE, tied"),
        (dict(n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=2),
         "4 groups top 2, k 3, 2 shared experts, 2 dense layers"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                               "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 0.7, "mscale_all_dim": 1.0}),
         "yarn rope scaling with mscale_all_dim"),
    )

    # DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict: the router's weight and choice bias stay
    # float32 in a bfloat16 or float16 model, and DeepseekV3TopkRouter computes its logits in float32
    float32_tensors = (r"\.mlp\.gate\.weight$", r"\.mlp\.gate\.e_score_correction_bias$")

    def spec_text(self, config: dict, source: str, name: str = "deepseek-v3") -> str:
        return spec_text(config, source, name)

    def _layout(self, spec):
        why, pairs, norm = layout(spec)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face deepseek_v3 equivalent")
        return pairs, norm

    def architecture_problem(self, spec) -> Optional[str]:
        return layout(spec)[0]

    def skipped_tensors(self, config: dict, names: set) -> set:
        """The multi-token-prediction modules (``model.layers.{N + i}.*``) and the zero-width
        shared experts DeepseekV3MoE builds for ``n_shared_experts`` 0."""
        c = read_config(config)
        N, mtp, skip = c["num_hidden_layers"], c["num_nextn_predict_layers"] or 0, set()
        for name in names:
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and \
                    N <= int(parts[2]) < N + mtp:
                skip.add(name)
            if not c["n_shared_experts"] and ".mlp.shared_experts." in name:
                skip.add(name)
        return skip

    def import_tensors(self, spec, config: dict, names: set) -> list:
        pairs, norm = self._layout(spec)
        out = [Tensor("embedding.weight", ("model.embed_tokens.weight",), same)]
        for L, (a, m, dense) in enumerate(pairs):
            hf = f"model.layers.{L}."
            out.append(Tensor(f"layers.{a}.norm.weight", (hf + "input_layernorm.weight",), same))
            out += [Tensor(ours, (hf + theirs,), same) for ours, theirs in _mla_names(spec, a)]
            out.append(Tensor(f"layers.{m}.norm.weight", (hf + "post_attention_layernorm.weight",), same))
            if dense:
                out += [Tensor(f"layers.{m}.ffn.{ours}.weight", (f"{hf}mlp.{theirs}.weight",), same)
                        for ours, theirs in _FFN]
                continue
            moe, x, g = hf + "mlp.", spec.layers[m].config.experts, spec.layers[m].config.gate
            out.append(Tensor(f"layers.{m}.gate.weight", (moe + "gate.weight",), same))
            if g.bias_balancing_rate is not None:
                out.append(Tensor(f"layers.{m}.gate.expert_bias", (moe + "gate.e_score_correction_bias",), same))
            if moe + "experts.gate_up_proj" in names:  # transformers 5's in-memory (fused) layout
                out += fused_experts(m, moe)
            else:
                for ours, theirs in _FFN:
                    count = count_experts(names, f"{moe}experts.", theirs) or x.count
                    out.append(Tensor(f"layers.{m}.experts.{ours}",
                                      tuple(f"{moe}experts.{e}.{theirs}.weight" for e in range(count)), stack_t))
            if x.shared is not None:
                out += [Tensor(f"layers.{m}.shared.{ours}.weight", (f"{moe}shared_experts.{theirs}.weight",), same)
                        for ours, theirs in _FFN]
        out.append(Tensor(f"layers.{norm}.norm.weight", ("model.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("head.weight", ("lm_head.weight",), same))
        return out

    def export_config(self, spec, recorded: Optional[dict]) -> dict:
        pairs, _ = self._layout(spec)
        a = spec.layers[pairs[0][0]].config
        dense = [spec.layers[m].config for _, m, d in pairs if d]
        moes = [spec.layers[m].config for _, m, d in pairs if not d]
        cfg = dict(recorded or {"bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "use_cache": True,
                                "pretraining_tp": 1})
        for stale in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version", "_name_or_path",
                      "head_dim", "qk_head_dim", "num_mtp_layers", "quantization_config", "auto_map"):
            cfg.pop(stale, None)
        d = spec.model.d_model
        cfg.update({
            "architectures": list(self.architectures), "model_type": self.model_type,
            "vocab_size": spec.model.vocab_size, "hidden_size": d, "num_hidden_layers": len(pairs),
            "first_k_dense_replace": len(dense), "num_attention_heads": a.heads, "num_key_value_heads": a.heads,
            "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "attention_bias": a.bias,
            "attention_dropout": a.dropout, "rope_interleave": a.rope_interleave, "hidden_act": "silu",
            "max_position_embeddings": spec.model.max_seq_len, "rms_norm_eps": spec.model.norm_eps,
            "tie_word_embeddings": spec.model.tie_embeddings, "num_nextn_predict_layers": 0,
            "rope_parameters": _rope_parameters(a),
            "dtype": spec.model.dtype,
        })
        # fields of a layer kind the model lacks keep what was recorded (or the config's default)
        cfg["intermediate_size"] = dense[0].hidden if dense else cfg.get("intermediate_size", 4 * d)
        if moes:
            x, g = moes[0].experts, moes[0].gate
            cfg.update({
                "n_routed_experts": x.count, "moe_intermediate_size": x.hidden,
                "n_shared_experts": x.shared.count if x.shared is not None else 0,
                "num_experts_per_tok": g.k, "norm_topk_prob": g.normalize, "routed_scaling_factor": g.scale,
                "n_group": g.groups.count if g.groups is not None else 1,
                "topk_group": g.groups.top if g.groups is not None else 1,
            })
        for key in ("scoring_func", "topk_method"):
            if key in cfg:
                cfg[key] = FIXED[key]
        return cfg

    def export_tensors(self, spec) -> list:
        pairs, norm = self._layout(spec)
        d = spec.model.d_model
        out = [Tensor("model.embed_tokens.weight", ("embedding.weight",), same)]
        for L, (a, m, dense) in enumerate(pairs):
            hf = f"model.layers.{L}."
            out.append(Tensor(hf + "input_layernorm.weight", (f"layers.{a}.norm.weight",), same))
            out += [Tensor(hf + theirs, (ours,), same) for ours, theirs in _mla_names(spec, a)]
            out.append(Tensor(hf + "post_attention_layernorm.weight", (f"layers.{m}.norm.weight",), same))
            if dense:
                out += [Tensor(f"{hf}mlp.{theirs}.weight", (f"layers.{m}.ffn.{ours}.weight",), same)
                        for ours, theirs in _FFN]
                continue
            moe, x, g = hf + "mlp.", spec.layers[m].config.experts, spec.layers[m].config.gate
            out.append(Tensor(moe + "gate.weight", (f"layers.{m}.gate.weight",), same))
            if g.bias_balancing_rate is not None:
                out.append(Tensor(moe + "gate.e_score_correction_bias", (f"layers.{m}.gate.expert_bias",), same))
            else:  # no choice bias: DeepseekV3TopkRouter's is zero
                out.append(Tensor(moe + "gate.e_score_correction_bias", (), lambda ts, E=x.count: torch.zeros(E)))
            for e in range(x.count):
                for ours, theirs in _FFN:
                    out.append(Tensor(f"{moe}experts.{e}.{theirs}.weight", ((f"layers.{m}.experts.{ours}", e),),
                                      lambda ts: transposed(ts[0])))
            if x.shared is not None:
                out += [Tensor(f"{moe}shared_experts.{theirs}.weight", (f"layers.{m}.shared.{ours}.weight",), same)
                        for ours, theirs in _FFN]
            else:  # DeepseekV3MoE's shared MLP of width 0 (n_shared_experts 0): zero-size tensors
                out += [Tensor(f"{moe}shared_experts.{theirs}.weight", (),
                               lambda ts, s=shape: torch.zeros(s))
                        for theirs, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0)))]
        out.append(Tensor("model.norm.weight", (f"layers.{norm}.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("lm_head.weight", ("head.weight",), same))
        return out


register(DeepseekV3())
