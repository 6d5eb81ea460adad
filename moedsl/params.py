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


def layer_params(spec: Spec, layer) -> tuple[int, int]:
    """(parameters, parameters one token uses) of one expanded layer, its pre-norm included."""
    n, active = layer_kind(layer.kind).parameters(layer.config, spec.model)
    pre = prenorm_params(spec, layer)
    return n + pre, active + pre


def count_parameters(spec: Spec) -> tuple[int, int]:
    """(total parameters, active parameters per token) of the whole model."""
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
