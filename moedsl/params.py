"""Parameter counts of a spec, from its modules built on the meta device (no weights allocated).

Each layer kind (``moedsl.kinds``) counts its own: the numel of its ``nn.Module`` made on the
meta device, and for an MoE layer the part one token uses (the shared experts, the router
weights it meets, experts_per_token routed experts). A sublayer's pre-norm is counted with it.
"""
from __future__ import annotations

from .kinds import layer_kind, norm_numel
from .spec import Spec


def prenorm_params(spec: Spec, layer) -> int:
    """The parameters of the pre-norm of a residual sublayer (0 without one)."""
    kind = layer_kind(layer.kind)
    return norm_numel(spec.model.norm, spec.model) if kind.sublayer and layer.config.prenorm else 0


def _owns(spec: Spec, layer) -> bool:
    """Whether ``layer`` holds its module: not when an earlier layer uses the same one (an
    encoder-decoder's decoder embeds with the encoder's table)."""
    kind = layer_kind(layer.kind)
    target = kind.target(layer)
    return next(other for other in spec.layers if layer_kind(other.kind).target(other) == target) is layer


def layer_params(spec: Spec, layer) -> tuple[int, int]:
    """(parameters, parameters one token uses) of one expanded layer, its pre-norm included (a
    module it shares with an earlier layer counted there), and the stack's shared modules
    (``LayerKind.shared``: a relative position bias) with the first layer that uses them."""
    kind = layer_kind(layer.kind)
    n, active = kind.parameters(layer.config, spec.model) if _owns(spec, layer) else (0, 0)
    pre = prenorm_params(spec, layer)
    extra = sum(settings.parameters(spec.model) for name, settings in kind.shared(layer, spec.model).items()
                if hasattr(settings, "parameters") and _first_to_share(spec, name) is layer)
    return n + pre + extra, active + pre + extra


def _first_to_share(spec: Spec, name: str):
    return next(other for other in spec.layers if name in layer_kind(other.kind).shared(other, spec.model))


def count_parameters(spec: Spec) -> tuple[int, int]:
    """(total parameters, active parameters per token) of the whole model. An encoder-decoder's
    token passes through one of the two stacks: its parameters active per token are both stacks'
    (as Switch counts FLOPs per token of both), the shared embedding once."""
    total = active = 0
    for layer in spec.layers:
        n, a = layer_params(spec, layer)
        total += n
        active += a
    return total, active


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
