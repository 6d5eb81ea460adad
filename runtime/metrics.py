"""The figures of the steps since the last logging step, over all ranks, in one collective and
one read to the host: each step's losses (means over ranks), gradient norm and whether it was
skipped; the logging step's expert load of every MoE layer and the fraction of assignments
dropped (sums over ranks).

Between logging steps nothing is read back: ``step_figures`` keeps a step's four numbers on
the device (a copy: a replayed CUDA graph overwrites its outputs), and ``reduce_step`` reads
them all at the logging step, so a non-finite loss is still found at its own step."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from moedsl.compiler.collectives import Traffic


@dataclass
class StepFigures:
    """One step's figures."""

    loss: float  # task loss, mean over ranks (ranks hold equal shares of the batch)
    aux_loss: float
    grad_norm: float  # global (the same on every rank)
    skipped: bool  # the update was skipped (a non-finite gradient)


@dataclass
class StepMetrics:
    loss: float  # the logging step's figures, as in ``steps[-1]``
    aux_loss: float
    grad_norm: float
    skipped: bool
    balance: float  # mean over MoE layers of max / mean expert load (1 = even)
    dropped: float  # assignments dropped past capacity / assignments made, over all layers and ranks
    expert_load: dict  # layer -> share of the layer's computed assignments per expert
    steps: list  # StepFigures of every step since the last logging step, this one last
    balancedness: dict = field(default_factory=dict)  # layer -> mean / max tokens per EP rank (1 = even)


def step_figures(outputs) -> torch.Tensor:
    """[4] on the device: this rank's loss and aux loss, the global norm, skipped (no host sync)."""
    return torch.stack([outputs.loss.float(), outputs.aux_loss.float(), outputs.grad_norm.float(),
                        outputs.skipped.float()])


def rank_tokens(stats, placements: dict, ep_rank: int) -> list:
    """Per MoE layer, the assignments this rank's tokens send to each EP rank [EP]: each expert's
    computed assignments go to the copies dispatch picks for this source (``targets``), split
    by position (the first n mod copies one more): what the experts count, exactly, where a
    source's kept rows of an expert fill positions 0..n-1 (packed rows; a capacity block of one
    routing group)."""
    out = []
    for s in stats:
        lp = placements.get(s.layer)
        if lp is None or s.tokens_per_expert.numel() != len(lp.hosts):
            continue
        tokens = s.tokens_per_expert.float()
        expert, copy, copies, to = (torch.tensor(t, device=tokens.device) for t in _destinations(lp, ep_rank))
        n = tokens.index_select(0, expert)
        share = torch.div(n + copies - 1 - copy, copies, rounding_mode="floor")  # positions ≡ copy (mod copies)
        out.append((s.layer, tokens.new_zeros(lp.ep).index_add_(0, to, share)))
    return out


@functools.lru_cache(maxsize=256)
def _destinations(lp, ep_rank: int) -> tuple:
    """(expert, copy index, copies, EP rank) of every copy this source sends rows of an expert to."""
    rows = [(e, c, len(t), r) for e in range(len(lp.hosts)) for t in (lp.targets(e, ep_rank),)
            for c, r in enumerate(t)]
    return tuple(tuple(col) for col in zip(*rows))


def reduce_step(outputs, world: int, history: Optional[list] = None, placements: Optional[dict] = None,
                ep_rank: int = 0) -> StepMetrics:
    """Read ``outputs`` (the logging step's ``StepOutputs``) and ``history`` (``step_figures`` of
    the steps since the last logging step, this one included; default: this step alone) back to
    the host, summed over ``world`` ranks where ranks differ. With ``placements`` (layer ->
    LayerPlacement; this rank is ``ep_rank`` of its EP group), the balancedness of each MoE
    layer: the mean over the max of the tokens each EP rank's experts computed (summed over the
    data-parallel groups; 1 = even, 1/EP = one rank does all).

    Each rank's router statistics count its own tokens' assignments (a layer routed over the
    gathered batch reports this rank's share), so sums over ranks are the batch's figures."""
    stats = outputs.router_stats
    dev = outputs.loss.device
    rows = torch.stack(history if history else [step_figures(outputs)]).to(dev)  # [steps, 4]
    head = [s.dropped.to(dev).float().reshape(1) for s in stats]
    head += [torch.tensor([float(s.assignments)], device=dev) for s in stats]
    sent = rank_tokens(stats, placements or {}, ep_rank)
    flat = torch.cat([rows[:, :2].reshape(-1)] + head + [s.tokens_per_expert.to(dev).float() for s in stats]
                     + [v.to(dev) for _, v in sent])
    if world > 1:
        with Traffic.waiting("other"):
            dist.all_reduce(flat)
    # the norm and skipped are the same on every rank: read as they are, not summed and divided
    host = torch.cat([flat, rows[:, 2:].reshape(-1)]).cpu()  # on a GPU: the host waits for the steps here
    n_steps, n = rows.shape[0], len(stats)
    per_rank, local = host[:2 * n_steps].view(n_steps, 2), host[flat.numel():].view(n_steps, 2)
    steps = [StepFigures(loss=float(per_rank[i, 0]) / world, aux_loss=float(per_rank[i, 1]) / world,
                         grad_norm=float(local[i, 0]), skipped=bool(local[i, 1])) for i in range(n_steps)]
    at = 2 * n_steps
    dropped, assigned = host[at:at + n].sum(), host[at + n:at + 2 * n].sum()
    loads, offset, balances = {}, at + 2 * n, []
    for s in stats:
        row = host[offset:offset + s.tokens_per_expert.numel()]
        offset += row.numel()
        loads[s.layer] = (row / row.sum().clamp(min=1)).tolist()
        balances.append(float(row.max() / row.mean().clamp(min=1e-9)))
    balancedness = {}
    for layer, v in sent:
        per_rank = host[offset:offset + v.numel()]
        offset += v.numel()
        balancedness[layer] = float(per_rank.mean() / per_rank.max()) if per_rank.max() > 0 else 1.0
    last = steps[-1]
    return StepMetrics(loss=last.loss, aux_loss=last.aux_loss, grad_norm=last.grad_norm, skipped=last.skipped,
                       balance=sum(balances) / len(balances) if balances else 1.0,
                       dropped=float(dropped / assigned.clamp(min=1)) if n else 0.0, expert_load=loads, steps=steps,
                       balancedness=balancedness)
