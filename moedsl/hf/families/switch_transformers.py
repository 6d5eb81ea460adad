"""Switch Transformer (Fedus et al. 2022, "Switch Transformers", §2): transformers'
``modeling_switch_transformers.py``, a T5 encoder-decoder (Raffel et al. 2020, §2.1) whose
feed-forward sublayers are in part top-1 MoE layers.

    SwitchTransformersForConditionalGeneration:
      encoder: shared -> [layer_norm -> SelfAttention (bidirectional) -> layer_norm -> mlp] × num_layers
               -> final_layer_norm
      decoder: shared -> [layer_norm -> SelfAttention (causal) -> layer_norm -> EncDecAttention
               -> layer_norm -> mlp] × num_decoder_layers -> final_layer_norm
      -> (× d_model^-0.5 if tie_word_embeddings) -> lm_head

In the spec language: ``encoder:`` and ``decoder:`` stacks of ``attention`` (+ ``cross_attention``)
and ``moe`` or ``ffn``. Each of the model's details, with the place it comes from:

* the layer norms are T5's RMSNorm: no mean subtracted, no bias, variance in float32
  (SwitchTransformersLayerNorm), ``norm: rmsnorm`` with ``layer_norm_epsilon``;
* attention logits are not divided by sqrt(d_kv) (``scaled: false``); the heads are ``d_kv`` wide;
  layer 0 of each stack holds a relative position bias table [relative_attention_num_buckets,
  num_heads], computed once per stack (bidirectional buckets in the encoder, causal in the
  decoder) and added in every self-attention of that stack (SwitchTransformersStack passes
  ``position_bias`` on); cross-attention has none;
* layer i of a stack is sparse when ``i % step == 1 or step == 1`` (step > 0; step 0: none), with
  step = ``num_layers // num_sparse_encoder_layers`` in the encoder, ``num_decoder_layers //
  num_sparse_decoder_layers`` in the decoder, and ``num_layers`` (resp. ``num_decoder_layers``) when
  the number of sparse layers is 0 (SwitchTransformersConfig.__post_init__: despite its comment
  this makes layer 1 sparse once a stack has two layers; the import follows what transformers
  builds, and config.json's own ``encoder_sparse_step`` / ``decoder_sparse_step`` are recomputed so);
* the router (SwitchTransformersTop1Router): a bias-free linear in ``router_dtype``, softmax, the
  top expert; its probability scales the expert's output; at most ``expert_capacity`` tokens per
  expert in each sequence, taken in order of position, padding included; a token past the
  capacity is dropped; ``router_jitter_noise`` multiplies the router's input by U(1-j, 1+j) in
  training only;
* experts and dense MLPs: ``wo(act(wi(x)))`` without bias, act = ``dense_act_fn``;
* tie_word_embeddings: one table (``shared``) for both stacks and the head, and the decoder's
  output scaled by d_model^-0.5 before it; otherwise transformers 5 gives the encoder, the
  decoder and lm_head their own tables (``shared`` itself is then unused): moedsl's two stacks share
  one embedding, so an untied checkpoint imports only where encoder.embed_tokens equals
  decoder.embed_tokens (as a checkpoint untied from a tied one has), and is refused otherwise.

Dropped tokens: transformers has changed how a token past the capacity is treated across
releases (before: it passed through as p·x; after: its MoE output is zero and the residual alone
carries it; some 5.x releases drop none). The installed release (5.25) zeroes it (the experts
compute only the tokens the capacity mask keeps, SwitchTransformersExperts.forward); the imported
spec names that behaviour in its gate.

On disk: ``shared.weight``, ``{encoder,decoder}.block.i.layer.j.*`` (``SelfAttention.{q,k,v,o}``,
``EncDecAttention.{q,k,v,o}``, ``layer_norm``, ``mlp.wi`` / ``mlp.wo`` or ``mlp.router.classifier``
and ``mlp.experts.expert_e.{wi,wo}``), ``{encoder,decoder}.final_layer_norm.weight``, and when
untied ``lm_head.weight`` and ``{encoder,decoder}.embed_tokens.weight``. moedsl's experts multiply
from the right: ``w_in[e] = wiᵀ``, ``w_out[e] = woᵀ``.
"""
from __future__ import annotations

from typing import Optional

from moedsl.kinds.gates import gate_type
from moedsl.kinds.gates.switch import Switch

from .. import register
from ..encdec import EncDecFamily, at, blocks, changed, fmt, one, stack_lines
from ..llama_like import spec_header

ACTS = ("relu", "gelu", "silu")  # dense_act_fn values moedsl's experts compute as transformers' ACT2FN does


def sparse_of(n: int, sparse: int) -> tuple:
    """(step, [which of the ``n`` layers are sparse]) as transformers builds them from a stack's
    number of sparse layers (SwitchTransformersConfig.__post_init__, SwitchTransformersStack)."""
    step = n // sparse if sparse > 0 else n
    return step, [(i % step == 1 or step == 1) if step > 0 else False for i in range(n)]


def sparse_count(flags: list) -> Optional[int]:
    """A num_sparse_*_layers that makes transformers build exactly the sparse ``flags``, or None."""
    n = len(flags)
    for count in range(0, n + 2):
        if sparse_of(n, count)[1] == flags:
            return count
    return None


class SwitchTransformers(EncDecFamily):
    model_type = "switch_transformers"
    architectures = ("SwitchTransformersForConditionalGeneration",)
    config_class = "SwitchTransformersConfig"
    encoder_decoder = True
    tiny_config = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                       num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=64,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    tiny_variants = (
        ({"num_layers": 4, "num_sparse_encoder_layers": 4, "num_decoder_layers": 4, "num_sparse_decoder_layers": 2},
         "sparse steps 1 and 2"),
        ({"num_layers": 3, "num_decoder_layers": 5, "num_sparse_encoder_layers": 0, "num_sparse_decoder_layers": 6},
         "num_decoder_layers other than num_layers, steps 3 and 0"),
        ({"tie_word_embeddings": False}, "untied embeddings"),
        ({"d_kv": 12, "dense_act_fn": "gelu"}, "heads wider than d_model / num_heads, gelu"),
        ({"expert_capacity": 2, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2},
         "a capacity that drops"),
    )
    # SwitchTransformersConfig's fields and defaults (configuration_switch_transformers.py)
    defaults = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "expert_capacity": 64,
                "num_layers": 12, "num_sparse_encoder_layers": 3, "num_decoder_layers": None,
                "num_sparse_decoder_layers": 3, "num_heads": 12, "num_experts": 8, "router_bias": False,
                "router_jitter_noise": 0.01, "router_dtype": "float32", "router_ignore_padding_tokens": False,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
                "layer_norm_epsilon": 1e-6, "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.001,
                "dense_act_fn": "relu", "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": True,
                "decoder_start_token_id": None}
    # recomputed by __post_init__ (the sparse steps), initialisation, outputs, older releases' names
    # (the released checkpoints' config.json, written by transformers 4, also holds num_selected_experts,
    # router_type and batch_prioritized_routing, which transformers 5.25 reads nowhere: ``read`` accepts
    # the values it computes — top-1, tokens choosing, by position — and refuses others by name)
    ignored = {"encoder_sparse_step", "decoder_sparse_step", "initializer_factor", "add_router_probs",
               "feed_forward_proj", "is_gated_act", "n_positions", "num_selected_experts", "router_type",
               "batch_prioritized_routing"}

    def read(self, c, config) -> None:
        if c["num_decoder_layers"] is None:  # __post_init__: symmetric
            c["num_decoder_layers"] = c["num_layers"]
        if c["router_bias"]:
            self.refuse("router_bias", True, "false (moedsl's router has no bias)")
        if c["dense_act_fn"] not in ACTS:
            self.refuse("dense_act_fn", c["dense_act_fn"], ", ".join(ACTS))
        # transformers 5 reads dense_act_fn alone; a config.json of another library that asks for
        # gated experts would run ungated there, so it is refused rather than imported as something else
        ff = config.get("feed_forward_proj")
        if config.get("is_gated_act") or (isinstance(ff, str) and ff.startswith("gated")):
            field = "is_gated_act" if config.get("is_gated_act") else "feed_forward_proj"
            self.refuse(field, config[field], "ungated experts (dense_act_fn alone; transformers 5 ignores "
                        "this field)")
        for field, value in (("num_selected_experts", 1), ("router_type", "tokens_masked"),
                             ("batch_prioritized_routing", False)):
            if config.get(field, value) != value:
                self.refuse(field, config[field], f"{value!r} (what transformers 5's Switch computes; it reads "
                            "no such field)")
        if c["eos_token_id"] is None or isinstance(c["eos_token_id"], list):
            self.refuse("eos_token_id", c["eos_token_id"], "one token id")
        if c["decoder_start_token_id"] is None:  # T5 starts from the pad token (_shift_right)
            c["decoder_start_token_id"] = c["pad_token_id"]
        c["enc_step"], c["enc_sparse"] = sparse_of(c["num_layers"], c["num_sparse_encoder_layers"])
        c["dec_step"], c["dec_sparse"] = sparse_of(c["num_decoder_layers"], c["num_sparse_decoder_layers"])

    # -- config.json -> spec ----------------------------------------------------------------

    def _attention(self, c, causal: bool, relative: bool) -> list:
        lines = [f"heads: {c['num_heads']}  # {c.where('num_heads')}"]
        if c["d_kv"] * c["num_heads"] != c["d_model"]:
            lines.append(f"head_dim: {c['d_kv']}  # {c.where('d_kv')}")
        if relative:
            lines += [f"causal: {fmt(causal)}  # {'decoder: causal' if causal else 'encoder: bidirectional'}",
                      "positions: relative  # T5's bucketed relative bias: one table per stack, in its layer 0",
                      f"relative_buckets: {c['relative_attention_num_buckets']}  "
                      f"# {c.where('relative_attention_num_buckets')}",
                      f"relative_max_distance: {c['relative_attention_max_distance']}  "
                      f"# {c.where('relative_attention_max_distance')}"]
        lines.append("scaled: false  # logits not divided by sqrt(d_kv) (SwitchTransformersAttention.scaling 1)")
        return lines

    def _mlp(self, c, sparse: bool, stack: str, i: int) -> tuple:
        act = f"activation: {c['dense_act_fn']}  # {c.where('dense_act_fn')}: wo(act(wi(x))), no bias"
        if not sparse:
            return ("ffn", f"mlp: dense (layer {i} by the {stack} sparse step)",
                    [f"hidden: {c['d_ff']}  # {c.where('d_ff')}", act])
        body = ["experts:",
                f"  count: {c['num_experts']}  # {c.where('num_experts')}",
                f"  hidden: {c['d_ff']}  # {c.where('d_ff')}",
                f"  {act}",
                "gate:",
                *[f"  {x}" for x in self.gate_lines(c)],
                f"losses: {{balance: {fmt(float(c['router_aux_loss_coef']))}, "
                f"z_loss: {fmt(float(c['router_z_loss_coef']))}}}  # router_aux_loss_coef, router_z_loss_coef"]
        return "moe", "mlp: SwitchTransformersSparseMLP", body

    def gate_lines(self, c) -> list:
        """The gate of a sparse layer: top-1, ``expert_capacity`` tokens per expert in each sequence,
        the installed release's treatment of a dropped token."""
        return ["type: switch  # SwitchTransformersTop1Router: softmax, the top expert, scaled by its probability",
                f"jitter: {fmt(float(c['router_jitter_noise']))}  # {c.where('router_jitter_noise')} (training only)",
                f"expert_capacity: {c['expert_capacity']}  # {c.where('expert_capacity')}: tokens per expert in "
                "each sequence, in order of position, padding included",
                "routing_groups: sequence  # the capacity counts per sequence (the router's cumsum over positions)",
                "dropped_tokens: residual  # transformers 5.25: a dropped token's MoE output is zero; the residual "
                "carries it"]

    def head_lines(self, tie: bool) -> list:
        if tie:
            return ["  - head: {rescale: true}  # lm_head, tied to shared: the decoder's output × d_model^-0.5 "
                    "first (tie_word_embeddings)"]
        return ["  - head: {}  # lm_head (untied: no scaling)"]

    def spec_text(self, config: dict, source: str, name: str = "") -> str:
        c = self.read_config(config)
        w = c.where
        name = name or self.model_type
        tie = bool(c["tie_word_embeddings"])
        lines = [
            *spec_header(source, self.model_type, config.get("architectures") or self.architectures[:1]),
            "# Routing groups: one sequence (transformers routes each row of the batch on its own), so the",
            "# batch's rows do not interact.",
            "moedsl: 1",
            f"name: {name}",
            f"description: {name} imported from Hugging Face ({self.model_type})",
            "model:",
            f"  vocab_size: {c['vocab_size']}  # {w('vocab_size')}",
            f"  d_model: {c['d_model']}  # {w('d_model')}",
            "  max_seq_len: 512  # not in config.json (relative positions have no length limit): the longest "
            "sequence moedsl plans for",
            f"  dtype: {c['dtype']}  # dtype of config.json (the weights' dtype on disk)",
            f"  router_dtype: {c['router_dtype']}  # {w('router_dtype')}: the router's linear and softmax",
            "  norm: rmsnorm  # T5's layer norm: no mean subtracted, no bias, before each sublayer",
            f"  norm_eps: {fmt(float(c['layer_norm_epsilon']))}  # {w('layer_norm_epsilon')}",
            f"  dropout: {fmt(float(c['dropout_rate']))}  # {w('dropout_rate')} (training only)",
            f"  tie_embeddings: {fmt(tie)}  # {w('tie_word_embeddings')}",
            f"  pad_id: {c['pad_token_id']}  # {w('pad_token_id')}",
            f"  eos_id: {c['eos_token_id']}  # {w('eos_token_id')}",
            f"  decoder_start_id: {c['decoder_start_token_id']}  # "
            + ("decoder_start_token_id" if "decoder_start_token_id" in c.given else
               "pad_token_id (T5's _shift_right starts from it)"),
            "encoder:",
            "  - embedding: {}  # shared (encoder.embed_tokens)",
        ]
        enc = [(f"encoder.block.{i}", [("attention", "layer.0: SelfAttention, bidirectional",
                                         self._attention(c, False, True)),
                                        self._mlp(c, c["enc_sparse"][i], "encoder", i)])
               for i in range(c["num_layers"])]
        lines += stack_lines(enc, "  ", f"num_layers; sparse step {c['enc_step']} "
                             f"(num_layers // num_sparse_encoder_layers)")
        lines += ["  - norm: {}  # encoder.final_layer_norm", "decoder:",
                  "  - embedding: {}  # shared (decoder.embed_tokens): the encoder's table"]
        dec = [(f"decoder.block.{i}", [("attention", "layer.0: SelfAttention, causal", self._attention(c, True, True)),
                                        ("cross_attention", "layer.1: EncDecAttention (no position bias)",
                                         self._attention(c, False, False)),
                                        self._mlp(c, c["dec_sparse"][i], "decoder", i)])
               for i in range(c["num_decoder_layers"])]
        lines += stack_lines(dec, "  ", f"num_decoder_layers; sparse step {c['dec_step']} "
                             f"(num_decoder_layers // num_sparse_decoder_layers)")
        lines += ["  - norm: {}  # decoder.final_layer_norm", *self.head_lines(tie),
                  "train: {batch_size: 8, seq_len: 64, steps: 100, lr: 1.0e-4, warmup: 10}  # for fine-tuning; not "
                  "from config.json", ""]
        return "\n".join(lines)

    # -- tensors ---------------------------------------------------------------------------

    expert_tensors = (("w_in", "wi.weight"), ("w_out", "wo.weight"))

    def pairs(self, spec) -> tuple:
        st = blocks(spec, self.model_type)[1]
        pairs, moes = [], []
        for stack in ("encoder", "decoder"):
            s = st[stack]
            for i, group in enumerate(s["blocks"]):
                hf = f"{stack}.block.{i}.layer."
                a = group[0]
                pairs.append((f"layers.{a.index}.norm.weight", hf + "0.layer_norm.weight"))
                for p in ("q", "k", "v", "o"):
                    pairs.append((f"layers.{a.index}.attention.w{p}.weight", f"{hf}0.SelfAttention.{p}.weight"))
                if i == 0:
                    pairs.append((f"{stack}_relative_bias.weight",
                                  hf + "0.SelfAttention.relative_attention_bias.weight"))
                j = 1
                if stack == "decoder":
                    x = group[1]
                    pairs.append((f"layers.{x.index}.norm.weight", hf + "1.layer_norm.weight"))
                    for p in ("q", "k", "v", "o"):
                        pairs.append((f"layers.{x.index}.cross_attention.w{p}.weight",
                                      f"{hf}1.EncDecAttention.{p}.weight"))
                    j = 2
                m = group[-1]
                pairs.append((f"layers.{m.index}.norm.weight", f"{hf}{j}.layer_norm.weight"))
                if m.kind == "ffn":
                    pairs += [(f"layers.{m.index}.ffn.w_in.weight", f"{hf}{j}.mlp.wi.weight"),
                              (f"layers.{m.index}.ffn.w_out.weight", f"{hf}{j}.mlp.wo.weight")]
                else:
                    pairs.append((f"layers.{m.index}.gate.weight", f"{hf}{j}.mlp.router.classifier.weight"))
                    moes.append((m.index, f"{hf}{j}.mlp.experts.", m.config.experts.count))
            pairs.append((f"layers.{s['norm'].index}.norm.weight", f"{stack}.final_layer_norm.weight"))
        return pairs, moes

    # -- the spec's structure and config.json ---------------------------------------------

    def model_config(self, m):
        if m.norm != "rmsnorm":
            return f"model.norm {m.norm} (T5's layer norm is an RMSNorm)"
        return {"vocab_size": m.vocab_size, "d_model": m.d_model, "layer_norm_epsilon": m.norm_eps,
                "tie_word_embeddings": m.tie_embeddings, "router_dtype": m.router_dtype, "dtype": m.dtype,
                "dropout_rate": m.dropout}

    def stack_config(self, stack: str, flags: list):
        count = sparse_count(flags)
        if count is None:
            return (f"{stack}: sparse layers {[i for i, f in enumerate(flags) if f]} (transformers makes layer i "
                    "sparse when i % step == 1 or step == 1)")
        if stack == "encoder":
            return {"num_layers": len(flags), "num_sparse_encoder_layers": count}
        return {"num_decoder_layers": len(flags), "num_sparse_decoder_layers": count}

    def layer_problem(self, L, stack: str, seen: dict, model) -> Optional[str]:
        if L.kind in ("embedding", "norm"):
            ch = changed(L.config, {"type", "eps"})
            return f"{at(L, ch[0])} {ch[1]!r}" if ch else None
        if L.kind in ("moe", "ffn"):
            return self._mlp_problem(L, seen)
        return self._attention_problem(L, seen)

    def _attention_problem(self, L, seen: dict) -> Optional[str]:
        c = L.config
        if c.scaled:
            return f"{at(L, 'scaled')} true (T5 does not scale attention logits)"
        if getattr(c, "bias", False) or getattr(c, "qkv_bias", False) or getattr(c, "out_bias", False):
            return f"{at(L, 'bias')} true (T5's attention has no bias)"
        if L.kind == "attention":
            if c.positions != "relative":
                return f"{at(L, 'positions')} {c.positions} (T5 has relative positions)"
            if c.causal != (L.stack == "decoder"):
                return f"{at(L, 'causal')} {c.causal} ({L.stack})"
            seen.setdefault("relative_attention_num_buckets", []).append((c.relative_buckets, L))
            seen.setdefault("relative_attention_max_distance", []).append((c.relative_max_distance, L))
        seen.setdefault("num_heads", []).append((c.heads, L))
        seen.setdefault("d_kv", []).append((c.head_dim, L))
        return None

    def _mlp_problem(self, L, seen: dict) -> Optional[str]:
        c = L.config
        if not (c.residual and c.prenorm):
            return f"{at(L)} without a pre-norm residual"
        x = c.experts if L.kind == "moe" else c
        if x.activation not in ACTS:
            return f"{at(L, 'activation')} {x.activation} (Switch's MLPs: {', '.join(ACTS)})"
        if x.bias:
            return f"{at(L, 'bias')} true (Switch's MLPs have no bias)"
        seen.setdefault("d_ff", []).append((x.hidden, L))
        seen.setdefault("dense_act_fn", []).append((x.activation, L))
        if L.kind == "moe":
            g = c.gate
            if type(gate_type(g.type)) is not Switch:
                return f"{at(L, 'gate', 'type')} {g.type} (Switch's router is top-1: switch)"
            if g.expert_capacity is None or g.routing_groups != "sequence":
                return (f"{at(L, 'gate')}: capacity_factor {g.capacity_factor}, routing_groups {g.routing_groups} "
                        "(transformers' Switch: expert_capacity per sequence, routing_groups: sequence)")
            for name, want in (("dropped_tokens", "residual"), ("route_padding", True), ("drop_priority", "position"),
                               ("eval_capacity_fraction", None)):
                if getattr(g, name) != want:
                    return f"{at(L, 'gate', name)} {getattr(g, name)!r} (transformers 5.25's Switch: {want!r})"
            if x.token_dropout:
                return f"{at(L, 'experts', 'token_dropout')} {x.token_dropout} (Switch has no expert output masking)"
            seen.setdefault("num_experts", []).append((x.count, L))
            seen.setdefault("router_jitter_noise", []).append((g.jitter, L))
            seen.setdefault("expert_capacity", []).append((g.expert_capacity, L))
            seen.setdefault("router_aux_loss_coef", []).append((c.losses.balance, L))
            seen.setdefault("router_z_loss_coef", []).append((c.losses.z_loss, L))
        return None

    new_config = {"is_encoder_decoder": True, "use_cache": True, "initializer_factor": 1.0, "router_bias": False,
                  "router_ignore_padding_tokens": False, "add_router_probs": False, "is_decoder": False,
                  "add_cross_attention": False, "bos_token_id": None, "num_experts": 8}
    stale = EncDecFamily.stale + ("encoder_sparse_step", "decoder_sparse_step")  # recomputed by __post_init__


register(SwitchTransformers())
