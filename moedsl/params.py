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


def layer_counts(spec: Spec) -> list:
    """Each expanded layer's (parameters, parameters one token uses), in one pass, its pre-norm
    included. A module several layers use is counted with the first of them: a layer whose
    module (its kind's ``target``) an earlier layer holds (an encoder-decoder's decoder embeds with
    the encoder's table), and a stack's shared modules (``LayerKind.shared``: a relative position
    bias, its parameters from ``settings.parameters(model)``)."""
    held, shared = set(), set()
    out = []
    for layer in spec.layers:
        kind = layer_kind(layer.kind)
        target = kind.target(layer)
        n, active = (0, 0) if target in held else kind.parameters(layer.config, spec.model)
        held.add(target)
        extra = prenorm_params(spec, layer)
        for name, settings in kind.shared(layer, spec.model).items():
            if name not in shared and hasattr(settings, "parameters"):
                extra += settings.parameters(spec.model)
            shared.add(name)
        out.append((n + extra, active + extra))
    return out


def count_parameters(spec: Spec) -> tuple[int, int]:
    """(total parameters, active parameters per token) of the whole model. An encoder-decoder's
    token passes through one of the two stacks: its parameters active per token are both stacks'
    (as Switch counts FLOPs per token of both), the shared embedding once."""
    counts = layer_counts(spec)
    return sum(n for n, _ in counts), sum(a for _, a in counts)


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
