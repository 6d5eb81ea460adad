"""The MoE layer's data movement, as plain functions the compiled graph calls.

Two layouts:
- capacity: ``dispatch`` packs the kept assignments into a buffer [E, C, d] by slot
  (static shape: CUDA-graph capturable); ``combine`` weights the expert outputs and
  scatter-adds them back to their tokens. A dropped assignment reads a zero row and has
  weight 0, so it contributes exactly 0.
- packed (dropless, or routing over a batch spread across ranks): ``dispatch_packed``
  sorts the kept assignments by destination slot into rows [N, d] with ``sizes`` per slot;
  ``combine_packed`` undoes it. Shapes depend on the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_gemm
from .routing import Routing, bucket_positions, counts


def _flat_slot(r: Routing) -> torch.Tensor:
    """Row of each assignment in the [E·C + 1, d] buffer; dropped ones go to the last (zero) row."""
    E, C = r.num_experts, r.capacity
    return torch.where(r.slot >= 0, r.expert * C + r.slot, torch.full_like(r.slot, E * C))


def dispatch(x: torch.Tensor, r: Routing) -> torch.Tensor:
    """x [S, d] -> capacity buffer [E, C, d] (empty slots are zero)."""
    E, C, d = r.num_experts, r.capacity, x.shape[-1]
    # which token fills each slot (S: a zero row); every kept slot has exactly one token
    filler = torch.full((E * C + 1,), r.num_tokens, dtype=torch.int64, device=x.device)
    filler = filler.scatter(0, _flat_slot(r), r.token)[: E * C]
    padded = torch.cat([x, x.new_zeros(1, d)])
    return padded.index_select(0, filler).view(E, C, d)


def combine(y: torch.Tensor, r: Routing) -> torch.Tensor:
    """Expert outputs [E, C, d] -> [S, d]: Σ over a token's kept assignments of weight · output."""
    E, C, d = y.shape
    rows = torch.cat([y.reshape(E * C, d), y.new_zeros(1, d)]).index_select(0, _flat_slot(r))
    contrib = rows * r.weight.to(rows.dtype)[:, None]
    return y.new_zeros(r.num_tokens, d).index_add(0, r.token, contrib)


@dataclass
class Packed:
    """Kept assignments as rows sorted by destination slot."""

    rows: torch.Tensor  # [N, d]
    sizes: torch.Tensor  # [n_slots] rows per destination slot
    index: torch.Tensor  # [N] which assignment of the Routing each row is


def dispatch_packed(x: torch.Tensor, r: Routing, slot_of_expert: Optional[torch.Tensor] = None,
                    n_slots: Optional[int] = None, slot_of_assignment: Optional[torch.Tensor] = None) -> Packed:
    """x [S, d] -> rows of the kept assignments sorted by destination slot.

    ``slot_of_expert`` [E] maps a global expert to the slot this rank sends it to (ranks'
    slots numbered rank-major), or ``slot_of_assignment`` [A] gives each assignment its slot
    (``replica_slots``); by default slot = expert (one process)."""
    one_process = slot_of_expert is None and slot_of_assignment is None
    if slot_of_assignment is not None:
        dest = slot_of_assignment
    elif slot_of_expert is None:
        dest, n_slots = r.expert, r.num_experts
    else:
        dest = slot_of_expert.to(r.expert.device)[r.expert]
    if r.all_kept:
        sizes = r.kept_counts if one_process and r.kept_counts is not None else counts(dest, n_slots)
        order = torch.sort(dest, stable=True).indices
    elif cpu_gemm.pack_usable(dest, r.slot):  # the masked sort below as one counting sort
        order, sizes = cpu_gemm.pack_order(dest, r.slot, n_slots)
    else:
        key = torch.where(r.slot >= 0, dest, torch.full_like(dest, n_slots))
        sizes = counts(key, n_slots + 1)[:n_slots]
        order = torch.sort(key, stable=True).indices
        order = order[: int(sizes.sum())]  # drop the dropped (a data-dependent length)
    return Packed(rows=x.index_select(0, r.token.index_select(0, order)), sizes=sizes, index=order)


def replica_slots(r: Routing, slots: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """The slot of each assignment [A] under position dispatch: the k-th kept assignment of
    expert e (in assignment order) goes to ``slots[e, k mod copies[e]]`` (``slots`` [E, EP]: the
    copies this source splits e over; ``copies`` [E]: how many), so each copy takes an equal
    share of this source's rows of e, ±1, whatever their number."""
    E = r.num_experts
    key = r.expert if r.all_kept else torch.where(r.kept, r.expert, torch.full_like(r.expert, E))
    k = bucket_positions(key, E)  # position among the kept assignments of its expert
    copies = copies.to(r.expert.device)
    return slots.to(r.expert.device)[r.expert, k % copies[r.expert]]


def combine_packed(y: torch.Tensor, p: Packed, r: Routing) -> torch.Tensor:
    """Expert outputs in packed row order [N, d] -> [S, d]."""
    w = r.weight.index_select(0, p.index).to(y.dtype)
    return weighted_sum(y, w, r.token.index_select(0, p.index), r.num_tokens)


def weighted_sum(y: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out [num_tokens, d] with out[tok[i]] += w[i] · y[i] (w in y's dtype), rows in order."""
    if cpu_gemm.combine_usable(y, w, tok):  # float32 on a CPU: one pass each way
        return cpu_gemm.weighted_scatter(y, w, tok, num_tokens)
    return y.new_zeros(num_tokens, y.shape[-1]).index_add(0, tok, y * w[:, None])


def pass_dropped(y: torch.Tensor, x: torch.Tensor, r: Routing) -> torch.Tensor:
    """y [S, d] the combined expert outputs + each token's dropped weight times its input x [S, d]:
    a dropped token passes as p·x (``dropped_tokens: scaled_input``; transformers'
    SwitchTransformersSparseMLP before dropped tokens were zeroed: ``router_probs * next_states``,
    next_states the input where no expert took the token)."""
    if r.passthrough is None:
        return y
    return y + r.passthrough.to(y.dtype)[:, None] * x.to(y.dtype)


def padding_tokens(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, T] True where a token is not padding (None: none is) -> [B·T] bool, in the order the
    gate sees the tokens (None stays None)."""
    return None if mask is None else mask.to(torch.bool).reshape(-1)


def token_mask(rows: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows that count [B] (None: all) -> the tokens that count [B·T] of x [B, T, d], in the
    order the gate sees them (None: all)."""
    if rows is None:
        return None
    return rows.to(device=x.device, dtype=torch.bool).repeat_interleave(x.shape[1])


@dataclass
class RouterStats:
    """One MoE layer's routing in one forward (on this rank's tokens)."""

    layer: str
    tokens_per_expert: torch.Tensor  # [E] assignments computed (after drops)
    expert_load: torch.Tensor  # [E] assignments the router chose (before drops)
    dropped: torch.Tensor  # scalar: assignments dropped past capacity
    assignments: int  # assignments the router made (for tokens that count: then a 0-dim tensor)
    capacity: Optional[int]  # slots per expert over all routing groups (G · C), None = dropless
    losses: dict  # unweighted auxiliary losses


def router_stats(r: Routing, layer: str) -> RouterStats:
    return RouterStats(layer=layer, tokens_per_expert=r.tokens_per_expert().detach(),
                       expert_load=r.expert_load, dropped=r.dropped, assignments=r.assignments(),
                       capacity=r.capacity, losses=r.losses)


@dataclass
class ModelOutput:
    output: torch.Tensor  # hidden states [B, T, d] or logits [B, T, vocab]
    aux_loss: torch.Tensor  # scalar: every MoE layer's weighted auxiliary losses, summed
    router_stats: list  # [RouterStats] per MoE layer


def model_output(output: torch.Tensor, aux_losses: tuple, stats: tuple) -> ModelOutput:
    aux = output.new_zeros((), dtype=torch.float32)
    for a in aux_losses:
        aux = aux + a
    return ModelOutput(output=output, aux_loss=aux, router_stats=list(stats))
