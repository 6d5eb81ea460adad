"""What the encoder-decoder families (``families/switch_transformers.py``, ``families/nllb_moe.py``)
share: reading config.json against the config class's fields (each one read, ignored as bookkeeping,
or refused naming it), writing a stack's layers as commented YAML (runs of equal layers become a
``repeat``), and walking an encoder-decoder spec's two stacks back into per-block layer groups for
the export (``blocks``).

An encoder-decoder spec (``encoder:`` and ``decoder:``) expands into one ``Spec.layers`` tuple,
encoder layers first, each ``Layer`` naming its ``stack``; ``blocks`` cuts each stack into its
embedding, its blocks (an attention, in the decoder a cross-attention, then an ``moe`` or ``ffn``)
and its final norm (and the decoder's head).
"""
from __future__ import annotations

from typing import Optional

import torch

from moedsl.errors import UserError

from . import Family, Tensor, same
from .llama_like import (Config, at, changed, known_fields, periodic, stack_t, transposed,  # noqa: F401
                         yaml_float)


class EncDecFamily(Family):
    """An encoder-decoder family: subclasses set ``defaults`` (the config class's fields and their
    defaults, transformers' configuration_*.py), ``ignored`` (further fields without effect on the
    logits), ``read`` (derive, refuse) and the spec, tensor and config maps."""

    defaults: dict = {}
    ignored: set = set()

    def refuse(self, field: str, value, supported: str):
        raise UserError(f"config.json: {field} = {value!r} is not supported for {self.model_type} "
                        f"(supported: {supported})")

    def read_config(self, config: dict) -> Config:
        c = known_fields(self, config, set(self.defaults), self.defaults)
        self.read(c, config)
        return c

    def read(self, c: Config, config: dict) -> None:
        """Family-specific fields: derive, and refuse what is not expressible."""

    # -- tensors: the family's ``pairs``, plus the shared embedding and the experts done here --

    base = ""  # the checkpoint's prefix of shared, encoder and decoder ("model." for NLLB-MoE)
    # per expert e of an MoE layer: (moedsl's stacked tensor, the checkpoint's name after "expert_{e}.")
    expert_tensors: tuple = ()

    def pairs(self, spec) -> tuple:
        """([(moedsl name, checkpoint name)] of every tensor but the embedding's, the head's and the
        experts', [(moedsl MoE layer index, checkpoint prefix of its "expert_{e}." tensors, experts)])."""
        raise NotImplementedError

    def _pairs(self, spec) -> tuple:
        why, _ = blocks(spec, self.model_type)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face {self.model_type} equivalent")
        return self.pairs(spec)

    def import_tensors(self, spec, config: dict, names: set) -> list:
        """Tied: ``shared`` is the embedding (and the head). Untied, transformers 5 gives each stack
        its own table and keeps ``shared`` unused: the two tables must be equal (one_table)."""
        pairs, moes = self._pairs(spec)
        b = self.base
        out = [Tensor(ours, (theirs,), same) for ours, theirs in pairs]
        if spec.model.tie_embeddings:
            out.append(Tensor("embedding.weight", (f"{b}shared.weight",), same))
        else:
            out += [Tensor("embedding.weight", (f"{b}encoder.embed_tokens.weight", f"{b}decoder.embed_tokens.weight"),
                           lambda ts: one_table(ts, b)),
                    Tensor("head.weight", ("lm_head.weight",), same)]
        for m, hf, E in moes:  # per expert [out, in] -> stacked [E, in, out]; biases stacked [E, n]
            out += [Tensor(f"layers.{m}.experts.{ours}", tuple(f"{hf}expert_{e}.{theirs}" for e in range(E)),
                           stack_t if theirs.endswith(".weight") else stack_rows)
                    for ours, theirs in self.expert_tensors]
        return out

    def skipped_tensors(self, config: dict, names: set) -> set:
        return {f"{self.base}shared.weight"} if not config.get("tie_word_embeddings", True) else set()

    def export_tensors(self, spec) -> list:
        pairs, moes = self._pairs(spec)
        b = self.base
        out = [Tensor(theirs, (ours,), same) for ours, theirs in pairs]
        out.append(Tensor(f"{b}shared.weight", ("embedding.weight",), same))
        if not spec.model.tie_embeddings:
            out += [Tensor(f"{b}encoder.embed_tokens.weight", ("embedding.weight",), same),
                    Tensor(f"{b}decoder.embed_tokens.weight", ("embedding.weight",), same),
                    Tensor("lm_head.weight", ("head.weight",), same)]
        for m, hf, E in moes:
            out += [Tensor(f"{hf}expert_{e}.{theirs}", ((f"layers.{m}.experts.{ours}", e),),
                           (lambda ts: transposed(ts[0])) if theirs.endswith(".weight") else same)
                    for e in range(E) for ours, theirs in self.expert_tensors]
        return out

    # -- the spec's structure and config.json ---------------------------------------------

    new_config: dict = {}  # the bookkeeping fields of a config.json written without one recorded at import
    stale: tuple = ("transformers_version", "_name_or_path", "torch_dtype")  # dropped from a recorded one

    def layout(self, spec) -> tuple:
        """(problem or None, the config.json fields the spec sets): ``model_config`` from
        ``spec.model``, then each stack's layers (``walk``), then ``stack_config`` of each stack's
        sparse layers; the fields every layer reports (``seen``) must agree."""
        why, st = blocks(spec, self.model_type)
        cfg = None if why else self.model_config(spec.model)
        if isinstance(cfg, str):
            why = cfg
        seen: dict = {}
        for stack in ("encoder", "decoder"):
            if why:
                return why, None
            why, flags = self.walk(st[stack], stack, seen, spec.model)
            if why is None:
                out = self.stack_config(stack, flags)
                why = out if isinstance(out, str) else cfg.update(out)
        why = why or one(seen, self.model_type)
        if why:
            return why, None
        cfg.update({k: v[0][0] for k, v in seen.items()})
        return None, cfg

    def walk(self, s: dict, stack: str, seen: dict, model) -> tuple:
        """(problem or None, which blocks are sparse) of one stack ``s`` (``blocks``), each layer
        checked by the family (``layer_problem``, which records its config fields in ``seen``)."""
        for L in (s["embedding"], s["norm"], *(L for group in s["blocks"] for L in group)):
            why = self.layer_problem(L, stack, seen, model)
            if why:
                return why, None
        return None, [group[-1].kind == "moe" for group in s["blocks"]]

    def model_config(self, m) -> dict | str:
        """config.json's fields from ``spec.model``, or a problem."""
        raise NotImplementedError

    def layer_problem(self, L, stack: str, seen: dict, model) -> Optional[str]:
        """What keeps layer ``L`` of ``stack`` (in a spec of ``model``) from being the family's, or
        None (recording the config fields it sets in ``seen``: field -> [(value, layer)])."""
        raise NotImplementedError

    def stack_config(self, stack: str, flags: list) -> dict | str:
        """config.json's layer-count and sparse-layer fields of ``stack`` from its sparse ``flags``,
        or a problem."""
        raise NotImplementedError

    def architecture_problem(self, spec) -> Optional[str]:
        return self.layout(spec)[0]

    def export_config(self, spec, recorded: Optional[dict]) -> dict:
        why, cfg = self.layout(spec)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face {self.model_type} equivalent")
        out = dict(recorded or self.new_config)
        for key in self.stale:
            out.pop(key, None)
        out.update({k: v for k, v in cfg.items() if v is not None})
        m = spec.model
        out.update({"architectures": list(self.architectures), "model_type": self.model_type,
                    "pad_token_id": m.pad_id, "eos_token_id": m.eos_id, "decoder_start_token_id": m.decoder_start_id})
        return out


def stack_lines(blocks: list, indent: str, count_note: str) -> list:
    """YAML lines of a stack's blocks, each block ``(span comment, [(kind, comment, [lines])])``:
    runs of equal blocks become ``repeat`` (``count_note``: where their number came from)."""
    keys = [tuple((k, c, tuple(b)) for k, c, b in block[1]) for block in blocks]
    out, i, n = [], 0, len(blocks)
    while i < n:
        p, r = periodic(keys, i)
        if r > 1:
            span = count_note if p * r == n else f"blocks {i}-{i + p * r - 1}"
            out += [f"{indent}- repeat: {r}  # {span}", f"{indent}  block:"]
            inner = indent + "    "
        else:
            out.append(f"{indent}# {blocks[i][0]}")
            inner = indent
        for j in range(i, i + p):
            for kind, comment, body in blocks[j][1]:
                out.append(f"{inner}- {kind}:  # {comment}")
                out += [f"{inner}    {x}" for x in body]
        i += p * r
    return out


def blocks(spec, fam: str) -> tuple:
    """(problem or None, {"encoder": [...], "decoder": [...]}) of an encoder-decoder ``spec``:
    each stack as ``{"embedding": layer, "blocks": [[layers of one block]], "norm": layer, "head":
    layer or None}``, a block being attention (+ cross_attention in the decoder) + moe or ffn."""
    if not getattr(spec, "encoder_decoder", False):
        return "a decoder-only spec (no encoder: stack)", None
    if spec.model.input != "tokens":
        return f"model.input {spec.model.input}", None
    out = {}
    for stack in ("encoder", "decoder"):
        layers = [L for L in spec.layers if getattr(L, "stack", "") == stack]
        want_head = stack == "decoder"
        tail = 2 if want_head else 1
        if len(layers) < 1 + tail or layers[0].kind != "embedding" or layers[-tail].kind != "norm" or \
                (want_head and layers[-1].kind != "head"):
            shape = "embedding, blocks, norm" + (", head" if want_head else "")
            return f"{stack}: a stack other than {shape} ({fam})", None
        body, group, groups = layers[1:-tail], [], []
        kinds = ("attention", "cross_attention") if stack == "decoder" else ("attention",)
        for L in body:
            group.append(L)
            if L.kind in ("moe", "ffn"):
                if [g.kind for g in group[:-1]] != list(kinds):
                    return f"{at(L)}: {fam}'s {stack} blocks are {', '.join(kinds)}, then moe or ffn", None
                groups.append(group)
                group = []
        if group:
            return f"{at(group[0])}: {fam}'s {stack} blocks are {', '.join(kinds)}, then moe or ffn", None
        out[stack] = {"embedding": layers[0], "blocks": groups, "norm": layers[-tail],
                      "head": layers[-1] if want_head else None}
    return None, out


def one_table(ts, base: str):
    """The embedding of an untied checkpoint: its encoder's and decoder's tables, which must be equal."""
    enc, dec = ts
    if enc.device.type != "meta" and not (enc.shape == dec.shape and bool(torch.equal(enc, dec))):
        raise UserError(f"{base}encoder.embed_tokens.weight differs from {base}decoder.embed_tokens.weight "
                        "(tie_word_embeddings false): moedsl's encoder and decoder share one embedding")
    return enc


def stack_rows(ts):
    """Per-expert vectors -> [E, n]."""
    return torch.stack(list(ts)).contiguous()


def one(values: dict, fam: str) -> Optional[str]:
    """A problem if the layers disagree on a field the family's config holds once: ``values`` maps
    a config field to [(its value, the layer that has it)]."""
    for key, seen in values.items():
        first = seen[0]
        for v, layer in seen[1:]:
            if v != first[0]:
                return f"{at(layer)}: {key} {v!r} where {at(first[1])} has {first[0]!r} ({fam}'s config has one)"
    return None


def fmt(x) -> str:
    """A YAML scalar."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return yaml_float(x)
    if x is None:
        return "null"
    return str(x)
