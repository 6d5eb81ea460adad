"""The data movement of an MoE layer split into chunks, as plain functions the graph of the
overlap pass calls (``passes.overlap``). The routing is computed once over all tokens; only
what follows it is split, so the chunks together compute what one chunk computes.

- capacity layout: chunk j is a range of slots of every expert's buffer,
  [E, G·C, d] -> [E, C_j, d] with Σ_j C_j = G·C (Tutel's split of the capacity dimension,
  Hwang et al. 2023). A slot belongs to one chunk, so every kept assignment is computed
  once, in the chunk that holds its slot, and every dropped one in none: which tokens are
  kept or dropped never changes. The combine of each chunk is a partial sum [S, d] over the
  assignments whose slots it holds; the layer's output is their sum.
- packed layout: chunk j is a range of tokens [lo_j, hi_j) (all of a token's assignments in
  one chunk); its combine is those tokens' rows [hi_j - lo_j, d]; the layer's output is
  their concatenation.

Ranges are as even as they can be: the first ``n mod D`` chunks have one more.
"""
from __future__ import annotations

import torch

from moedsl.nn.routing import Routing


def chunk_range(n: int, j: int, chunks: int) -> tuple[int, int]:
    """[lo, hi) of chunk ``j`` of ``chunks`` over ``n`` items."""
    base, extra = divmod(n, chunks)
    lo = j * base + min(j, extra)
    return lo, lo + base + (1 if j < extra else 0)


# ----------------------------------------------------------------------------- capacity: slot ranges

def _chunk_row(r: Routing, lo: int, hi: int) -> torch.Tensor:
    """Row of each assignment in chunk [lo, hi)'s buffer [E·(hi-lo) + 1, d]: expert·(hi-lo) + slot - lo
    for the kept assignments whose slot is in the range, the last (zero) row for the rest."""
    E, c = r.num_experts, hi - lo
    inside = (r.slot >= lo) & (r.slot < hi)
    return torch.where(inside, r.expert * c + (r.slot - lo), torch.full_like(r.slot, E * c))


def dispatch_chunk(x: torch.Tensor, r: Routing, j: int, chunks: int) -> torch.Tensor:
    """x [S, d] -> chunk j of the capacity buffer, [E, C_j, d] (slots [lo, hi) of each expert;
    empty slots zero): ``moe_ops.dispatch(x, r)[:, lo:hi]`` without building the rest."""
    lo, hi = chunk_range(r.capacity, j, chunks)
    E, c, d = r.num_experts, hi - lo, x.shape[-1]
    filler = torch.full((E * c + 1,), r.num_tokens, dtype=torch.int64, device=x.device)
    filler = filler.scatter(0, _chunk_row(r, lo, hi), r.token)[: E * c]
    padded = torch.cat([x, x.new_zeros(1, d)])
    return padded.index_select(0, filler).view(E, c, d)


def combine_chunk(y: torch.Tensor, r: Routing, j: int, chunks: int) -> torch.Tensor:
    """Expert outputs of chunk j [E, C_j, d] -> [S, d]: Σ over the assignments whose slots the
    chunk holds of weight · output (the others read the zero row)."""
    lo, hi = chunk_range(r.capacity, j, chunks)
    E, c, d = y.shape
    rows = torch.cat([y.reshape(E * c, d), y.new_zeros(1, d)]).index_select(0, _chunk_row(r, lo, hi))
    contrib = rows * r.weight.to(rows.dtype)[:, None]
    return y.new_zeros(r.num_tokens, d).index_add(0, r.token, contrib)


def sum_chunks(parts: tuple) -> torch.Tensor:
    """The capacity layer's output: the chunks' partial sums [S, d], added in chunk order."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# ----------------------------------------------------------------------------- packed: token ranges

def tokens_chunk(x: torch.Tensor, j: int, chunks: int) -> torch.Tensor:
    """x [S, d] -> tokens [lo, hi) of chunk j (a view)."""
    lo, hi = chunk_range(x.shape[0], j, chunks)
    return x[lo:hi]


def routing_chunk(r: Routing, j: int, chunks: int) -> Routing:
    """The assignments of chunk j's tokens [lo, hi), re-indexed from 0, with the slots, weights and
    drops the whole routing gave them (nothing is routed again)."""
    lo, hi = chunk_range(r.num_tokens, j, chunks)
    mine = (r.token >= lo) & (r.token < hi)
    return Routing(token=r.token[mine] - lo, expert=r.expert[mine], weight=r.weight[mine], slot=r.slot[mine],
                   num_tokens=hi - lo, num_experts=r.num_experts, capacity=r.capacity, aux_loss=r.aux_loss,
                   losses=r.losses, all_kept=r.all_kept,
                   routed=None if r.routed is None else r.routed[mine])


def assignments_chunk(t: torch.Tensor, r: Routing, j: int, chunks: int) -> torch.Tensor:
    """A per-assignment tensor [A] of the whole routing -> chunk j's share, in ``routing_chunk``'s
    order (a source's positions among its rows of an expert stay those of all its tokens)."""
    lo, hi = chunk_range(r.num_tokens, j, chunks)
    return t[(r.token >= lo) & (r.token < hi)]


def cat_chunks(parts: tuple) -> torch.Tensor:
    """The packed layer's output: the chunks' tokens [hi_j - lo_j, d], concatenated -> [S, d]."""
    return torch.cat(parts)
