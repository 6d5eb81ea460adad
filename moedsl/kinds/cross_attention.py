"""``cross_attention``: an encoder-decoder's attention from the decoder over the encoder's output
(Vaswani et al. 2017, §3.2.3; T5 and Switch, Raffel et al. 2020 §3.1.1; NLLB-MoE), as a residual
sublayer of the decoder. No position information; the source's padding is masked. Decoding, its
keys and values are computed once per sequence. The module is ``moedsl.nn.attention.CrossAttention``."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register, wider

_D = defaults("cross_attention")


@dataclass(frozen=True)
class CrossAttention:
    heads: int
    head_dim: int  # resolved: defaults to d_model // heads
    bias: bool = _D["bias"]
    scaled: bool = _D["scaled"]
    dropout: float = _D["dropout"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]


class CrossAttentionKind(LayerKind):
    name = "cross_attention"
    config = CrossAttention
    sublayer = True
    needs_tokens = True
    stacks = ("decoder",)

    def build(self, data, path, model, checks) -> CrossAttention:
        from . import take
        from .attention import head_width

        return take(CrossAttention, data, head_dim=head_width(data, path, model, checks)[0])

    def module(self, cfg: CrossAttention, model):
        from moedsl.nn.attention import CrossAttention as Module

        return Module(model.d_model, cfg.heads, cfg.head_dim, cfg.bias, cfg.scaled, cfg.dropout, model.init_std)

    def flops(self, cfg: CrossAttention, model, seq: int) -> float:
        """The projections (the keys' and values' over the source, taken as long as the target), plus
        QKᵀ and AV over every source token."""
        return super().flops(cfg, model, seq) + 2 * 2 * seq * cfg.heads * cfg.head_dim

    def activations(self, cfg: CrossAttention, model) -> float:
        """As self-attention's: its pre-norm's input and output (float32), its input and output, q,
        k, v and the attention output."""
        return model.d_model * (2.0 * wider(model) + 2.0) + 4.0 * cfg.heads * cfg.head_dim

    def lower(self, ctx, layer, x):
        """x, the encoder's output and the source mask; decoding, the cache its keys and values stay in."""
        target = ctx.module(self.target(layer), lambda: self.module(layer.config, ctx.model))
        kwargs = {"cache": ctx.cache, "key": self.target(layer)} if ctx.decode else {}
        return ctx.call_module(target, (x, ctx.memory, ctx.source_mask), ctx.node_name(layer, self.name),
                               kwargs=kwargs)


register(CrossAttentionKind())
