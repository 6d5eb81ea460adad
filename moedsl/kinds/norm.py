"""``norm``: a standalone norm (the final norm before the head); also the pre-norm of every
residual sublayer (``model.norm``). RMSNorm (Zhang & Sennrich 2019) or LayerNorm."""
from __future__ import annotations

from dataclasses import dataclass

from . import LayerKind, register, wider


@dataclass(frozen=True)
class Norm:
    type: str  # resolved: defaults to model.norm
    eps: float  # resolved: defaults to model.norm_eps


class NormKind(LayerKind):
    name = "norm"
    config = Norm

    def build(self, data, path, model, checks) -> Norm:
        return Norm(type=data.get("type", model.norm), eps=data.get("eps", model.norm_eps))

    def module(self, cfg: Norm, model):
        from moedsl.nn.layers import make_norm

        return make_norm(cfg.type, model.d_model, cfg.eps)

    def flops(self, cfg, model, seq: int) -> float:
        return 0.0

    def activations(self, cfg, model) -> float:
        return 2.0 * model.d_model * wider(model)  # its input and the normalised input, in float32


NORM = register(NormKind())
