"""Packed documents (``--pack documents``): a row of T tokens holds several documents, and each
token attends only to earlier tokens of its own document, at a position counted from its
document's start, so the row computes what each document computes alone.

A batch's ``documents`` [B, T] (each token's document within its row, numbered from 0) becomes,
once per forward and shared by every layer (two nodes of the graph, ``compiler/lower.py``):

- ``document_positions``: [B, T], each token's index within its document (rotary angles and
  learned position embeddings);
- ``document_mask``: where query i may see key j, i.e. j <= i in the same document, as a
  boolean [B, 1, T, T] (for ``scaled_dot_product_attention``) or, where FlexAttention runs
  fused (``use_flex``), a ``BlockMask`` whose fully masked blocks are skipped (Dong et al.
  2024, "Flex Attention: A Programming Model for Generating Optimized Attention Kernels";
  PyTorch's FlexAttention post, "Document Masking/Jagged Sequences").

A recurrent layer takes ``documents`` itself (its kind's ``document_kwargs``): its state starts
from zero at each document.

A document is a run of equal values: [0, 0, 1, 1, 1, 2] is three documents. Both nodes are None
when ``documents`` is (every row one sequence: the layers keep ``is_causal`` and 0..T-1).
Every query sees at least itself (the diagonal is in every mask), so no softmax row is empty.

Shape legend: B batch, H heads, T sequence, D query/key width, Dv value width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

# FlexAttention where it runs fused with a backward: on CUDA, compiled. On a CPU torch 2.13's
# flex_attention has no backward ("FlexAttention does not support backward on CPU") and, uncompiled,
# materialises the scores (its forward 10x slower than SDPA's with a boolean mask at B 8, H 4, T 256,
# measured here); there the boolean mask is used. None: that rule; True / False force one path (tests compare them).
FLEX: Optional[bool] = None


def use_flex(device: torch.device) -> bool:
    return FLEX if FLEX is not None else torch.device(device).type == "cuda"


def _runs(documents: torch.Tensor) -> tuple:
    """(run ids [B, T] counted from 0, each token's run start [B, T]) of ``documents`` [B, T]."""
    T = documents.shape[-1]
    starts = torch.cat([torch.ones_like(documents[:, :1], dtype=torch.bool),
                        documents[:, 1:] != documents[:, :-1]], dim=1)  # [B, T]: a token that begins a document
    index = torch.arange(T, device=documents.device).expand_as(documents)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values  # [B, T]
    return starts.long().cumsum(-1) - 1, first


def document_positions(documents: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Each token's position within its document, [B, T] int64 (None without documents)."""
    if documents is None:
        return None
    T = documents.shape[-1]
    return torch.arange(T, device=documents.device) - _runs(documents)[1]


def _mask_mod(run: torch.Tensor):
    """FlexAttention's mask_mod of ``run`` [B, T]: key k is before or at query q, in its document."""
    def same_document_causal(b, h, q, k):
        return (k <= q) & (run[b, q] == run[b, k])
    return same_document_causal


def document_mask(documents: Optional[torch.Tensor]):
    """Where each query may look (causal, same document): a ``BlockMask`` where ``use_flex``, else
    [B, 1, T, T] bool; None without documents."""
    if documents is None:
        return None
    B, T = documents.shape
    run = _runs(documents)[0]  # [B, T]
    if use_flex(documents.device):
        return create_block_mask(_mask_mod(run), B, None, T, T, device=documents.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()  # [T, T]
    return (causal & (run[:, :, None] == run[:, None, :]))[:, None]  # [B, 1, T, T]


def _variant(base, causal: bool, window: Optional[int]):
    """The mask_mod of ``base`` (causal, same document) for a layer that is not causal (same
    document only: being in one document is symmetric, so base(max, min) says it) or keeps to a
    sliding window of ``window`` keys."""
    def mod(b, h, q, k):
        ok = base(b, h, torch.maximum(q, k), torch.minimum(q, k))
        if causal:
            ok = ok & (k <= q)
        if window is not None:
            ok = ok & (q - k < window)
        return ok
    return mod


# a step's masks for a non-causal or windowed layer, made once for all the layers that share them
# while the step's mask comes back (as moedsl.nn.attention._Rope does for rotary tables)
_derived: list = [None, {}]  # [the step's document_mask, {(causal, window, dense): mask}]


def _derive(base, causal: bool, window: Optional[int], dense: bool):
    """``base`` (``document_mask``'s: causal, same document) for a layer that is causal or not and
    has a sliding window of ``window`` keys or none: a ``BlockMask``, or with ``dense`` [B, 1, T, T]
    bool."""
    global _derived
    if torch.compiler.is_compiling():  # inside inductor's graph: no step cache
        return _make(base, causal, window, dense)
    if _derived[0] is not base:
        _derived = [base, {}]
    key = (causal, window, dense)
    got = _derived[1].get(key)
    if got is None:
        got = _derived[1][key] = _make(base, causal, window, dense)
    return got


def _make(base, causal: bool, window: Optional[int], dense: bool):
    if isinstance(base, BlockMask):
        B, _, T, _ = base.shape
        mod = base.mask_mod if causal and window is None else _variant(base.mask_mod, causal, window)
        device = base.kv_num_blocks.device
        return create_mask(mod, B, 1, T, T, device=device) if dense else \
            create_block_mask(mod, B, None, T, T, device=device)
    mask = base if causal else base | base.transpose(-1, -2)  # same document, either order
    if window is not None:
        T = base.shape[-1]
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=base.device).triu(1 - window)  # j > i - window
    return mask


_compiled_flex = None


def _flex(q, k, v, block: BlockMask, scale, gqa: bool):
    """flex_attention, compiled where it runs on CUDA (uncompiled it is a reference that
    materialises the scores)."""
    global _compiled_flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block, scale=scale, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=block, scale=scale, enable_gqa=gqa)


def attend_in_documents(q, k, v, mask, causal: bool, window: Optional[int], dropout: float,
                        scale: Optional[float] = None, gqa: bool = False) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over k [B, H or K, T, D], v [B, H or K, T, Dv] within
    documents (``mask``: ``document_mask``'s), causal or not, in a sliding window of ``window``
    keys or not. Attention dropout has no FlexAttention form: such a layer takes the boolean mask."""
    flex = isinstance(mask, BlockMask) and dropout == 0.0
    if not (causal and window is None and flex == isinstance(mask, BlockMask)):  # not the step's mask as it is
        mask = _derive(mask, causal, window, dense=not flex)
    if flex:
        return _flex(q, k, v, mask, scale, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)
