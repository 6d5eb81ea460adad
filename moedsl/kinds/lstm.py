"""``lstm``: a stacked LSTM of width d_model, as a residual sublayer (Shazeer et al. 2017, §5.1:
the MoE layer sits between stacked LSTM layers)."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("lstm")


@dataclass(frozen=True)
class LSTM:
    layers: int = _D["layers"]
    dropout: float = _D["dropout"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]


class LSTMKind(LayerKind):
    name = "lstm"
    config = LSTM
    sublayer = True

    def module(self, cfg: LSTM, model):
        from moedsl.nn.layers import LSTMBlock

        return LSTMBlock(model.d_model, cfg.layers, cfg.dropout)

    def activations(self, cfg: LSTM, model) -> float:
        return 6.0 * model.d_model * cfg.layers  # four gates, cell and hidden state per layer


    def document_kwargs(self, ctx, layer) -> dict:
        """The documents themselves: its state starts afresh at each one."""
        return {"documents": ctx.documents}

    def decode_args(self, ctx, layer) -> tuple:
        """Its (h, c) per layer, carried from step to step."""
        return ctx.decode_state(layer, self.target(layer))


register(LSTMKind())
