"""``attention``: causal multi-head self-attention (Vaswani et al. 2017, §3.2) with grouped-query
heads (Ainslie et al. 2023), rotary positions (Su et al. 2021), an explicit head width, q/k
RMSNorms (per head: Qwen3-MoE; over the projection: OLMoE), OLMoE's q/k/v clamp, per-group
biases (Qwen2-MoE: q/k/v only) and a causal sliding window (Mixtral, Qwen2/3-MoE), as a residual
sublayer. The module is ``moedsl.nn.attention.Attention``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moedsl.schema import defaults

from . import LayerKind, register, wider

_D = defaults("attention")


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int  # resolved: defaults to heads
    head_dim: int  # resolved: defaults to d_model // heads
    qkv_bias: bool  # resolved: defaults to bias
    out_bias: bool  # resolved: defaults to bias
    qk_norm_eps: float  # resolved: defaults to model.norm_eps
    positions: str = _D["positions"]
    rope_theta: float = _D["rope_theta"]
    causal: bool = _D["causal"]
    dropout: float = _D["dropout"]
    bias: bool = _D["bias"]
    qk_norm: str = _D["qk_norm"]  # none | head | projection
    clip_qkv: Optional[float] = _D["clip_qkv"]
    sliding_window: Optional[int] = _D["sliding_window"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]


def mean_keys(seq: int, causal: bool, window: Optional[int]) -> float:
    """Keys a query attends to, averaged over the positions 0..seq-1."""
    if not causal:
        return float(seq)
    if window is None or window >= seq:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


class AttentionKind(LayerKind):
    name = "attention"
    config = Attention
    sublayer = True

    def build(self, data, path, model, checks) -> Attention:
        from . import take

        heads = data["heads"]
        explicit = data.get("head_dim")
        bias = data.get("bias", _D["bias"])
        a = take(Attention, data, kv_heads=data.get("kv_heads", heads),
                 head_dim=explicit if explicit is not None else model.d_model // heads,
                 qkv_bias=data.get("qkv_bias", bias), out_bias=data.get("out_bias", bias),
                 qk_norm_eps=data.get("qk_norm_eps", model.norm_eps))
        if explicit is None and model.d_model % a.heads:
            checks.error(path + ("heads",), f"d_model {model.d_model} is not divisible by {a.heads} heads",
                         "set head_dim to give the heads another width")
        elif a.positions == "rotary" and a.head_dim % 2:
            if explicit is None:
                checks.error(path + ("positions",), f"rotary positions need an even head width, got "
                             f"{model.d_model} / {a.heads} = {a.head_dim}")
            else:
                checks.error(path + ("head_dim",), f"rotary positions need an even head_dim, got {a.head_dim}")
        if a.kv_heads > a.heads or a.heads % a.kv_heads:
            checks.error(path + ("kv_heads",), f"{a.heads} heads are not divisible by {a.kv_heads} kv_heads",
                         "in grouped-query attention kv_heads divides heads")
        if a.sliding_window is not None and not a.causal:
            checks.error(path + ("sliding_window",), f"sliding_window {a.sliding_window} needs causal: true "
                         "(the window is the keys before each query)")
        return a

    def module(self, cfg: Attention, model):
        from moedsl.nn.attention import Attention as Module

        return Module(model.d_model, cfg.heads, cfg.kv_heads, cfg.positions, cfg.rope_theta, cfg.causal,
                      cfg.dropout, cfg.qkv_bias, model.init_std, head_dim=cfg.head_dim, out_bias=cfg.out_bias,
                      qk_norm=cfg.qk_norm, qk_norm_eps=cfg.qk_norm_eps, clip_qkv=cfg.clip_qkv,
                      sliding_window=cfg.sliding_window)

    def flops(self, cfg: Attention, model, seq: int) -> float:
        """The projections, plus QKᵀ and AV over the keys a query attends to on average."""
        ctx = mean_keys(seq, cfg.causal, cfg.sliding_window)
        return super().flops(cfg, model, seq) + 2 * 2 * ctx * cfg.heads * cfg.head_dim

    def activations(self, cfg: Attention, model) -> float:
        """Its pre-norm's input and output (float32), its input and output (d_model each), q, k, v
        and the attention output (heads · head_dim each, counted before the key/value heads are
        repeated), plus q and k once more normed."""
        inner = cfg.heads * cfg.head_dim
        qk_normed = 2.0 * inner if cfg.qk_norm != "none" else 0.0
        return model.d_model * (2.0 * wider(model) + 2.0) + 4.0 * inner + qk_normed


    def document_kwargs(self, ctx, layer) -> dict:
        """The documents' mask, and each token's position within its document for the rotation."""
        positions = ctx.document_positions() if layer.config.positions == "rotary" else None
        return {"positions": positions, "documents": ctx.document_mask()}

    def decode_args(self, ctx, layer) -> tuple:
        """Keys and values cached per layer (a causal layer only: a token must not see later ones)."""
        if not layer.config.causal:
            ctx.cannot_decode(layer, "causal: false attention sees later tokens: it cannot decode one token "
                              "at a time")
        return ctx.decode_state(layer, self.target(layer))


register(AttentionKind())
