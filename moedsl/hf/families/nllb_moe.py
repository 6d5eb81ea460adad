"""NLLB-MoE (NLLB Team 2022, "No Language Left Behind", §6.2, a fairseq MoE Transformer):
transformers' ``modeling_nllb_moe.py``.

    NllbMoeForConditionalGeneration:
      encoder: embed_tokens × embed_scale + sinusoidal positions -> [self_attn_layer_norm ->
               self_attn -> ff_layer_norm -> ffn] × encoder_layers -> layer_norm
      decoder: embed_tokens × embed_scale + sinusoidal positions -> [self_attn_layer_norm ->
               self_attn (causal) -> cross_attention_layer_norm -> cross_attention -> ff_layer_norm
               -> ffn] × decoder_layers -> layer_norm
      -> lm_head (tied to shared, no scaling)

In the spec language: ``encoder:`` and ``decoder:`` stacks (``cross_attention`` in the decoder) of
pre-norm residual sublayers. Each of the model's details, with the place it comes from:

* embedding: one table (``shared``) for both stacks and the head, × sqrt(d_model) when
  ``scale_embedding`` (NllbMoeScaledWordEmbedding), plus fixed sinusoids numbered as fairseq's
  make_positions: the i-th non-pad token at ``pad_token_id + i``, a pad token at the pad position,
  whose vector is zero (NllbMoeSinusoidalPositionalEmbedding) — ``embedding: {positions:
  sinusoidal, pad_id, scale}``;
* LayerNorms with bias, eps 1e-5 (torch's default; the config has no field for it); attention
  projections with bias, logits × 1/sqrt(head_dim);
* layer i of a stack is sparse when ``(i + 1) % step == 0`` (step > 0; step 0: none), step =
  ``encoder_sparse_step`` / ``decoder_sparse_step``; experts and dense MLPs ``fc2(act(fc1(x)))``
  with biases, act = ``activation_function``;
* the router (NllbMoeTop2Router): a linear in ``router_dtype``, softmax; the top expert, and the
  second best by logit (``second_expert_policy``: all keeps it; sampling adds Gumbel noise to the
  logits first; random keeps it with probability 2·p2 — both random in evaluation too); the two
  weights normalised to sum to 1 before or after the capacity drops
  (``normalize_router_prob_before_dropping``); positions in each expert's queue by order in the
  batch or, with ``batch_prioritized_routing``, by the token's top probability; first choices fill
  the queue before second ones; the capacity is ``expert_capacity`` in training and
  ceil(``moe_eval_capacity_token_fraction`` × tokens) in evaluation (a fraction ≤ 0: expert_capacity
  again), counted over all the tokens of the batch (the router flattens [batch, seq]) — so the
  batch's rows interact, and moedsl follows that: its routing group is the whole batch (but a
  decode step routes each new token alone: transformers' decode step shares the capacity among the
  batch's new tokens, so batched greedy decoding with a fraction below 1 may pick otherwise); pad tokens
  of the source are not routed unless ``router_ignore_padding_tokens`` (the encoder passes its
  padding mask to the router; in the decoder the causal mask's last row marks no token as pad);
* ``moe_token_dropout``: expert output masking, a dropout of each token's expert output in
  training, × (1 - moe_token_dropout) in evaluation (NllbMoeExperts.forward).

The installed transformers (5.25) does not compute what its router chooses: NllbMoeExperts.forward
one-hot encodes the router's 0/1 dispatch mask as if it held expert ids, so every token runs
through ``expert_1`` weighted by its first choice's weight and ``expert_0`` weighted by its second
choice's, whatever experts were chosen (tests/test_encdec_routing.py pins it). moedsl computes each
token with the experts its router chose, as fairseq's MOELayer and the paper do; its parity tests
compare against transformers' model with that one method computing the chosen experts.

On disk: ``model.shared.weight``, ``model.{encoder,decoder}.layers.i.*`` (``self_attn``,
``cross_attention``: ``{q,k,v,out}_proj.{weight,bias}``; ``self_attn_layer_norm``,
``cross_attention_layer_norm``, ``ff_layer_norm``; ``ffn.fc1``/``fc2`` or ``ffn.router.classifier``
and ``ffn.experts.expert_e.fc1``/``fc2``), ``model.{encoder,decoder}.layer_norm``; untied,
``lm_head.weight`` and the stacks' own ``embed_tokens``. moedsl's experts multiply from the right:
``w_in[e] = fc1.weightᵀ``, ``b_in[e] = fc1.bias``, ``w_out[e] = fc2.weightᵀ``, ``b_out[e] = fc2.bias``.
"""
from __future__ import annotations

import math
from typing import Optional

from moedsl.kinds.gates.gshard import GShard

from .. import register
from ..encdec import EncDecFamily, at, blocks, fmt, one, stack_lines
from ..llama_like import spec_header

ACTS = ("relu", "gelu", "silu")
POLICIES = ("all", "sampling", "random")
LN_EPS = 1e-5  # nn.LayerNorm's default: NllbMoe builds every layer norm with it


def sparse_of(n: int, step: int) -> list:
    """Which of ``n`` layers are sparse (NllbMoeEncoder / NllbMoeDecoder)."""
    return [(i + 1) % step == 0 if step > 0 else False for i in range(n)]


def step_of(flags: list) -> Optional[int]:
    """A sparse step that makes exactly the sparse ``flags``, or None."""
    for step in range(0, len(flags) + 2):
        if sparse_of(len(flags), step) == flags:
            return step
    return None


class NllbMoe(EncDecFamily):
    model_type = "nllb-moe"
    architectures = ("NllbMoeForConditionalGeneration",)
    config_class = "NllbMoeConfig"
    encoder_decoder = True
    tiny_config = dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24,
                       decoder_ffn_dim=20, encoder_attention_heads=2, decoder_attention_heads=4, num_experts=4,
                       encoder_sparse_step=2, decoder_sparse_step=1, max_position_embeddings=64,
                       moe_token_dropout=0.0)
    tiny_variants = (
        ({"moe_eval_capacity_token_fraction": 0.3}, "eval capacity drops, position order, normalised after"),
        ({"normalize_router_prob_before_dropping": True, "moe_eval_capacity_token_fraction": 0.3},
         "normalised before drops, eval capacity drops"),
        ({"batch_prioritized_routing": True, "moe_eval_capacity_token_fraction": 0.3},
         "batch-prioritized routing with drops"),
        ({"moe_token_dropout": 0.2, "scale_embedding": False}, "moe_token_dropout in eval, unscaled embedding"),
        ({"encoder_layers": 3, "decoder_layers": 4, "encoder_sparse_step": 0, "decoder_sparse_step": 2,
          "activation_function": "gelu"}, "sparse steps 0 and 2, gelu"),
    )
    # NllbMoeConfig's fields and defaults (configuration_nllb_moe.py)
    defaults = {"vocab_size": 128112, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
                "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
                "decoder_attention_heads": 16, "encoder_layerdrop": 0.05, "decoder_layerdrop": 0.05,
                "activation_function": "relu", "d_model": 1024, "dropout": 0.1, "attention_dropout": 0.1,
                "activation_dropout": 0.0, "decoder_start_token_id": 2, "scale_embedding": True,
                "router_bias": False, "router_dtype": "float32", "router_ignore_padding_tokens": False,
                "num_experts": 128, "expert_capacity": 64, "encoder_sparse_step": 4, "decoder_sparse_step": 4,
                "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.001, "second_expert_policy": "all",
                "normalize_router_prob_before_dropping": False, "batch_prioritized_routing": False,
                "moe_eval_capacity_token_fraction": 1.0, "moe_token_dropout": 0.2, "pad_token_id": 1,
                "eos_token_id": 2, "tie_word_embeddings": True}
    ignored = {"init_std"}  # initialisation only

    def read(self, c, config) -> None:
        if c["router_bias"]:
            self.refuse("router_bias", True, "false (moedsl's router has no bias)")
        if c["activation_function"] not in ACTS:
            self.refuse("activation_function", c["activation_function"], ", ".join(ACTS))
        if c["second_expert_policy"] not in POLICIES:
            self.refuse("second_expert_policy", c["second_expert_policy"], ", ".join(POLICIES))
        if c["encoder_layerdrop"] or c["decoder_layerdrop"]:
            pass  # training only (a layer skipped at random): the spec notes it, moedsl has no layer drop
        for key in ("encoder_sparse_step", "decoder_sparse_step"):
            if not isinstance(c[key], int) or c[key] < 0:
                self.refuse(key, c[key], "0 (no sparse layer) or a positive integer")
        if c["pad_token_id"] is None:
            self.refuse("pad_token_id", None, "a token id (the positions are numbered around it)")
        if c["eos_token_id"] is None or isinstance(c["eos_token_id"], list):
            self.refuse("eos_token_id", c["eos_token_id"], "one token id")
        if c["decoder_start_token_id"] is None:
            self.refuse("decoder_start_token_id", None, "a token id")
        if c["d_model"] % c["encoder_attention_heads"] or c["d_model"] % c["decoder_attention_heads"]:
            self.refuse("encoder_attention_heads", c["encoder_attention_heads"], "a divisor of d_model")
        c["enc_sparse"] = sparse_of(c["encoder_layers"], c["encoder_sparse_step"])
        c["dec_sparse"] = sparse_of(c["decoder_layers"], c["decoder_sparse_step"])

    # -- config.json -> spec ----------------------------------------------------------------

    def _attention(self, c, heads: str, causal: Optional[bool]) -> list:
        lines = [f"heads: {c[heads]}  # {c.where(heads)}"]
        if causal is not None:
            lines += [f"causal: {fmt(causal)}  # {'decoder: causal' if causal else 'encoder: bidirectional'}",
                      "positions: none  # the positions are the embedding's"]
        lines.append("bias: true  # q_proj, k_proj, v_proj, out_proj have biases")
        if c["attention_dropout"]:
            lines.append(f"dropout: {fmt(float(c['attention_dropout']))}  # {c.where('attention_dropout')} "
                         "(training only)")
        return lines

    def _mlp(self, c, sparse: bool, width: str, stack: str, i: int) -> tuple:
        act = f"activation: {c['activation_function']}  # {c.where('activation_function')}: fc2(act(fc1(x)))"
        if not sparse:
            return ("ffn", f"ffn: dense (layer {i} by {stack}_sparse_step)",
                    [f"hidden: {c[width]}  # {c.where(width)}", act, "bias: true  # fc1, fc2 have biases"])
        body = ["experts:",
                f"  count: {c['num_experts']}  # {c.where('num_experts')}",
                f"  hidden: {c[width]}  # {c.where(width)}",
                f"  {act}",
                "  bias: true  # fc1, fc2 have biases",
                *([f"  token_dropout: {fmt(float(c['moe_token_dropout']))}  # {c.where('moe_token_dropout')}: expert "
                   "output masking, × (1 - p) in evaluation"] if c["moe_token_dropout"] else []),
                "gate:",
                *[f"  {x}" for x in self.gate_lines(c)],
                f"losses: {{balance: {fmt(float(c['router_aux_loss_coef']))}, "
                f"z_loss: {fmt(float(c['router_z_loss_coef']))}}}  # router_aux_loss_coef, router_z_loss_coef"]
        return "moe", "ffn: NllbMoeSparseMLP", body

    def gate_lines(self, c) -> list:
        """The gate of a sparse layer: NllbMoeTop2Router's options, capacity over the whole batch."""
        frac = float(c["moe_eval_capacity_token_fraction"])
        policy = {"all": "always"}.get(c["second_expert_policy"], c["second_expert_policy"])
        out = ["type: gshard  # NllbMoeTop2Router: softmax, the top expert and the second best",
               f"second_expert: {policy}  # second_expert_policy {c['second_expert_policy']}",
               "normalize: true  # the two weights normalised to sum to 1",
               f"normalize_after_drops: {fmt(not c['normalize_router_prob_before_dropping'])}  "
               f"# not {c.where('normalize_router_prob_before_dropping')}",
               f"drop_priority: {'score' if c['batch_prioritized_routing'] else 'position'}  "
               f"# {c.where('batch_prioritized_routing')}",
               f"expert_capacity: {c['expert_capacity']}  # {c.where('expert_capacity')}: tokens per expert "
               "(training)"]
        if frac > 0:
            out.append(f"eval_capacity_fraction: {fmt(frac)}  # {c.where('moe_eval_capacity_token_fraction')}: "
                       "ceil(fraction × tokens) per expert in evaluation")
        out += ["routing_groups: 1  # the capacity counts over all the batch's tokens (its rows interact)",
                f"route_padding: {fmt(bool(c['router_ignore_padding_tokens']))}  # router_ignore_padding_tokens: "
                "false = the source's pad tokens are not routed",
                "dropped_tokens: residual  # a dropped choice adds nothing; the residual carries the token"]
        return out

    def spec_text(self, config: dict, source: str, name: str = "") -> str:
        c = self.read_config(config)
        w = c.where
        name = name or self.model_type
        tie = bool(c["tie_word_embeddings"])
        d = c["d_model"]
        scale = math.sqrt(d) if c["scale_embedding"] else 1.0
        emb = (f"{{positions: sinusoidal, pad_id: {c['pad_token_id']}, scale: {fmt(scale)}}}  # "
               f"{{stack}}.embed_tokens × {'sqrt(d_model)' if c['scale_embedding'] else '1'} ({w('scale_embedding')}) "
               "+ fairseq's sinusoidal positions around pad_token_id")
        lines = [
            *spec_header(source, self.model_type, config.get("architectures") or self.architectures[:1]),
            "# Routing groups: the whole batch, as transformers counts the capacity over all its tokens: a",
            "# row's routing depends on the other rows (with moe_eval_capacity_token_fraction 1.0, nothing is",
            "# dropped in evaluation, so it does not). Decoding differs: moedsl routes each new token alone,",
            "# where transformers' decode step shares ceil(fraction x B) slots among the B rows' new tokens;",
            "# the greedy ids agree at batch 1, and at any batch with the fraction at 1.0 (nothing dropped).",
            "moedsl: 1",
            f"name: {name}",
            f"description: {name} imported from Hugging Face ({self.model_type})",
            "model:",
            f"  vocab_size: {c['vocab_size']}  # {w('vocab_size')}",
            f"  d_model: {d}  # {w('d_model')}",
            f"  max_seq_len: {c['max_position_embeddings']}  # {w('max_position_embeddings')}",
            f"  dtype: {c['dtype']}  # dtype of config.json (the weights' dtype on disk)",
            f"  router_dtype: {c['router_dtype']}  # {w('router_dtype')}: the router's linear and softmax",
            f"  norm: layernorm  # nn.LayerNorm with bias, before each sublayer",
            f"  norm_eps: {fmt(LN_EPS)}  # nn.LayerNorm's default (the config has no field for it)",
            f"  dropout: {fmt(float(c['dropout']))}  # {w('dropout')} (training only)",
            f"  tie_embeddings: {fmt(tie)}  # {w('tie_word_embeddings')}",
            f"  pad_id: {c['pad_token_id']}  # {w('pad_token_id')}",
            f"  eos_id: {c['eos_token_id']}  # {w('eos_token_id')}",
            f"  decoder_start_id: {c['decoder_start_token_id']}  # {w('decoder_start_token_id')}",
            "encoder:",
            f"  - embedding: {emb.replace('{stack}', 'encoder')}",
        ]
        enc = [(f"model.encoder.layers.{i}", [("attention", "self_attn, bidirectional",
                                               self._attention(c, "encoder_attention_heads", False)),
                                              self._mlp(c, c["enc_sparse"][i], "encoder_ffn_dim", "encoder", i)])
               for i in range(c["encoder_layers"])]
        lines += stack_lines(enc, "  ", f"encoder_layers; encoder_sparse_step {c['encoder_sparse_step']}")
        lines += ["  - norm: {}  # model.encoder.layer_norm", "decoder:",
                  f"  - embedding: {emb.replace('{stack}', 'decoder')}: the encoder's table"]
        dec = [(f"model.decoder.layers.{i}", [("attention", "self_attn, causal",
                                               self._attention(c, "decoder_attention_heads", True)),
                                              ("cross_attention", "cross_attention",
                                               self._attention(c, "decoder_attention_heads", None)),
                                              self._mlp(c, c["dec_sparse"][i], "decoder_ffn_dim", "decoder", i)])
               for i in range(c["decoder_layers"])]
        lines += stack_lines(dec, "  ", f"decoder_layers; decoder_sparse_step {c['decoder_sparse_step']}")
        lines += ["  - norm: {}  # model.decoder.layer_norm",
                  f"  - head: {{}}  # lm_head{' (tied to shared, no scaling)' if tie else ''}",
                  "train: {batch_size: 8, seq_len: 64, steps: 100, lr: 1.0e-4, warmup: 10}  # for fine-tuning; not "
                  "from config.json", ""]
        return "\n".join(lines)

    # -- tensors ---------------------------------------------------------------------------

    base = "model."
    expert_tensors = (("w_in", "fc1.weight"), ("w_out", "fc2.weight"), ("b_in", "fc1.bias"), ("b_out", "fc2.bias"))

    def pairs(self, spec) -> tuple:
        st = blocks(spec, self.model_type)[1]
        pairs, moes = [], []

        def norm(layer, hf):
            pairs.extend([(f"layers.{layer.index}.norm.{p}", f"{hf}.{p}") for p in ("weight", "bias")])

        def attn(layer, kind, hf):
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "out_proj")):
                for p in ("weight", "bias"):
                    pairs.append((f"layers.{layer.index}.{kind}.{ours}.{p}", f"{hf}.{theirs}.{p}"))

        for stack in ("encoder", "decoder"):
            s = st[stack]
            for i, group in enumerate(s["blocks"]):
                hf = f"model.{stack}.layers.{i}."
                norm(group[0], hf + "self_attn_layer_norm")
                attn(group[0], "attention", hf + "self_attn")
                if stack == "decoder":
                    norm(group[1], hf + "cross_attention_layer_norm")
                    attn(group[1], "cross_attention", hf + "cross_attention")
                m = group[-1]
                norm(m, hf + "ff_layer_norm")
                if m.kind == "ffn":
                    for ours, theirs in (("w_in", "fc1"), ("w_out", "fc2")):
                        for p in ("weight", "bias"):
                            pairs.append((f"layers.{m.index}.ffn.{ours}.{p}", f"{hf}ffn.{theirs}.{p}"))
                else:
                    pairs.append((f"layers.{m.index}.gate.weight", f"{hf}ffn.router.classifier.weight"))
                    moes.append((m.index, f"{hf}ffn.experts.", m.config.experts.count))
            norm(s["norm"], f"model.{stack}.layer_norm")
        return pairs, moes

    # -- the spec's structure and config.json ---------------------------------------------

    def model_config(self, m):
        if m.norm != "layernorm" or m.norm_eps != LN_EPS:
            return f"model.norm {m.norm} eps {m.norm_eps} (NLLB-MoE: LayerNorm, eps {LN_EPS})"
        return {"vocab_size": m.vocab_size, "d_model": m.d_model, "max_position_embeddings": m.max_seq_len,
                "tie_word_embeddings": m.tie_embeddings, "router_dtype": m.router_dtype, "dtype": m.dtype,
                "dropout": m.dropout}

    def stack_config(self, stack: str, flags: list):
        step = step_of(flags)
        if step is None:
            return (f"{stack}: sparse layers {[i for i, f in enumerate(flags) if f]} (NLLB-MoE makes layer i "
                    f"sparse when (i + 1) % {stack}_sparse_step == 0)")
        return {f"{stack}_layers": len(flags), f"{stack}_sparse_step": step}

    def layer_problem(self, L, stack: str, seen: dict, model) -> Optional[str]:
        c = L.config
        if L.kind == "embedding":
            if c.positions != "sinusoidal" or c.pad_id != model.pad_id:
                return f"{at(L, 'positions')} {c.positions}, pad_id {c.pad_id} (NLLB-MoE: sinusoidal around " \
                       "model.pad_id)"
            if c.scale not in (1.0, math.sqrt(model.d_model)):
                return f"{at(L, 'scale')} {c.scale} (NLLB-MoE: 1 or sqrt(d_model))"
            seen.setdefault("scale_embedding", []).append((c.scale != 1.0, L))
        elif L.kind in ("moe", "ffn"):
            return self._mlp_problem(L, stack, seen)
        elif L.kind != "norm":
            if not (c.bias if L.kind == "cross_attention" else c.qkv_bias and c.out_bias):
                return f"{at(L, 'bias')} false (NLLB-MoE's attention has biases)"
            if not c.scaled:
                return f"{at(L, 'scaled')} false (NLLB-MoE scales by 1/sqrt(head_dim))"
            if L.kind == "attention" and c.positions != "none":
                return f"{at(L, 'positions')} {c.positions} (NLLB-MoE's positions are in the embedding)"
            seen.setdefault(f"{stack}_attention_heads", []).append((c.heads, L))
            seen.setdefault("attention_dropout", []).append((c.dropout, L))
        return None

    def _mlp_problem(self, L, stack: str, seen: dict) -> Optional[str]:
        c = L.config
        if not (c.residual and c.prenorm):
            return f"{at(L)} without a pre-norm residual"
        x = c.experts if L.kind == "moe" else c
        if x.activation not in ACTS:
            return f"{at(L, 'activation')} {x.activation} (NLLB-MoE's MLPs: {', '.join(ACTS)})"
        if not x.bias:
            return f"{at(L, 'bias')} false (NLLB-MoE's fc1 and fc2 have biases)"
        seen.setdefault(f"{stack}_ffn_dim", []).append((x.hidden, L))
        seen.setdefault("activation_function", []).append((x.activation, L))
        if L.kind == "moe":
            g = c.gate
            if not isinstance(g, GShard.Options):
                return f"{at(L, 'gate', 'type')} {g.type} (NLLB-MoE's router is top-2: gshard)"
            if g.expert_capacity is None or g.routing_groups != 1 or g.dropped_tokens != "residual" or \
                    not g.normalize:
                return (f"{at(L, 'gate')}: expert_capacity {g.expert_capacity}, routing_groups {g.routing_groups}, "
                        f"dropped_tokens {g.dropped_tokens}, normalize {g.normalize} (NLLB-MoE: an expert_capacity "
                        "over the whole batch, dropped choices add nothing, weights normalised)")
            seen.setdefault("moe_token_dropout", []).append((x.token_dropout, L))
            seen.setdefault("num_experts", []).append((x.count, L))
            seen.setdefault("router_aux_loss_coef", []).append((c.losses.balance, L))
            seen.setdefault("router_z_loss_coef", []).append((c.losses.z_loss, L))
            for key, value in self.gate_config(g).items():
                seen.setdefault(key, []).append((value, L))
        return None

    def gate_config(self, g) -> dict:
        """config.json's router fields from a gshard gate's options."""
        return {"second_expert_policy": {"always": "all"}.get(g.second_expert, g.second_expert),
                "batch_prioritized_routing": g.drop_priority == "score",
                "normalize_router_prob_before_dropping": not g.normalize_after_drops,
                "expert_capacity": g.expert_capacity,
                "moe_eval_capacity_token_fraction": g.eval_capacity_fraction or 0.0,
                "router_ignore_padding_tokens": g.route_padding}

    new_config = {"is_encoder_decoder": True, "use_cache": True, "init_std": 0.02, "router_bias": False,
                  "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "activation_dropout": 0.0, "bos_token_id": 0,
                  "output_router_logits": False}


register(NllbMoe())
