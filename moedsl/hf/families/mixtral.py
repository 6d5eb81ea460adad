"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): transformers' ``modeling_mixtral.py``.

    MixtralForCausalLM: embed_tokens -> [input_layernorm -> MixtralAttention (GQA, rotary)
    -> post_attention_layernorm -> MixtralSparseMoeBlock (router softmax in float32, top-k,
    renormalised over the k; SwiGLU experts silu(x·w1ᵀ) ⊙ (x·w3ᵀ) · w2ᵀ)] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), ``repeat N: [attention(heads,
kv_heads, positions: rotary, rope_theta), moe(experts swiglu, gate topk k dropless,
normalize)]``, ``norm`` (rmsnorm, rms_norm_eps), ``head`` (tied if tie_word_embeddings).
moedsl's top-k gate takes the softmax over the k selected logits, which equals transformers'
softmax over all E followed by dividing by the k's sum (MixtralTopKRouter.forward).

On disk (transformers 4 and 5's save_pretrained): per expert
``model.layers.L.block_sparse_moe.experts.e.w1.weight`` [h, d] (gate), ``w3`` [h, d] (up),
``w2`` [d, h] (down), router ``block_sparse_moe.gate.weight`` [E, d]. transformers 5 holds
them in memory fused (``mlp.experts.gate_up_proj`` [E, 2h, d], gate first, and
``mlp.experts.down_proj`` [E, d, h]); a checkpoint written in that layout is accepted too.
moedsl's experts multiply from the right: ``w_gate[e] = w1ᵀ``, ``w_in[e] = w3ᵀ``, ``w_out[e] = w2ᵀ``.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from typing import Optional

from moedsl.errors import UserError, format_path

from .. import Family, Tensor, register, same

# MixtralConfig's defaults (transformers' configuration_mixtral.py), for fields a config.json omits
DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
            "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "sliding_window": None, "attention_dropout": 0.0, "num_experts_per_tok": 2, "num_local_experts": 8,
            "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.001, "output_router_logits": False,
            "rope_theta": 1e6}

# fields that do not change what the model computes (ids, bookkeeping, generation defaults)
IGNORED = {"architectures", "model_type", "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id",
           "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
           "output_router_logits", "router_aux_loss_coef", "return_dict", "output_hidden_states",
           "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
           "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
           "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
           "tokenizer_class", "prefix", "task_specific_params", "problem_type", "max_length", "min_length",
           "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
           "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
           "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
           "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
           "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "dtype",
           "torch_dtype"}
UNDERSTOOD = set(DEFAULTS) | {"rope_parameters", "rope_scaling"}


def _refuse(field: str, value, supported: str):
    raise UserError(f"config.json: {field} = {value!r} is not supported for mixtral yet (supported: {supported})")


def read_config(config: dict) -> dict:
    """The architecture fields of a Mixtral config.json, defaults filled in; refuses (one line,
    naming the field) what the spec language cannot express yet."""
    for key in sorted(config):
        if key not in UNDERSTOOD and key not in IGNORED:
            _refuse(key, config[key], "the fields of transformers' MixtralConfig")
    c = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    c["given"] = set(config)
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling"):
        _refuse("rope_scaling", config["rope_scaling"], "none (default rotary positions)")
    if rope.get("rope_type", "default") != "default":
        _refuse("rope_parameters.rope_type", rope["rope_type"], "'default'")
    extra = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra:
        _refuse(f"rope_parameters.{extra[0]}", rope[extra[0]], "rope_type 'default' and rope_theta")
    c["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", DEFAULTS["rope_theta"])))
    c["rope_from"] = "rope_parameters.rope_theta" if "rope_theta" in rope else \
        "rope_theta" if "rope_theta" in config else "MixtralConfig's default"
    if c["sliding_window"] is not None:
        _refuse("sliding_window", c["sliding_window"], "null (full causal attention)")
    if c["num_key_value_heads"] is None:  # MixtralConfig.__post_init__: one kv head per head
        c["num_key_value_heads"] = c["num_attention_heads"]
    heads, d = c["num_attention_heads"], c["hidden_size"]
    if c["head_dim"] is not None and c["head_dim"] * heads != d:
        _refuse("head_dim", c["head_dim"], f"null or hidden_size / num_attention_heads = {d // heads}")
    if c["hidden_act"] != "silu":
        _refuse("hidden_act", c["hidden_act"], "'silu' (SwiGLU experts)")
    if c["router_jitter_noise"]:
        _refuse("router_jitter_noise", c["router_jitter_noise"], "0 (moedsl's jitter perturbs the router's "
                "input only, Mixtral's the experts' too)")
    from moedsl.dtypes import NAMES

    dtype = config.get("dtype", config.get("torch_dtype", NAMES[0]))
    if dtype not in NAMES:
        _refuse("dtype", dtype, ", ".join(NAMES))
    c["dtype"] = dtype
    return c


def _where(c: dict, key: str) -> str:
    return key if key in c["given"] else f"{key} (MixtralConfig's default)"


def _yaml_float(x: float) -> str:
    text = repr(float(x))
    return text if "e" in text or "." in text else text + ".0"


def spec_text(config: dict, source: str, name: str) -> str:
    c = read_config(config)
    w = lambda key: _where(c, key)  # noqa: E731
    tie = bool(c["tie_word_embeddings"])
    lines = [
        f"# Imported by `moedsl import` from the Hugging Face checkpoint {source}",
        f"# (model_type mixtral, {', '.join(config.get('architectures') or ['MixtralForCausalLM'])}).",
        "# After each field: the config.json field it came from. hf_config.json beside this file keeps",
        "# the whole config.json (`moedsl export` restores the fields the spec does not carry).",
        "# Edit it as you like (e.g. experts.count to upcycle): loading then names each tensor that no",
        "# longer fits. Train from the imported weights with `moedsl run spec.yaml --init DIR`.",
        "moedsl: 1",
        f"name: {name}",
        f"description: {name} imported from Hugging Face (mixtral)",
        "model:",
        f"  vocab_size: {c['vocab_size']}  # {w('vocab_size')}",
        f"  d_model: {c['hidden_size']}  # {w('hidden_size')}",
        f"  max_seq_len: {c['max_position_embeddings']}  # {w('max_position_embeddings')}",
        f"  dtype: {c['dtype']}  # dtype of config.json (the weights' dtype on disk)",
        "  router_dtype: float32  # MixtralTopKRouter takes its softmax in float32",
        "  norm: rmsnorm  # MixtralRMSNorm, before each sublayer",
        f"  norm_eps: {_yaml_float(c['rms_norm_eps'])}  # {w('rms_norm_eps')}",
        f"  tie_embeddings: {'true' if tie else 'false'}  # {w('tie_word_embeddings')}",
        "layers:",
        "  - embedding: {}  # model.embed_tokens (no positions: rotary attention)",
        f"  - repeat: {c['num_hidden_layers']}  # {w('num_hidden_layers')}: model.layers.*",
        "    block:",
        "      - attention:  # self_attn: q_proj, k_proj, v_proj, o_proj (no bias)",
        f"          heads: {c['num_attention_heads']}  # {w('num_attention_heads')}",
        f"          kv_heads: {c['num_key_value_heads']}  # {w('num_key_value_heads')}",
        "          positions: rotary  # MixtralRotaryEmbedding, rope_type default",
        f"          rope_theta: {_yaml_float(c['rope_theta'])}  # {c['rope_from']}",
    ]
    if c["attention_dropout"]:
        lines.append(f"          dropout: {c['attention_dropout']}  # attention_dropout")
    lines += [
        "      - moe:  # block_sparse_moe",
        "          experts:",
        f"            count: {c['num_local_experts']}  # {w('num_local_experts')}",
        f"            hidden: {c['intermediate_size']}  # {w('intermediate_size')}",
        "            activation: swiglu  # hidden_act silu, gated: w1 (gate), w3 (up), w2 (down)",
        "          gate:",
        "            type: topk  # block_sparse_moe.gate: softmax, top-k, renormalised over the k",
        f"            k: {c['num_experts_per_tok']}  # {w('num_experts_per_tok')}",
        "            drop_policy: dropless  # Mixtral drops no token",
        f"          # losses: {{balance: {c['router_aux_loss_coef']}}}  # router_aux_loss_coef: transformers adds "
        "it in training with output_router_logits",
        "  - norm: {}  # model.norm",
        f"  - head: {{}}  # lm_head{' (tied to embed_tokens)' if tie else ''}",
        "train: {batch_size: 8, seq_len: 64, steps: 100, lr: 1.0e-4, warmup: 10}  # for fine-tuning; not from "
        "config.json",
        "",
    ]
    return "\n".join(lines)


# -- the spec's structure ------------------------------------------------------------------

def _changed(cfg, handled: set) -> Optional[tuple]:
    """The first field of the dataclass ``cfg`` outside ``handled`` whose value is not its
    default: a feature this family has no equivalent for (fields added to the spec language
    later are refused here until the family handles them)."""
    for f in fields(cfg):
        if f.name in handled:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if default is MISSING:
            continue
        if getattr(cfg, f.name) != default:
            return f.name, getattr(cfg, f.name)
    return None


def layout(spec):
    """(the problem, or None; [(attention layer index, moe layer index)], final norm index)."""
    m, layers = spec.model, spec.layers

    def at(layer, *names):
        return format_path(tuple(layer.path) + (layer.kind,) + names)

    if m.input != "tokens":
        return "model.input vectors (no embedding or head)", None, None
    if m.norm != "rmsnorm":
        return f"model.norm {m.norm} (Mixtral's norms are RMSNorm)", None, None
    if len(layers) < 4 or layers[0].kind != "embedding" or layers[-2].kind != "norm" or layers[-1].kind != "head":
        return "a stack other than embedding, [attention, moe] × N, norm, head", None, None
    if layers[0].config.positions != "none":
        return f"{at(layers[0], 'positions')} {layers[0].config.positions} (Mixtral has rotary positions)", None, None
    norm, head = layers[-2], layers[-1]
    if norm.config.type != "rmsnorm" or norm.config.eps != m.norm_eps:
        return f"{at(norm)} {norm.config.type} eps {norm.config.eps} (Mixtral: one rms_norm_eps, " \
               f"model.norm_eps {m.norm_eps})", None, None
    if head.config.bias:
        return f"{at(head, 'bias')} true (lm_head has no bias)", None, None
    body = layers[1:-2]
    pairs, first = [], None
    for i in range(0, len(body), 2):
        a, e = body[i], body[i + 1] if i + 1 < len(body) else None
        if a.kind != "attention" or e is None or e.kind != "moe":
            bad = a if a.kind != "attention" else (e or a)
            return f"{format_path(bad.path)}: {bad.kind} where Mixtral has [attention, moe] pairs", None, None
        why = _attention_problem(a, at) or _moe_problem(e, at)
        if why:
            return why, None, None
        shape = (a.config.heads, a.config.kv_heads, a.config.rope_theta, a.config.dropout, e.config.experts.count,
                 e.config.experts.hidden, e.config.gate.k)
        if first is not None and shape != first:
            return f"{format_path(a.path)}: layers that differ from the first (Mixtral's are all alike)", None, None
        first = shape
        pairs.append((a.index, e.index))
    return None, pairs, norm.index


def _attention_problem(a, at) -> Optional[str]:
    c = a.config
    if c.positions != "rotary":
        return f"{at(a, 'positions')} {c.positions} (Mixtral has rotary positions)"
    for name, want in (("causal", True), ("bias", False), ("residual", True), ("prenorm", True)):
        if getattr(c, name) != want:
            return f"{at(a, name)} {getattr(c, name)}"
    changed = _changed(c, {"heads", "kv_heads", "positions", "rope_theta", "causal", "dropout", "bias", "residual",
                           "prenorm"})
    return f"{at(a, changed[0])} {changed[1]!r}" if changed else None


def _moe_problem(e, at) -> Optional[str]:
    c, x, g = e.config, e.config.experts, e.config.gate
    if c.hierarchy is not None:
        return f"{at(e, 'hierarchy')} (a hierarchical gate)"
    if not (c.residual and c.prenorm):
        return f"{at(e)} without a pre-norm residual"
    if x.activation != "swiglu":
        return f"{at(e, 'experts', 'activation')} {x.activation} (Mixtral's experts are swiglu)"
    if x.bias:
        return f"{at(e, 'experts', 'bias')} true (Mixtral's experts have no bias)"
    if x.shared is not None:
        return f"{at(e, 'experts', 'shared')} (shared experts)"
    changed = _changed(x, {"count", "hidden", "activation", "bias", "dropout", "init_scale", "shared"})
    if changed:
        return f"{at(e, 'experts', changed[0])} {changed[1]!r}"
    if g.type != "topk":
        return f"{at(e, 'gate', 'type')} {g.type} (Mixtral's router is top-k)"
    if g.drop_policy != "dropless":
        return f"{at(e, 'gate')}: capacity (drop_policy {g.drop_policy}; Mixtral drops no token)"
    if g.score != "softmax" or not g.normalize:
        return f"{at(e, 'gate')}: score {g.score}, normalize {g.normalize} (Mixtral: softmax, normalize)"
    if g.bias_balancing_rate is not None:
        return f"{at(e, 'gate', 'bias_balancing')} (aux-loss-free balancing bias)"
    changed = _changed(g, {"type", "k", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy",
                           "drop_priority", "routing_groups", "jitter", "noise_epsilon", "normalize", "score",
                           "bias_balancing_rate", "second_expert", "max_experts_per_token", "hash_seed"})
    if changed:
        return f"{at(e, 'gate', changed[0])} {changed[1]!r}"
    changed = _changed(c, {"experts", "gate", "hierarchy", "losses", "residual", "prenorm"})
    return f"{at(e, changed[0])} {changed[1]!r}" if changed else None


def _t(x):
    return x.t().contiguous()


def _stack_t(ts):
    """Per-expert [out, in] -> stacked [E, in, out] (moedsl multiplies from the right)."""
    import torch

    return torch.stack([t.t() for t in ts]).contiguous()


class Mixtral(Family):
    model_type = "mixtral"
    architectures = ("MixtralForCausalLM",)
    config_class = "MixtralConfig"
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=128)

    def spec_text(self, config: dict, source: str, name: str = "mixtral") -> str:
        return spec_text(config, source, name)

    def _layout(self, spec):
        why, pairs, norm = layout(spec)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face mixtral equivalent")
        return pairs, norm

    def architecture_problem(self, spec) -> Optional[str]:
        return layout(spec)[0]

    def import_tensors(self, spec, config: dict, names: set) -> list:
        pairs, norm = self._layout(spec)
        out = [Tensor("embedding.weight", ("model.embed_tokens.weight",), same)]
        for L, (a, m) in enumerate(pairs):
            hf = f"model.layers.{L}."
            out.append(Tensor(f"layers.{a}.norm.weight", (hf + "input_layernorm.weight",), same))
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                out.append(Tensor(f"layers.{a}.attention.{ours}.weight", (f"{hf}self_attn.{theirs}.weight",), same))
            out.append(Tensor(f"layers.{m}.norm.weight", (hf + "post_attention_layernorm.weight",), same))
            moe = hf + ("mlp." if f"{hf}mlp.gate.weight" in names else "block_sparse_moe.")
            out.append(Tensor(f"layers.{m}.gate.weight", (moe + "gate.weight",), same))
            E = spec.layers[m].config.experts.count
            if moe + "experts.gate_up_proj" in names:  # transformers 5's in-memory (fused) layout
                out += _fused(m, moe)
            else:
                for ours, theirs in (("w_gate", "w1"), ("w_in", "w3"), ("w_out", "w2")):
                    count = _count_experts(names, f"{moe}experts.", theirs) or E
                    out.append(Tensor(f"layers.{m}.experts.{ours}",
                                      tuple(f"{moe}experts.{e}.{theirs}.weight" for e in range(count)), _stack_t))
        out.append(Tensor(f"layers.{norm}.norm.weight", ("model.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("head.weight", ("lm_head.weight",), same))
        return out

    def export_config(self, spec, recorded: Optional[dict]) -> dict:
        pairs, _ = self._layout(spec)
        a, m = (spec.layers[i].config for i in pairs[0])
        cfg = dict(recorded or {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True,
                                "router_aux_loss_coef": 0.001, "output_router_logits": False})
        for stale in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version", "_name_or_path"):
            cfg.pop(stale, None)
        cfg.update({
            "architectures": list(self.architectures), "model_type": self.model_type,
            "vocab_size": spec.model.vocab_size, "hidden_size": spec.model.d_model,
            "intermediate_size": m.experts.hidden, "num_hidden_layers": len(pairs),
            "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": None,
            "hidden_act": "silu", "max_position_embeddings": spec.model.max_seq_len,
            "rms_norm_eps": spec.model.norm_eps, "tie_word_embeddings": spec.model.tie_embeddings,
            "sliding_window": None, "attention_dropout": a.dropout, "num_experts_per_tok": m.gate.k,
            "num_local_experts": m.experts.count, "router_jitter_noise": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "dtype": spec.model.dtype,
        })
        return cfg

    def export_tensors(self, spec) -> list:
        pairs, norm = self._layout(spec)
        out = [Tensor("model.embed_tokens.weight", ("embedding.weight",), same)]
        for L, (a, m) in enumerate(pairs):
            hf = f"model.layers.{L}."
            out.append(Tensor(hf + "input_layernorm.weight", (f"layers.{a}.norm.weight",), same))
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                out.append(Tensor(f"{hf}self_attn.{theirs}.weight", (f"layers.{a}.attention.{ours}.weight",), same))
            out.append(Tensor(hf + "post_attention_layernorm.weight", (f"layers.{m}.norm.weight",), same))
            out.append(Tensor(hf + "block_sparse_moe.gate.weight", (f"layers.{m}.gate.weight",), same))
            for e in range(spec.layers[m].config.experts.count):
                for ours, theirs in (("w_gate", "w1"), ("w_in", "w3"), ("w_out", "w2")):
                    out.append(Tensor(f"{hf}block_sparse_moe.experts.{e}.{theirs}.weight",
                                      ((f"layers.{m}.experts.{ours}", e),), lambda ts: _t(ts[0])))
        out.append(Tensor("model.norm.weight", (f"layers.{norm}.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("lm_head.weight", ("head.weight",), same))
        return out


def _count_experts(names: set, prefix: str, which: str) -> int:
    """How many experts the checkpoint has (its tensors, not its config: an edited spec may differ)."""
    e = 0
    while f"{prefix}{e}.{which}.weight" in names:
        e += 1
    return e


def _fused(m: int, moe: str) -> list:
    """transformers 5's fused layout: gate_up_proj [E, 2h, d] (gate rows first), down_proj [E, d, h]."""
    def gate(ts):
        h = ts[0].shape[1] // 2
        return ts[0][:, :h, :].transpose(1, 2).contiguous()

    def up(ts):
        h = ts[0].shape[1] // 2
        return ts[0][:, h:, :].transpose(1, 2).contiguous()

    return [Tensor(f"layers.{m}.experts.w_gate", (moe + "experts.gate_up_proj",), gate),
            Tensor(f"layers.{m}.experts.w_in", (moe + "experts.gate_up_proj",), up),
            Tensor(f"layers.{m}.experts.w_out", (moe + "experts.down_proj",),
                   lambda ts: ts[0].transpose(1, 2).contiguous())]


register(Mixtral())
