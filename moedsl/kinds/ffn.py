"""``ffn``: a dense position-wise feed-forward sublayer (Vaswani et al. 2017, §3.3; gated
variants swiglu / geglu from Shazeer 2020)."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("ffn")
GLU_ACTIVATIONS = ("swiglu", "geglu")


@dataclass(frozen=True)
class FFN:
    hidden: int
    activation: str = _D["activation"]
    dropout: float = _D["dropout"]
    bias: bool = _D["bias"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]

    @property
    def glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS


class FFNKind(LayerKind):
    name = "ffn"
    config = FFN
    sublayer = True

    def module(self, cfg: FFN, model):
        from moedsl.nn.experts import DenseFFN

        return DenseFFN(model.d_model, cfg.hidden, cfg.activation, cfg.bias, cfg.dropout, model.init_std)

    def activations(self, cfg: FFN, model) -> float:
        return 2.0 * model.d_model + (3 if cfg.glu else 2) * cfg.hidden


register(FFNKind())
