"""Parameter counts from the spec alone (no weights allocated).

The building blocks in ``moedsl.nn`` own the real shapes; a test builds every
example spec and checks that these counts equal their ``numel`` exactly.
"""
from __future__ import annotations

from .spec import FFN, LSTM, Attention, Embedding, Experts, Head, MoE, Norm, Spec


def norm_params(kind: str, d: int) -> int:
    return 2 * d if kind == "layernorm" else d


def ffn_params(d: int, hidden: int, glu: bool, bias: bool) -> int:
    n = (3 if glu else 2) * d * hidden
    if bias:
        n += (2 if glu else 1) * hidden + d
    return n


def expert_params(d: int, e: Experts) -> int:
    """Parameters of one routed expert."""
    return ffn_params(d, e.hidden, e.glu, e.bias)


def router_params(d: int, moe: MoE) -> tuple[int, int]:
    """(router parameters, those one token uses). A hierarchical token uses the primary gate
    and the secondary gates of the groups it is sent to only."""
    g, h = moe.gate, moe.hierarchy
    if h is not None:
        primary = h.groups * d * (2 if h.primary.type == "noisy_topk" else 1)
        one_group = h.experts_per_group * d * (2 if h.secondary.type == "noisy_topk" else 1)
        return primary + h.groups * one_group, primary + h.primary.k * one_group
    if g.type == "hash":
        return 0, 0
    n = moe.experts.count * d * (2 if g.type == "noisy_topk" else 1)
    return n, n


def layer_params(spec: Spec, layer) -> tuple[int, int]:
    """(parameters, parameters one token uses) of one expanded layer, its pre-norm included."""
    m, cfg, d = spec.model, layer.config, spec.model.d_model
    pre = norm_params(m.norm, d) if getattr(cfg, "prenorm", False) else 0
    if isinstance(cfg, Embedding):
        n = m.vocab_size * d + (m.max_seq_len * d if cfg.positions == "learned" else 0)
        return n, n  # counted whole, as the papers count "active" (Mixtral: 13B of 47B)
    if isinstance(cfg, Attention):
        hd = d // cfg.heads
        kv = cfg.kv_heads * hd
        n = d * d * 2 + 2 * d * kv + ((d + 2 * kv + d) if cfg.bias else 0)
        return n + pre, n + pre
    if isinstance(cfg, LSTM):
        n = cfg.layers * (8 * d * d + 8 * d)
        return n + pre, n + pre
    if isinstance(cfg, FFN):
        n = ffn_params(d, cfg.hidden, cfg.glu, cfg.bias)
        return n + pre, n + pre
    if isinstance(cfg, Norm):
        n = norm_params(cfg.type, d)
        return n, n
    if isinstance(cfg, Head):
        n = 0 if m.tie_embeddings else m.vocab_size * d
        n += m.vocab_size if cfg.bias else 0
        return n, n
    if isinstance(cfg, MoE):
        e = cfg.experts
        per = expert_params(d, e)
        shared = e.shared.count * ffn_params(d, e.shared.hidden, e.glu, e.bias) if e.shared else 0
        router, router_active = router_params(d, cfg)
        return (pre + shared + router + e.count * per,
                pre + shared + router_active + round(cfg.experts_per_token * per))
    raise TypeError(f"unknown layer config {type(cfg).__name__}")  # pragma: no cover


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
