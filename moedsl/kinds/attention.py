"""``attention``: causal multi-head self-attention (Vaswani et al. 2017, §3.2) with grouped-query
heads (Ainslie et al. 2023) and rotary positions (Su et al. 2021), as a residual sublayer."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("attention")


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int  # resolved: defaults to heads
    positions: str = _D["positions"]
    rope_theta: float = _D["rope_theta"]
    causal: bool = _D["causal"]
    dropout: float = _D["dropout"]
    bias: bool = _D["bias"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]


class AttentionKind(LayerKind):
    name = "attention"
    config = Attention
    sublayer = True

    def build(self, data, path, model, checks) -> Attention:
        from . import take

        a = take(Attention, data, kv_heads=data.get("kv_heads", data["heads"]))
        if model.d_model % a.heads:
            checks.error(path + ("heads",), f"d_model {model.d_model} is not divisible by {a.heads} heads")
        elif a.positions == "rotary" and (model.d_model // a.heads) % 2:
            checks.error(path + ("positions",), f"rotary positions need an even head width, got "
                         f"{model.d_model} / {a.heads} = {model.d_model // a.heads}")
        if a.kv_heads > a.heads or a.heads % a.kv_heads:
            checks.error(path + ("kv_heads",), f"{a.heads} heads are not divisible by {a.kv_heads} kv_heads",
                         "in grouped-query attention kv_heads divides heads")
        return a

    def module(self, cfg: Attention, model):
        from moedsl.nn.layers import Attention as Module

        return Module(model.d_model, cfg.heads, cfg.kv_heads, cfg.positions, cfg.rope_theta, cfg.causal,
                      cfg.dropout, cfg.bias, model.init_std)

    def flops(self, cfg: Attention, model, seq: int) -> float:
        """The projections, plus QKᵀ and AV over the keys a query attends to on average."""
        d = model.d_model
        ctx = (seq + 1) / 2 if cfg.causal else seq
        return super().flops(cfg, model, seq) + 2 * 2 * ctx * d

    def activations(self, cfg, model) -> float:
        return 8.0 * model.d_model


register(AttentionKind())
