"""``embedding``: the token embedding (model.input: tokens), optionally with learned absolute
positions (Vaswani et al. 2017, §3.5's learned variant) or its fixed sinusoids (§3.5, in
tensor2tensor's layout: fairseq, M2M100, NLLB), numbered from 0 or as fairseq's make_positions
(``pad_id``), and optionally scaled (``scale``: NLLB-MoE's sqrt(d_model))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("embedding")


@dataclass(frozen=True)
class Embedding:
    positions: str = _D["positions"]  # none | learned | sinusoidal
    pad_id: Optional[int] = _D["pad_id"]  # sinusoidal: fairseq's numbering around this pad id (None: 0, 1, ...)
    scale: float = _D["scale"]  # the token embedding × scale (NLLB-MoE: sqrt(d_model))
    # the token table's init std (None: model.init_std). T5 and Switch draw it from N(0, 1): the
    # embedding then dominates the residual stream at init, so tokens route apart (with 0.02, the
    # bidirectional attention's row means dominate instead and most tokens pick the same experts)
    init_std: Optional[float] = None


class EmbeddingKind(LayerKind):
    name = "embedding"
    config = Embedding
    place = "first"
    needs_tokens = True

    def module(self, cfg: Embedding, model):
        from moedsl.nn.layers import Embedding as Module

        return Module(model.vocab_size, model.d_model, model.max_seq_len, cfg.positions, model.init_std,
                      pad_id=cfg.pad_id, scale=cfg.scale, token_std=cfg.init_std)

    def parameters(self, cfg, model) -> tuple[int, int]:
        n = super().parameters(cfg, model)[0]
        return n, n  # counted whole, as the papers count "active" (Mixtral: 13B of 47B)

    def flops(self, cfg, model, seq: int) -> float:
        return 0.0  # a lookup

    def target(self, layer) -> str:
        return "embedding"

    def shared(self, layer, model) -> dict:
        """An encoder-decoder's two stacks embed with one table (T5's and NLLB's ``shared``)."""
        return {"embedding": layer.config}

    # the initialisation: a resume or --init replaces it
    training_only = LayerKind.training_only | {"init_std"}

    def lower(self, ctx, layer, x):
        target = ctx.module("embedding", lambda: self.module(layer.config, ctx.model))
        learned = layer.config.positions != "none"  # learned or sinusoidal: each token's position
        if ctx.decode and learned:
            args = (x, ctx.positions)
        elif ctx.documents is not None and learned:  # packed rows: each document's positions from 0
            args = (x, ctx.document_positions())
        else:
            args = (x,)
        return ctx.call_module(target, args, f"{layer.stack}_embedding" if layer.stack else "embedding")


register(EmbeddingKind())
