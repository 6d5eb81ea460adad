"""What the Llama-like families share: MoE (transformers' modeling_mixtral.py, modeling_qwen2_moe.py,
modeling_qwen3_moe.py, modeling_olmoe.py) and dense (modeling_llama.py, modeling_mistral.py,
modeling_qwen2.py, modeling_qwen3.py; ``DenseLlamaLike``):

    XForCausalLM: embed_tokens -> [input_layernorm -> self_attn (GQA, rotary) -> post_attention_layernorm
    -> mlp (a sparse MoE block or a dense SwiGLU MLP)] × N -> norm -> lm_head

is, in the spec language, ``embedding`` (no positions), per decoder layer ``attention`` + ``moe``
or ``ffn``, ``norm`` (rmsnorm, rms_norm_eps), ``head`` (tied if tie_word_embeddings). A family
(``LlamaLike`` subclass, one module of ``families/``) says per layer what its attention and its
MLP are (``layer``) and, for export, the reverse (``layer_config``); this module reads
config.json (defaults, bookkeeping fields, rope, dtype, refusals), writes the commented spec
(runs of equal layers become a ``repeat``), maps the tensors both ways and checks a spec's
structure.

Tensors: attention weights keep transformers' layout, named by ``Attention.HF_NAMES``
(``wq`` -> ``self_attn.q_proj``, ``q_norm`` -> ``self_attn.q_norm``); dense MLPs and shared
experts are ``nn.Linear`` on both sides (gate_proj -> ``w_gate``, up_proj -> ``w_in``,
down_proj -> ``w_out``, as ``moedsl.nn.hf_moe.dense_ffn_state_dict``); routed experts are one
module per expert on disk ([out, in]) and stacked, transposed in moedsl (``w_gate[e] =
gate_projᵀ``, ``w_in[e] = up_projᵀ``, ``w_out[e] = down_projᵀ``, as
``moedsl.nn.hf_moe.moe_state_dict``), read one expert at a time so that a rank reads only the
experts it holds; transformers 5's fused in-memory layout (``experts.gate_up_proj`` [E, 2h, d],
gate rows first, ``experts.down_proj`` [E, d, h]) is accepted on import.
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Optional

import torch

from moedsl.dtypes import NAMES
from moedsl.errors import UserError, format_path
from moedsl.kinds.gates.topk import TopK

from . import Family, Tensor, same

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

ATTN_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q_norm": "q_norm",
              "k_norm": "k_norm"}  # moedsl.nn.attention.Attention.HF_NAMES (no torch import here)
FFN_NAMES = (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj"))
# hidden_act (transformers' ACT2FN: "gelu" is the exact GELU, as moedsl's geglu) -> the GLU activation
GLU = {"silu": "swiglu", "gelu": "geglu"}
ACT = {v: k for k, v in GLU.items()}


def yaml_float(x: float) -> str:
    text = repr(float(x))
    return text if "e" in text or "." in text else text + ".0"


class Config(dict):
    """config.json's fields, the family's defaults filled in; ``where(key)`` names the source."""

    def __init__(self, values: dict, given: set, class_name: str):
        super().__init__(values)
        self.given, self.class_name = given, class_name

    def where(self, key: str) -> str:
        return key if key in self.given else f"{key} ({self.class_name}'s default)"


def known_fields(fam, config: dict, known: set, defaults: dict) -> Config:
    """config.json's fields with ``defaults`` filled in and its ``dtype`` (``c["dtype"]``); a field
    neither ``known`` nor bookkeeping (IGNORED, ``fam.ignored``) is refused by name (``fam.refuse``),
    as is a dtype moedsl has no name for."""
    for key in sorted(config):
        if key not in known and key not in IGNORED and key not in fam.ignored:
            fam.refuse(key, config[key], f"the fields of transformers' {fam.config_class}")
    c = Config({k: config.get(k, v) for k, v in defaults.items()}, set(config), fam.config_class)
    c["dtype"] = config.get("dtype", config.get("torch_dtype", NAMES[0]))
    if c["dtype"] not in NAMES:
        fam.refuse("dtype", c["dtype"], ", ".join(NAMES))
    return c


def changed(cfg, handled: set) -> Optional[tuple]:
    """The first field of the dataclass ``cfg`` outside ``handled`` whose value is not its
    default: a feature the family has no equivalent for (fields added to the spec language
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


def stack_t(ts):
    """Per-expert [out, in] -> stacked [E, in, out] (moedsl multiplies from the right)."""
    return torch.stack([t.t() for t in ts]).contiguous()


def transposed(x):
    """[out, in] -> [in, out], contiguous (moedsl multiplies from the right)."""
    return x.t().contiguous()


def count_experts(names: set, prefix: str, which: str) -> int:
    """How many experts the checkpoint has (its tensors, not its config: an edited spec may differ)."""
    e = 0
    while f"{prefix}{e}.{which}.weight" in names:
        e += 1
    return e


def fused_experts(m: int, moe: str) -> list:
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


def spec_header(source: str, model_type: str, architectures) -> list:
    """The comment lines an imported spec starts with."""
    return [f"# Imported by `moedsl import` from the Hugging Face checkpoint {source}",
            f"# (model_type {model_type}, {', '.join(architectures)}).",
            "# After each field: the config.json field it came from. hf_config.json beside this file keeps",
            "# the whole config.json (`moedsl export` restores the fields the spec does not carry).",
            "# Edit it as you like (e.g. experts.count to upcycle): loading then names each tensor that no",
            "# longer fits. Train from the imported weights with `moedsl run spec.yaml --init DIR`."]


def spec_tail(tie: bool) -> list:
    """An imported spec's last lines: the final norm, the head and a fine-tuning train section."""
    return ["  - norm: {}  # model.norm",
            f"  - head: {{}}  # lm_head{' (tied to embed_tokens)' if tie else ''}",
            "train: {batch_size: 8, seq_len: 64, steps: 100, lr: 1.0e-4, warmup: 10}  # for fine-tuning; not from "
            "config.json",
            ""]


def periodic(layers: list, i: int) -> tuple:
    """(period p, repeats r) covering the most layers from ``i`` with layers[i:i+p·r] periodic."""
    best = (1, 1)
    for p in range(1, (len(layers) - i) // 2 + 1):
        r = 1
        while i + (r + 1) * p <= len(layers) and layers[i + r * p:i + (r + 1) * p] == layers[i:i + p]:
            r += 1
        if r > 1 and p * r > best[0] * best[1]:
            best = (p, r)
    return best


def at(layer, *names) -> str:
    """The spec path of ``layer``'s field ``names`` (``layers[2].moe.gate.score``), for messages."""
    return format_path(tuple(layer.path) + (layer.kind,) + names)


def stack_problem(spec, fam: str, pairs: str, least: int) -> Optional[str]:
    """What keeps ``spec`` from being a decoder-only stack ``embedding, pairs, norm, head``
    (``least`` layers at the least) of RMSNorms, or None. ``fam`` names the family in messages."""
    m, layers = spec.model, spec.layers
    if m.input != "tokens":
        return "model.input vectors (no embedding or head)"
    if m.norm != "rmsnorm":
        return f"model.norm {m.norm} ({fam}'s norms are RMSNorm)"
    if len(layers) < least or layers[0].kind != "embedding" or layers[-2].kind != "norm" or \
            layers[-1].kind != "head":
        return f"a stack other than embedding, {pairs}, norm, head"
    return None


def head_problem(spec, fam: str) -> Optional[str]:
    """The final norm (one rms_norm_eps) and lm_head (no bias) of a stack ``stack_problem`` accepts."""
    m, norm, head = spec.model, spec.layers[-2], spec.layers[-1]
    if norm.config.type != "rmsnorm" or norm.config.eps != m.norm_eps:
        return f"{at(norm)} {norm.config.type} eps {norm.config.eps} ({fam}: one rms_norm_eps, " \
               f"model.norm_eps {m.norm_eps})"
    if head.config.bias:
        return f"{at(head, 'bias')} true (lm_head has no bias)"
    return None


# the gate fields every family reads or that do not change a dropless top-k router's choice
GATE_HANDLED = {"type", "k", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy", "drop_priority",
                "routing_groups", "jitter", "noise_epsilon", "normalize", "score", "bias_balancing_rate",
                "second_expert", "max_experts_per_token", "hash_seed"}


def moe_problem(e, at, fam: str, activations: tuple = ("swiglu", "geglu"), score: str = "softmax",
                score_says: Optional[str] = None, balancing_bias: bool = False, groups: bool = False,
                scale: bool = False, jitter: bool = True, shared=None, gate_also: frozenset = frozenset()
                ) -> Optional[str]:
    """What keeps the ``moe`` layer ``e`` from being ``fam``'s sparse block (a top-k router over
    bias-free GLU experts, dropless, in a pre-norm residual), or None; the message names the spec
    field and what ``fam`` has. The family says what it expects: its experts' ``activations``, the
    router's ``score`` function (``score_says``: the message's note, default "{fam}: {score}"),
    whether the router may carry a balancing bias, group limits (a group scored by its two best),
    a scale, jitter; ``shared(x)``: the problem of its shared experts (None: checked by the caller);
    ``gate_also``: further gate fields it accepts as they are."""
    c, x, g = e.config, e.config.experts, e.config.gate
    if c.hierarchy is not None:
        return f"{at(e, 'hierarchy')} (a hierarchical gate)"
    if not (c.residual and c.prenorm):
        return f"{at(e)} without a pre-norm residual"
    if x.activation not in activations:
        return f"{at(e, 'experts', 'activation')} {x.activation} ({fam}'s experts are {' or '.join(activations)})"
    if x.bias:
        return f"{at(e, 'experts', 'bias')} true ({fam}'s experts have no bias)"
    why = shared(x) if shared is not None and x.shared is not None else None
    if why:
        return why
    ch = changed(x, {"count", "hidden", "activation", "bias", "dropout", "init_scale", "shared"})
    if ch:
        return f"{at(e, 'experts', ch[0])} {ch[1]!r}"
    if not isinstance(g, TopK.Options):
        return f"{at(e, 'gate', 'type')} {g.type} ({fam}'s router is top-k)"
    if g.drop_policy != "dropless":
        return f"{at(e, 'gate')}: capacity (drop_policy {g.drop_policy}; {fam} drops no token)"
    if g.score != score:
        return f"{at(e, 'gate', 'score')} {g.score} ({score_says or f'{fam}: {score}'})"
    if g.bias_balancing_rate is not None and not balancing_bias:
        return f"{at(e, 'gate', 'bias_balancing')} (aux-loss-free balancing bias)"
    if groups and g.groups is not None and (x.count // g.groups.count) < 2:
        return f"{at(e, 'gate', 'groups', 'count')} {g.groups.count} ({fam} scores a group by its two best)"
    handled = GATE_HANDLED | gate_also | ({"groups"} if groups else set()) | ({"scale"} if scale else set())
    ch = changed(g, handled)
    if ch:
        return f"{at(e, 'gate', ch[0])} {ch[1]!r}"
    if g.jitter and not jitter:
        return f"{at(e, 'gate', 'jitter')} {g.jitter} ({fam}'s router has no jitter)"
    ch = changed(c, {"experts", "gate", "hierarchy", "losses", "residual", "prenorm"})
    return f"{at(e, ch[0])} {ch[1]!r}" if ch else None


class LlamaLike(Family):
    """A Llama-like MoE family. Subclasses set the class attributes and ``read`` (family-specific
    fields and refusals), ``layer`` and ``layer_config``."""

    config_defaults: dict = {}  # the Config class's defaults (transformers' configuration_*.py)
    understood: set = set()  # further fields the family reads (beyond config_defaults)
    ignored: set = set()  # further fields without effect in this family
    default_theta = 10000.0
    moe_prefix = "mlp."  # the sparse block's name on disk
    expert_names = ("gate_proj", "up_proj", "down_proj")  # per expert on disk: gate, up, down
    shared_prefix = "shared_expert."
    attention_comment = "self_attn: q_proj, k_proj, v_proj, o_proj"

    # -- config.json -> spec ----------------------------------------------------------------

    def refuse(self, field: str, value, supported: str):
        raise UserError(f"config.json: {field} = {value!r} is not supported for {self.model_type} "
                        f"(supported: {supported})")

    def read_config(self, config: dict) -> Config:
        """The architecture fields of config.json, defaults filled in; refuses (one line, naming
        the field) what the spec language cannot express."""
        known = set(self.config_defaults) | self.understood | {"rope_parameters", "rope_scaling", "rope_theta"}
        c = known_fields(self, config, known, self.config_defaults)
        rope = config.get("rope_parameters") or {}
        if config.get("rope_scaling"):
            self.refuse("rope_scaling", config["rope_scaling"], "none (default rotary positions)")
        if rope.get("rope_type", "default") != "default":
            self.refuse("rope_parameters.rope_type", rope["rope_type"], "'default'")
        extra = sorted(set(rope) - {"rope_type", "rope_theta"})
        if extra:
            self.refuse(f"rope_parameters.{extra[0]}", rope[extra[0]], "rope_type 'default' and rope_theta")
        c["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", self.default_theta)))
        c["rope_from"] = "rope_parameters.rope_theta" if "rope_theta" in rope else \
            "rope_theta" if "rope_theta" in config else f"{self.config_class}'s default"
        if c.get("num_key_value_heads") is None:  # __post_init__: one kv head per head
            c["num_key_value_heads"] = c["num_attention_heads"]
        if c["hidden_act"] not in GLU:
            self.refuse("hidden_act", c["hidden_act"], "'silu' (SwiGLU experts) or 'gelu' (exact GELU: GEGLU experts)")
        c["activation"] = GLU[c["hidden_act"]]
        self.read(c, config)
        return c

    def read(self, c: Config, config: dict) -> None:
        """Family-specific fields: derive, and refuse what is not expressible."""

    def head_dim(self, c: Config) -> Optional[int]:
        """config's head_dim if it differs from hidden_size / num_attention_heads, else None."""
        hd = c.get("head_dim")
        return None if hd is None or hd * c["num_attention_heads"] == c["hidden_size"] else hd

    def attention_fields(self, c: Config, i: int) -> list:
        """[(field, YAML value, comment)] of decoder layer ``i``'s attention."""
        w = c.where
        out = [("heads", c["num_attention_heads"], w("num_attention_heads")),
               ("kv_heads", c["num_key_value_heads"], w("num_key_value_heads"))]
        if self.head_dim(c) is not None:
            out.append(("head_dim", c["head_dim"], w("head_dim")))
        out += [("positions", "rotary", "rotary embedding, rope_type default"),
                ("rope_theta", yaml_float(c["rope_theta"]), c["rope_from"])]
        if c["attention_dropout"]:
            out.append(("dropout", c["attention_dropout"], "attention_dropout"))
        return out

    def layer(self, c: Config, i: int) -> tuple:
        """Decoder layer ``i``: (attention fields, (kind "moe" or "ffn", comment, its YAML lines
        relative to the kind's fields))."""
        raise NotImplementedError

    def moe_lines(self, c: Config, count: str, hidden: str, k: str, normalize: Optional[str],
                  shared: Optional[tuple] = None) -> list:
        """The YAML lines of a top-k MoE block (``count``, ``hidden``, ``k``: config keys;
        ``normalize``: the key of norm_topk_prob, None for always; ``shared``: (hidden key, gated))."""
        w = lambda key: c.where(key)  # noqa: E731
        g, u, d = self.expert_names
        lines = ["experts:",
                 f"  count: {c[count]}  # {w(count)}",
                 f"  hidden: {c[hidden]}  # {w(hidden)}",
                 f"  activation: {c['activation']}  # hidden_act {c['hidden_act']}, gated: {g} (gate), {u} (up), "
                 f"{d} (down)"]
        if shared:
            key, gated = shared
            lines.append(f"  shared: {{count: 1, hidden: {c[key]}, gate: {'true' if gated else 'false'}}}  "
                         f"# {self.shared_prefix[:-1]}: {w(key)}" + (", shared_expert_gate" if gated else ""))
        lines += ["gate:",
                  "  type: topk  # gate: softmax over all experts, top-k",
                  f"  k: {c[k]}  # {w(k)}"]
        if normalize is None:
            lines.append("  normalize: true  # renormalised over the k")
        else:
            lines.append(f"  normalize: {'true' if c[normalize] else 'false'}  # {w(normalize)}")
        lines += ["  drop_policy: dropless  # no token is dropped",
                  f"# losses: {{balance: {c.get('router_aux_loss_coef')}}}  # router_aux_loss_coef: transformers "
                  "adds it in training with output_router_logits"]
        return lines

    def router_dtype_line(self, c: Config) -> str:
        """The spec's ``router_dtype``: the model's dtype, since the family's router (MixtralTopKRouter,
        Qwen2MoeTopKRouter, ...) computes its linear in the model's dtype and only the softmax in
        float32; float32 if the family keeps its router weight in float32 (``float32_tensors``)."""
        if self.keeps_float32(f"model.layers.0.{self.moe_prefix}gate.weight"):
            return "  router_dtype: float32  # the router's weight kept in float32, its linear and softmax in float32"
        return f"  router_dtype: {c['dtype']}  # the router's linear in the model's dtype, its softmax in float32"

    def dense_lines(self, c: Config, hidden: str) -> list:
        return [f"hidden: {c[hidden]}  # {c.where(hidden)}",
                f"activation: {c['activation']}  # hidden_act {c['hidden_act']}: gate_proj, up_proj, down_proj"]

    def spec_text(self, config: dict, source: str, name: str = "") -> str:
        c = self.read_config(config)
        name = name or self.model_type
        w = c.where
        tie = bool(c["tie_word_embeddings"])
        n = c["num_hidden_layers"]
        lines = [
            *spec_header(source, self.model_type, config.get("architectures") or self.architectures[:1]),
            "moedsl: 1",
            f"name: {name}",
            f"description: {name} imported from Hugging Face ({self.model_type})",
            "model:",
            f"  vocab_size: {c['vocab_size']}  # {w('vocab_size')}",
            f"  d_model: {c['hidden_size']}  # {w('hidden_size')}",
            f"  max_seq_len: {c['max_position_embeddings']}  # {w('max_position_embeddings')}",
            f"  dtype: {c['dtype']}  # dtype of config.json (the weights' dtype on disk)",
            *([self.router_dtype_line(c)] if self.routed else []),
            "  norm: rmsnorm  # RMSNorm, before each sublayer",
            f"  norm_eps: {yaml_float(c['rms_norm_eps'])}  # {w('rms_norm_eps')}",
            f"  tie_embeddings: {'true' if tie else 'false'}  # {w('tie_word_embeddings')}",
            "layers:",
            "  - embedding: {}  # model.embed_tokens (no positions: rotary attention)",
        ]
        per = [self.layer(c, i) for i in range(n)]
        keys = [(tuple(a), (m[0], m[1], tuple(m[2]))) for a, m in per]
        i = 0
        while i < n:
            p, r = periodic(keys, i)
            span = f"model.layers.{i}" if p * r == 1 else \
                "model.layers.*" if p * r == n else f"model.layers.{i}-{i + p * r - 1}"
            if r > 1:
                lines += [f"  - repeat: {r}  # {w('num_hidden_layers') if p * r == n else span}"
                          f"{': model.layers.*' if p * r == n else ''}", "    block:"]
                indent = "      "
            else:
                indent = "  "
                lines.append(f"  # {span}")
            for j in range(i, i + p):
                attn, (kind, comment, body) = per[j]
                lines.append(f"{indent}- attention:  # {self.attention_comment}")
                lines += [f"{indent}    {k}: {v}  # {why}" for k, v, why in attn]
                lines.append(f"{indent}- {kind}:  # {comment}")
                lines += [f"{indent}    {x}" for x in body]
            i += p * r
        return "\n".join(lines + spec_tail(tie))

    # -- the spec's structure ------------------------------------------------------------

    def layout(self, spec):
        """(the problem or None, [(attention index, mlp index, its per-layer config)], final norm
        index, the config the layers agree on)."""
        layers, fam = spec.layers, self.model_type
        none = (None, None, None)
        why = stack_problem(spec, fam, "[attention, moe or ffn] × N", 4)
        if why is None and layers[0].config.positions != "none":
            why = f"{at(layers[0], 'positions')} {layers[0].config.positions} ({fam} has rotary positions)"
        why = why or head_problem(spec, fam)
        if why:
            return (why,) + none
        norm = layers[-2]
        body = layers[1:-2]
        pairs, agreed = [], {}
        for i in range(0, len(body), 2):
            a, e = body[i], body[i + 1] if i + 1 < len(body) else None
            if a.kind != "attention" or e is None or e.kind not in ("moe", "ffn"):
                bad = a if a.kind != "attention" else (e or a)
                return (f"{format_path(bad.path)}: {bad.kind} where {fam} has [attention, moe or ffn] pairs",) + none
            why = self.attention_problem(spec, a, at) or (self.moe_problem(e, at) if e.kind == "moe" else
                                                          self.ffn_problem(e, at))
            if why:
                return (why,) + none
            shared, per = self.layer_config(spec, a, e)
            if isinstance(shared, str):
                return (f"{at(e)}: {shared}",) + none
            act = e.config.experts.activation if e.kind == "moe" else e.config.activation
            shared["hidden_act"] = ACT[act]  # one hidden_act for experts, shared experts and dense MLPs
            for k, v in shared.items():
                if k in agreed and agreed[k] != v:
                    return (f"{format_path(a.path)}: {k} {v!r} where an earlier layer has {agreed[k]!r} "
                            f"({fam}'s config has one)",) + none
                agreed[k] = v
            pairs.append((a.index, e.index, per))
        return None, pairs, norm.index, agreed

    # attention features the family expresses (beyond heads, kv_heads, positions, rope_theta, dropout)
    attention_features: set = {"head_dim", "sliding_window"}
    title = ""  # the family's name in the messages below
    qk_norm: Optional[tuple] = None  # (the spec's qk_norm, what it does) if the family normalises q and k
    one_attention_bias = False  # attention_bias: on all four projections or none
    shared_experts = True  # False: a spec with shared experts is refused naming the title

    def attention_problem(self, spec, a, at) -> Optional[str]:
        c = a.config
        if self.qk_norm is not None and c.qk_norm != self.qk_norm[0]:
            return f"{at(a, 'qk_norm')} {c.qk_norm} ({self.title} {self.qk_norm[1]})"
        if self.one_attention_bias and c.qkv_bias != c.out_bias:
            return f"{at(a, 'qkv_bias')} {c.qkv_bias}, out_bias {c.out_bias} ({self.title}: attention_bias on all four)"
        if c.positions != "rotary":
            return f"{at(a, 'positions')} {c.positions} ({self.model_type} has rotary positions)"
        for name, want in (("causal", True), ("residual", True), ("prenorm", True)):
            if getattr(c, name) != want:
                return f"{at(a, name)} {getattr(c, name)}"
        if c.qk_norm != "none" and c.qk_norm_eps != spec.model.norm_eps:
            return f"{at(a, 'qk_norm_eps')} {c.qk_norm_eps} ({self.model_type}: one rms_norm_eps)"
        for name, ok in (("qkv_bias", "qkv_bias" in self.attention_features),
                         ("out_bias", "out_bias" in self.attention_features)):
            if getattr(c, name) and not ok:
                return f"{at(a, name)} true ({self.model_type}'s attention has no such bias)"
        if c.head_dim * c.heads != spec.model.d_model and "head_dim" not in self.attention_features:
            return f"{at(a, 'head_dim')} {c.head_dim} ({self.model_type}: d_model / heads)"
        handled = {"heads", "kv_heads", "positions", "rope_theta", "causal", "dropout", "bias", "residual",
                   "prenorm", "head_dim", "qkv_bias", "out_bias", "qk_norm_eps"} | self.attention_features
        ch = changed(c, handled)
        return f"{at(a, ch[0])} {ch[1]!r}" if ch else None

    def moe_problem(self, e, at) -> Optional[str]:
        if not self.shared_experts and e.config.experts.shared is not None:
            return f"{at(e, 'experts', 'shared')} ({self.title} has no shared expert)"
        return moe_problem(e, at, self.model_type)

    def ffn_problem(self, f, at) -> Optional[str]:
        return f"{at(f)} (a dense layer: {self.model_type} has MoE layers only)"

    def dense_ffn_problem(self, f, at) -> Optional[str]:
        """For families with dense layers: a SwiGLU MLP without bias."""
        c = f.config
        if c.activation not in ACT or c.bias or not (c.residual and c.prenorm):
            return f"{at(f)}: activation {c.activation}, bias {c.bias} ({self.model_type}'s MLP: swiglu or geglu, " \
                   "no bias)"
        return None

    def layer_config(self, spec, a, e) -> tuple:
        """(config.json fields every layer must agree on, or a problem; this layer's own fields)."""
        raise NotImplementedError

    def architecture_problem(self, spec) -> Optional[str]:
        return self.layout(spec)[0]

    def _layout(self, spec):
        why, pairs, norm, agreed = self.layout(spec)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face {self.model_type} equivalent")
        return pairs, norm, agreed

    # -- tensors ---------------------------------------------------------------------------

    def attention_params(self, cfg) -> list:
        """moedsl's parameter names of an attention layer of config ``cfg``."""
        out = [f"{p}.weight" for p in ("wq", "wk", "wv", "wo")]
        if cfg.qkv_bias:
            out += [f"{p}.bias" for p in ("wq", "wk", "wv")]
        if cfg.out_bias:
            out.append("wo.bias")
        if cfg.qk_norm != "none":
            out += ["q_norm.weight", "k_norm.weight"]
        return out

    def _pairs(self, spec):
        pairs, norm, _ = self._layout(spec)
        return [(L, a, e, hf) for L, (a, e, _p) in enumerate(pairs) for hf in [f"model.layers.{L}."]], norm

    def import_tensors(self, spec, config: dict, names: set) -> list:
        pairs, norm = self._pairs(spec)
        out = [Tensor("embedding.weight", ("model.embed_tokens.weight",), same)]
        for L, a, m, hf in pairs:
            out.append(Tensor(f"layers.{a}.norm.weight", (hf + "input_layernorm.weight",), same))
            for p in self.attention_params(spec.layers[a].config):
                prefix, _, rest = p.partition(".")
                out.append(Tensor(f"layers.{a}.attention.{p}", (f"{hf}self_attn.{ATTN_NAMES[prefix]}.{rest}",), same))
            out.append(Tensor(f"layers.{m}.norm.weight", (hf + "post_attention_layernorm.weight",), same))
            layer = spec.layers[m]
            if layer.kind == "ffn":
                out += [Tensor(f"layers.{m}.ffn.{ours}.weight", (f"{hf}mlp.{theirs}.weight",), same)
                        for ours, theirs in FFN_NAMES]
                continue
            moe = hf + ("mlp." if f"{hf}mlp.gate.weight" in names else self.moe_prefix)
            out.append(Tensor(f"layers.{m}.gate.weight", (moe + "gate.weight",), same))
            if moe + "experts.gate_up_proj" in names:  # transformers 5's in-memory (fused) layout
                out += fused_experts(m, moe)
            else:
                E = layer.config.experts.count
                for ours, theirs in zip(("w_gate", "w_in", "w_out"), self.expert_names):
                    count = count_experts(names, f"{moe}experts.", theirs) or E
                    out.append(Tensor(f"layers.{m}.experts.{ours}",
                                      tuple(f"{moe}experts.{e}.{theirs}.weight" for e in range(count)), stack_t))
            out += self._shared(m, moe, layer.config.experts.shared, import_=True)
        out.append(Tensor(f"layers.{norm}.norm.weight", ("model.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("head.weight", ("lm_head.weight",), same))
        return out

    def _shared(self, m: int, moe: str, shared, import_: bool) -> list:
        if shared is None:
            return []
        pairs = [(f"layers.{m}.shared.{ours}.weight", f"{moe}{self.shared_prefix}{theirs}.weight")
                 for ours, theirs in FFN_NAMES]
        if shared.gate:
            pairs.append((f"layers.{m}.shared.gate.weight", f"{moe}shared_expert_gate.weight"))
        return [Tensor(o, (t,), same) if import_ else Tensor(t, (o,), same) for o, t in pairs]

    def export_tensors(self, spec) -> list:
        pairs, norm = self._pairs(spec)
        out = [Tensor("model.embed_tokens.weight", ("embedding.weight",), same)]
        for L, a, m, hf in pairs:
            out.append(Tensor(hf + "input_layernorm.weight", (f"layers.{a}.norm.weight",), same))
            for p in self.attention_params(spec.layers[a].config):
                prefix, _, rest = p.partition(".")
                out.append(Tensor(f"{hf}self_attn.{ATTN_NAMES[prefix]}.{rest}", (f"layers.{a}.attention.{p}",), same))
            out.append(Tensor(hf + "post_attention_layernorm.weight", (f"layers.{m}.norm.weight",), same))
            layer = spec.layers[m]
            if layer.kind == "ffn":
                out += [Tensor(f"{hf}mlp.{theirs}.weight", (f"layers.{m}.ffn.{ours}.weight",), same)
                        for ours, theirs in FFN_NAMES]
                continue
            moe = hf + self.moe_prefix
            out.append(Tensor(moe + "gate.weight", (f"layers.{m}.gate.weight",), same))
            for e in range(layer.config.experts.count):
                for ours, theirs in zip(("w_gate", "w_in", "w_out"), self.expert_names):
                    out.append(Tensor(f"{moe}experts.{e}.{theirs}.weight",
                                      ((f"layers.{m}.experts.{ours}", e),), lambda ts: transposed(ts[0])))
            out += self._shared(m, moe, layer.config.experts.shared, import_=False)
        out.append(Tensor("model.norm.weight", (f"layers.{norm}.norm.weight",), same))
        if not spec.model.tie_embeddings:
            out.append(Tensor("lm_head.weight", ("head.weight",), same))
        return out

    # -- export config ---------------------------------------------------------------------

    new_config: dict = {}  # the bookkeeping fields of a config.json written without one recorded at import

    def export_config(self, spec, recorded: Optional[dict]) -> dict:
        pairs, _, agreed = self._layout(spec)
        cfg = dict(recorded or self.new_config)
        for stale in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version", "_name_or_path"):
            cfg.pop(stale, None)
        cfg.update(agreed)
        cfg.update({
            "architectures": list(self.architectures), "model_type": self.model_type,
            "vocab_size": spec.model.vocab_size, "hidden_size": spec.model.d_model,
            "num_hidden_layers": len(pairs),
            "max_position_embeddings": spec.model.max_seq_len, "rms_norm_eps": spec.model.norm_eps,
            "tie_word_embeddings": spec.model.tie_embeddings, "dtype": spec.model.dtype,
            "rope_parameters": {"rope_type": "default", "rope_theta": agreed.pop("rope_theta", None)},
        })
        cfg.pop("rope_theta", None)
        cfg.update(self.per_layer_config([p[2] for p in pairs], cfg, recorded))
        return cfg

    def per_layer_config(self, per: list, cfg: dict, recorded: Optional[dict]) -> dict:
        """config.json fields from the layers' own fields (which are dense, which slide)."""
        return {}

    def attention_config(self, spec, a) -> dict:
        """The config.json fields every family reads from an attention layer."""
        c = a.config
        out = {"num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "rope_theta": c.rope_theta,
               "attention_dropout": c.dropout}
        out["head_dim"] = c.head_dim
        return out


def sparse_layers(c: Config, mlp_only_key: str = "mlp_only_layers", step_key: str = "decoder_sparse_step",
                  experts_key: str = "num_experts") -> list:
    """Which decoder layers have a sparse MoE block (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer:
    ``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``)."""
    only = c.get(mlp_only_key) or []
    step = c[step_key]
    return [i not in only and c[experts_key] > 0 and (i + 1) % step == 0 for i in range(c["num_hidden_layers"])]


def dense_export(per: list, recorded: Optional[dict]) -> dict:
    """decoder_sparse_step and mlp_only_layers for layers whose ``moe`` flags are ``per``: the
    recorded step if every MoE layer fits it, else 1; the dense layers it would make sparse are
    mlp_only_layers."""
    step = int((recorded or {}).get("decoder_sparse_step") or 1)
    moe = [p["moe"] for p in per]
    if any(m and (i + 1) % step for i, m in enumerate(moe)):
        step = 1
    only = [i for i, m in enumerate(moe) if not m and (i + 1) % step == 0]
    return {"decoder_sparse_step": step, "mlp_only_layers": only}


SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types


class DenseLlamaLike(LlamaLike):
    """A dense Llama-like family (transformers' modeling_llama.py, modeling_mistral.py,
    modeling_qwen2.py, modeling_qwen3.py): every decoder layer's ``mlp`` is a bias-free GLU MLP
    ``down_proj(act(gate_proj(x)) ⊙ up_proj(x))`` of ``intermediate_size``, ``ffn`` (swiglu, or
    geglu for hidden_act gelu) in the spec language. Subclasses add their attention's fields
    (``attention_extra``) and config.json fields (``dense_config``)."""

    routed = False  # so no router_dtype in its spec
    attention_features = {"head_dim"}
    # the tests' tiny model of every dense family (each adds its own variants)
    tiny_config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

    def layer(self, c: Config, i: int) -> tuple:
        attn = self.attention_fields(c, i) + self.attention_extra(c, i)
        return attn, ("ffn", "mlp: gate_proj, up_proj, down_proj", self.dense_lines(c, "intermediate_size"))

    def attention_extra(self, c: Config, i: int) -> list:
        """Decoder layer ``i``'s attention fields beyond heads, kv_heads, head_dim and rope."""
        return []

    def moe_problem(self, e, at) -> Optional[str]:
        return f"{at(e)} (a sparse layer: {self.model_type}'s MLPs are dense)"

    def ffn_problem(self, f, at) -> Optional[str]:
        return self.dense_ffn_problem(f, at)

    def layer_config(self, spec, a, e) -> tuple:
        cfg = self.attention_config(spec, a)
        cfg["intermediate_size"] = e.config.hidden
        return self.dense_config(cfg, a)

    def dense_config(self, cfg: dict, a) -> tuple:
        """(the fields every layer agrees on, this layer's own) from attention layer ``a``."""
        return cfg, {}


def layer_windows(fam: LlamaLike, c: Config, default_types: list) -> None:
    """Each layer's sliding window (``c["windows"]``, None for full attention) from
    ``layer_types`` (``default_types`` if config.json has none, as the config class's
    __post_init__ derives them) and ``sliding_window``, kept only with ``use_sliding_window``;
    a sliding layer sees its last ``sliding_window`` keys (create_sliding_window_causal_mask)."""
    n = c["num_hidden_layers"]
    window = c["sliding_window"] if c["use_sliding_window"] else None
    types = c["layer_types"]
    if types is None:
        types = default_types
    elif not isinstance(types, list) or len(types) != n or set(types) - {SLIDING, FULL}:
        fam.refuse("layer_types", types, f"{n} (num_hidden_layers) of '{FULL}', '{SLIDING}'")
    if SLIDING in types and (not isinstance(window, int) or window < 1):
        fam.refuse("layer_types", types, f"'{SLIDING}' layers only with use_sliding_window true and a positive "
                   f"sliding_window (use_sliding_window is {c['use_sliding_window']}, sliding_window "
                   f"{c['sliding_window']})")
    c["windows"] = [window if t == SLIDING else None for t in types]
    c["types_from"] = "layer_types" if c["layer_types"] is not None else \
        "use_sliding_window, max_window_layers (layer_types' default)"


def window_export(per: list, recorded: Optional[dict]) -> dict:
    """layer_types, use_sliding_window and sliding_window (null unless some layer slides, as
    __post_init__ leaves it) from the layers' own ``sliding`` flags; the window itself is one of
    the fields the layers agree on."""
    out = {"layer_types": [SLIDING if p["sliding"] else FULL for p in per],
           "use_sliding_window": any(p["sliding"] for p in per)}
    if not out["use_sliding_window"]:
        out["sliding_window"] = None
    return out


class DenseLayerTypes(DenseLlamaLike):
    """A dense family whose layers slide or not by ``layer_types`` (Qwen2, Qwen3: their config's
    __post_init__ keeps ``sliding_window`` only with ``use_sliding_window`` and, if config.json
    has no ``layer_types``, makes layer i sliding when ``i >= max_window_layers``). Subclasses add
    their attention's own fields (``attention_own``, ``attention_own_config``)."""

    def read(self, c: Config, config: dict) -> None:
        keep = c["use_sliding_window"] and c["sliding_window"] is not None
        layer_windows(self, c, [SLIDING if keep and i >= c["max_window_layers"] else FULL
                                for i in range(c["num_hidden_layers"])])

    def attention_own(self, c: Config) -> list:
        return []

    def attention_extra(self, c: Config, i: int) -> list:
        out = self.attention_own(c)
        if c["windows"][i] is not None:
            out.append(("sliding_window", c["windows"][i], f"sliding_window; layer {i} slides by {c['types_from']}"))
        return out

    def attention_own_config(self, cfg: dict, a) -> None:
        """Add the config.json fields of attention layer ``a`` the family has beyond the shared ones."""

    def dense_config(self, cfg: dict, a) -> tuple:
        self.attention_own_config(cfg, a)
        w = a.config.sliding_window
        if w is not None:
            cfg["sliding_window"] = w
        return cfg, {"sliding": w is not None}

    def per_layer_config(self, per: list, cfg: dict, recorded: Optional[dict]) -> dict:
        return window_export(per, recorded)
