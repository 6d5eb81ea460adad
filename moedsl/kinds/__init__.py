"""The words of the spec language: every layer kind in one module of this package, registered
by its YAML key; every gate type in one module of ``moedsl.kinds.gates``.

A layer kind's module says, in one place,

- its fields: a frozen dataclass whose defaults are the JSON Schema's ``default`` annotations
  (``moedsl.schema.defaults``), so a default is written once;
- its checks: ``build`` turns the YAML mapping into the dataclass and reports what the schema
  cannot express through ``Checks.error(path, message, hint)``;
- its ``nn.Module`` (``module``), its parameters (counted from that module built on the meta
  device) and its forward FLOPs and activations per token (for the Plan);
- its lowering into the ``torch.fx`` graph (``lower``).

Its schema entry (the ``$defs`` definition named like the kind, and the kind's name in the
``layer_kinds`` enum and the ``layer`` / ``block_layer`` properties) stays in
``moedsl/schema/moedsl.schema.json``, the one file editors read. Importing this package does
not import torch: modules and lowerings import it when called.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import fields, is_dataclass
from typing import Any, Optional

from moedsl import dtypes

_KINDS: dict[str, "LayerKind"] = {}


def wider(model, dtype: str = "float32") -> float:
    """Elements of ``model.dtype`` one element of ``dtype`` weighs: what a layer keeps in float32
    under a 16-bit autocast (norms compute in float32, the router in ``model.router_dtype``, the
    loss on upcast logits) counts this many times."""
    return dtypes.BYTES[dtype] / dtypes.BYTES[model.dtype]


def take(cls, data: Optional[dict], **resolved):
    """Build dataclass ``cls`` from the keys of ``data`` it has, plus resolved values."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in (data or {}).items() if k in names}
    kwargs.update(resolved)
    return cls(**kwargs)


class LayerKind:
    """One layer kind. A kind's module subclasses this, sets the class attributes, overrides what
    differs from the defaults below, and calls ``register`` with an instance."""

    name: str  # the YAML key, e.g. "attention"
    config: type  # its frozen dataclass
    sublayer: bool = False  # a pre-norm residual sublayer: `residual` and `prenorm` apply
    place: Optional[str] = None  # "first" / "last": the only place in the stack it may stand
    needs_tokens: bool = False  # only with model.input: tokens
    inputs: Optional[tuple] = None  # the model.input values it works with (None: see ``accepts``)
    # the stacks it may stand in: a spec's ``layers`` (""), an encoder-decoder's encoder or decoder
    stacks: tuple = ("", "encoder", "decoder")
    # the fields of its config a resume may change, keeping the checkpoint's weights meaning the same
    # (``runtime.checkpoint.training_only``): dropout, which applies in training only, for every kind
    training_only: frozenset = frozenset({"dropout"})

    def accepts(self, model_input: str) -> bool:
        """Whether it can stand in a model whose input is ``model_input``: one of ``inputs`` when
        given; otherwise tokens only for ``needs_tokens`` kinds, any input for the rest."""
        if self.inputs is not None:
            return model_input in self.inputs
        return model_input == "tokens" if self.needs_tokens else True

    # -- the spec ------------------------------------------------------------------------------
    def build(self, data: dict, path: tuple, model, checks) -> Any:
        """The typed config of one YAML item (``data``: its schema-valid mapping, at ``path``);
        semantic mistakes go to ``checks.error(path + (key,), message, hint)``."""
        return take(self.config, data)

    def check_stack(self, layer, model, once) -> None:
        """Checks that need the layer's neighbours or the model; ``once(path, message, hint)``."""

    def shared(self, layer, model) -> dict:
        """The modules it uses that other layers use too, {module name: settings}: an
        encoder-decoder's one embedding table, a stack's relative position bias. The spec's
        layers that name one module state equal settings (checked); it is made once, and counted
        once (a settings value with ``parameters(model)`` holds parameters of its own, beside the
        layer's module)."""
        return {}

    def shared_field(self, layer, settings, other) -> tuple:
        """(the path below the layer's kind, what) of the field where ``settings`` differ from
        ``other``'s, for the error that says so: by default the first field of the settings (a
        dataclass: the layer's own config, as the embedding's) that differs, named as in the YAML."""
        if is_dataclass(settings):
            for f in fields(settings):
                if getattr(settings, f.name) != getattr(other, f.name):
                    return (f.name,), f.name
        return (), "its settings"

    def resume_may_change(self, names: tuple, old, new, gate: Optional[str] = None) -> bool:
        """Whether a resume may change the field at ``names`` (keys below the layer's config) from
        ``old`` to ``new`` (``gate``: the type of the gate above it, if any): one of ``training_only``."""
        return len(names) == 1 and names[0] in self.training_only

    # -- the module ----------------------------------------------------------------------------
    def module(self, cfg, model):
        """The ``nn.Module`` of one layer of this kind (made on torch's current default device)."""
        raise NotImplementedError

    def parameters(self, cfg, model) -> tuple[int, int]:
        """(parameters, those one token uses), counted from the module on the meta device."""
        n = meta_numel(self, cfg, model)
        return n, n

    # -- the plan ------------------------------------------------------------------------------
    def flops(self, cfg, model, seq: int) -> float:
        """Forward FLOPs per token: 2 per multiply-add of its weights (override what differs)."""
        return 2.0 * self.parameters(cfg, model)[1]

    def activations(self, cfg, model) -> float:
        """Activation elements per token kept for the backward (the Plan's estimate), counted in
        elements of ``model.dtype``: a float32 tensor under a 16-bit dtype counts ``wider(model)``."""
        return float(model.d_model)

    # -- the graph -----------------------------------------------------------------------------
    def target(self, layer) -> str:
        """The qualified name of its module in the GraphModule."""
        return f"layers.{layer.index}.{self.name}"

    def lower(self, ctx, layer, x):
        """Add the layer's nodes to ``ctx``'s graph (``moedsl.compiler.lower.LowerContext``); return
        its output node. A sublayer gets its (pre-normed) input; the residual is added around it."""
        target = ctx.module(self.target(layer), lambda: self.module(layer.config, ctx.model))
        extra = self.decode_args(ctx, layer) if ctx.decode else ()
        kwargs = self.document_kwargs(ctx, layer) if ctx.documents is not None else {}
        return ctx.call_module(target, (x,) + extra, ctx.node_name(layer, self.name), kwargs=kwargs)

    def document_kwargs(self, ctx, layer) -> dict:
        """In a graph over rows that may pack several documents (``ctx.documents``): the keyword
        arguments its module takes to keep to each document, from ``ctx.document_mask()`` and
        ``ctx.document_positions()`` (shared by every layer). None by default: a layer that
        computes each token on its own keeps to its document as it runs."""
        return {}

    def decode_args(self, ctx, layer) -> tuple:
        """In a decode graph (``ctx.decode``): the arguments its module takes after x to decode a few
        tokens at a time. None by default: a layer that computes each token on its own (a norm, an
        FFN) decodes as it runs. A layer with state across positions returns
        ``ctx.decode_state(layer)`` (the cache, the positions, the start slot, its cache key), or
        raises ``UserError`` naming the layer when it cannot decode."""
        return ()


def register(kind: LayerKind) -> LayerKind:
    _KINDS[kind.name] = kind
    return kind


def layer_kind(name: str) -> LayerKind:
    return _KINDS[name]


def layer_kinds() -> dict[str, LayerKind]:
    return dict(_KINDS)


@functools.lru_cache(maxsize=None)
def _meta_numel(kind: LayerKind, cfg, model) -> int:
    import torch

    with torch.device("meta"):
        module = kind.module(cfg, model)
    return sum(p.numel() for p in module.parameters())


def meta_numel(kind: LayerKind, cfg, model) -> int:
    """Parameters of ``kind.module(cfg, model)``, built on the meta device (nothing allocated;
    cached: the repeated layers of a stack share their config)."""
    return _meta_numel(kind, cfg, model)


def norm_numel(kind: str, model) -> int:
    """Parameters of a norm of type ``kind`` over d_model (a sublayer's pre-norm)."""
    from .norm import Norm, NORM

    return meta_numel(NORM, Norm(type=kind, eps=model.norm_eps), model)


def import_all(package: str, path) -> None:
    """Import every module of a package: each registers its kind (adding one is adding a file)."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")


import_all(__name__, __path__)  # the gates (a subpackage) come first: the MoE layer uses them
