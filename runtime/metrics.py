"""A step's figures over all ranks, in one collective: the losses (means over ranks), the
expert load of every MoE layer and the fraction of assignments dropped (sums over ranks)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepMetrics:
    loss: float  # task loss, mean over ranks (ranks hold equal shares of the batch)
    aux_loss: float
    grad_norm: float
    skipped: bool  # the update was skipped (a non-finite gradient)
    balance: float  # mean over MoE layers of max / mean expert load (1 = even)
    dropped: float  # assignments dropped past capacity / assignments made, over all layers and ranks
    expert_load: dict  # layer -> share of the layer's computed assignments per expert


def reduce_step(outputs, world: int) -> StepMetrics:
    """Read one step's ``StepOutputs`` back to the host, summed over ``world`` ranks.

    Each rank's router statistics count its own tokens' assignments (a layer routed over the
    gathered batch reports this rank's share), so sums over ranks are the batch's figures."""
    stats = outputs.router_stats
    dev = outputs.loss.device
    head = [outputs.loss.float(), outputs.aux_loss.float()]
    head += [s.dropped.to(dev).float() for s in stats]
    head += [torch.tensor(float(s.assignments), device=dev) for s in stats]
    flat = torch.cat([torch.stack(head)] + [s.tokens_per_expert.to(dev).float() for s in stats])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    n = len(stats)
    loss, aux = float(flat[0]) / world, float(flat[1]) / world
    dropped, assigned = flat[2:2 + n].sum(), flat[2 + n:2 + 2 * n].sum()
    loads, offset, balances = {}, 2 + 2 * n, []
    for s in stats:
        row = flat[offset:offset + s.tokens_per_expert.numel()]
        offset += row.numel()
        loads[s.layer] = (row / row.sum().clamp(min=1)).tolist()
        balances.append(float(row.max() / row.mean().clamp(min=1e-9)))
    return StepMetrics(loss=loss, aux_loss=aux, grad_norm=float(outputs.grad_norm), skipped=bool(outputs.skipped),
                       balance=sum(balances) / len(balances) if balances else 1.0,
                       dropped=float(dropped / assigned.clamp(min=1)) if n else 0.0, expert_load=loads)
