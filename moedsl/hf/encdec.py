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

from moedsl.errors import UserError

from . import Family
from .llama_like import IGNORED, _periodic, at, changed, yaml_float  # noqa: F401 - re-exported to the families


class Config(dict):
    """config.json's fields with the config class's defaults filled in; ``where(key)`` names the
    source of a value (the field, or the class's default)."""

    def __init__(self, values: dict, given: set, class_name: str):
        super().__init__(values)
        self.given, self.class_name = given, class_name

    def where(self, key: str) -> str:
        return key if key in self.given else f"{key} ({self.class_name}'s default)"


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
        for key in sorted(config):
            if key not in self.defaults and key not in IGNORED and key not in self.ignored:
                self.refuse(key, config[key], f"the fields of transformers' {self.config_class}")
        c = Config({k: config.get(k, v) for k, v in self.defaults.items()}, set(config), self.config_class)
        dtype = config.get("dtype", config.get("torch_dtype", "float32"))
        if dtype not in ("float32", "bfloat16", "float16"):
            self.refuse("dtype", dtype, "float32, bfloat16, float16")
        c["dtype"] = dtype
        self.read(c, config)
        return c

    def read(self, c: Config, config: dict) -> None:
        """Family-specific fields: derive, and refuse what is not expressible."""


def stack_lines(blocks: list, indent: str, count_note: str) -> list:
    """YAML lines of a stack's blocks, each block ``(span comment, [(kind, comment, [lines])])``:
    runs of equal blocks become ``repeat`` (``count_note``: where their number came from)."""
    keys = [tuple((k, c, tuple(b)) for k, c, b in block[1]) for block in blocks]
    out, i, n = [], 0, len(blocks)
    while i < n:
        p, r = _periodic(keys, i)
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
