"""``ffn``: a dense position-wise feed-forward sublayer (Vaswani et al. 2017, §3.3; gated
variants swiglu / geglu from Shazeer 2020)."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register, wider

_D = defaults("ffn")
GLU_ACTIVATIONS = ("swiglu", "geglu")


def hidden_kept(activation: str) -> int:
    """Hidden-width tensors a feed-forward keeps per row for its backward: a gated unit keeps the
    gate's and the up projection's outputs, the activated gate and their product (the down
    projection's input); relu keeps its output only (its own backward and the down projection's
    input are that one tensor); gelu and silu keep their input and their output."""
    return 4 if activation in GLU_ACTIVATIONS else 1 if activation == "relu" else 2


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
        """Its pre-norm's input and output (float32), its own input (d_model each) and the hidden rows."""
        return model.d_model * (2.0 * wider(model) + 1.0) + hidden_kept(cfg.activation) * cfg.hidden


register(FFNKind())
