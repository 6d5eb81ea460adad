"""``attention``: causal multi-head self-attention (Vaswani et al. 2017, §3.2) with grouped-query
heads (Ainslie et al. 2023), rotary positions (Su et al. 2021) or T5's relative position bias
(Raffel et al. 2020, §2.1; one table per stack, ``RelativeBias``), unscaled logits (T5), an explicit head width, q/k
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
    relative_buckets: int = _D["relative_buckets"]
    relative_max_distance: int = _D["relative_max_distance"]
    scaled: bool = _D["scaled"]


@dataclass(frozen=True)
class RelativeBias:
    """A stack's relative position bias table (positions: relative), shared by the self-attention
    layers of the stack that state it: ``moedsl.nn.attention.RelativeBias``."""

    buckets: int
    max_distance: int
    heads: int
    bidirectional: bool  # an encoder's (causal: false); a decoder's looks back only

    def parameters(self, model) -> int:
        return self.buckets * self.heads

    def module(self, model):
        from moedsl.nn.attention import RelativeBias as Module

        return Module(self.buckets, self.max_distance, self.heads, self.bidirectional, model.init_std)


def head_width(data: dict, path: tuple, model, checks) -> tuple:
    """(the heads' width, whether it fits) of an attention's YAML mapping: its ``head_dim``, else
    d_model // heads, where a d_model the heads do not divide is reported at ``heads``."""
    explicit = data.get("head_dim")
    if explicit is not None:
        return explicit, True
    if model.d_model % data["heads"]:
        checks.error(path + ("heads",), f"d_model {model.d_model} is not divisible by {data['heads']} heads",
                     "set head_dim to give the heads another width")
        return model.d_model // data["heads"], False
    return model.d_model // data["heads"], True


def relative_bias_name(layer) -> str:
    """The module of a stack's relative position bias: ``encoder_relative_bias``,
    ``decoder_relative_bias``, or ``relative_bias`` (a spec's ``layers``)."""
    return f"{layer.stack}_relative_bias" if layer.stack else "relative_bias"


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
        width, fits = head_width(data, path, model, checks)
        a = take(Attention, data, kv_heads=data.get("kv_heads", heads), head_dim=width,
                 qkv_bias=data.get("qkv_bias", bias), out_bias=data.get("out_bias", bias),
                 qk_norm_eps=data.get("qk_norm_eps", model.norm_eps))
        if fits and a.positions == "rotary" and a.head_dim % 2:
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
        if a.positions != "relative":
            for key in ("relative_buckets", "relative_max_distance"):
                if key in data:
                    checks.error(path + (key,), f"{key!r} applies to positions: relative (here positions: "
                                 f"{a.positions})", key=True)
        elif a.relative_buckets < (4 if not a.causal else 2):
            checks.error(path + ("relative_buckets",), f"{a.relative_buckets} buckets leave no exact distance "
                         f"bucket{' per direction' if not a.causal else ''}", "T5 uses 32")
        return a

    def check_stack(self, layer, model, once) -> None:
        """A decoder's self-attention looks back only: its tokens are predicted from the earlier ones."""
        if layer.stack == "decoder" and not layer.config.causal:
            once(layer.path + (self.name, "causal"), "a decoder's self-attention must be causal: a target "
                 "token would see the one it predicts", "set causal: true (the encoder's is causal: false)")

    def shared(self, layer, model) -> dict:
        """positions: relative: the stack's bias table, bidirectional where the attention is."""
        cfg = layer.config
        if cfg.positions != "relative":
            return {}
        return {relative_bias_name(layer): RelativeBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                        cfg.heads, not cfg.causal)}

    def shared_field(self, layer, settings, other) -> tuple:
        for field, key in (("buckets", "relative_buckets"), ("max_distance", "relative_max_distance"),
                           ("heads", "heads"), ("bidirectional", "causal")):
            if getattr(settings, field) != getattr(other, field):
                return (key,), key
        return (), "its relative bias"  # pragma: no cover - the settings differ in one of those

    def module(self, cfg: Attention, model):
        from moedsl.nn.attention import Attention as Module

        return Module(model.d_model, cfg.heads, cfg.kv_heads, cfg.positions, cfg.rope_theta, cfg.causal,
                      cfg.dropout, cfg.qkv_bias, model.init_std, head_dim=cfg.head_dim, out_bias=cfg.out_bias,
                      qk_norm=cfg.qk_norm, qk_norm_eps=cfg.qk_norm_eps, clip_qkv=cfg.clip_qkv,
                      sliding_window=cfg.sliding_window, scaled=cfg.scaled)

    def lower(self, ctx, layer, x):
        """Its module's node; with positions: relative the stack's bias node (made once, shared by
        the stack's layers) and, over a padded source (the encoder), the source mask."""
        node = super().lower(ctx, layer, x)
        cfg = layer.config
        if cfg.positions == "relative":
            name = relative_bias_name(layer)
            settings = self.shared(layer, ctx.model)[name]
            ctx.module(name, lambda: settings.module(ctx.model))
            args = (ctx.stack_tokens,) + ((ctx.cache, ctx.start) if ctx.decode else ())
            node.update_kwarg("bias", ctx.stack_node(name, lambda: ctx.call_module(name, args, name)))
        padding = ctx.padding(layer)
        if padding is not None:
            node.update_kwarg("keys", padding)
        return node

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
