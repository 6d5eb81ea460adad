"""Gradient synchronisation of a compiled model across its mesh.

Every rank back-propagates (its loss) / world. Then:
- a replicated (non-expert) parameter's gradient is summed over all ranks;
- an expert's gradient is summed over the ranks that hold a copy of that expert: its
  replicas inside an EP group (each copy saw a share of the tokens) and its copies in the
  other EP groups (expert data parallelism); an expert held once gets no collective.
Gradients are flattened into one buffer per group of ranks, so each group costs one
all-reduce.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist


class GradSync:
    def __init__(self, model, mesh, rank: int):
        self.world = mesh.world
        P, D = mesh.expert_parallel, mesh.data_parallel
        ep_rank = rank % P
        compiled = model.compiled
        self.shared = [p for n, p in model.named_parameters() if ".experts." not in n and p.requires_grad]
        # for the global gradient norm: each distinct expert counted once, however many hold it
        self.experts = []  # (param, [E_local] 1 / holders)
        # experts: (param, slot) grouped by the ranks holding that slot's expert
        by_holders: dict = defaultdict(list)
        for name, mod in model.named_modules():
            if not name.endswith(".experts"):
                continue
            lp = compiled.placements[name.rsplit(".", 1)[0]]
            share = torch.tensor([1.0 / (D * len(lp.hosts[e])) for e in lp.slots[ep_rank]])
            for p in mod.parameters(recurse=False):
                self.experts.append((p, share.to(p.device)))
            for slot, e in enumerate(lp.slots[ep_rank]):
                holders = tuple(sorted(i * P + h for i in range(D) for h in lp.hosts[e]))
                if len(holders) > 1:
                    for p in mod.parameters(recurse=False):
                        by_holders[holders].append((p, slot))
        self.expert_groups = []
        for holders in sorted(by_holders):  # every rank creates every group, in the same order
            self.expert_groups.append((holders, by_holders[holders]))
        self._pg = {}
        if dist.is_initialized() and self.world > 1:
            all_sets = self._all_holder_sets(model, mesh)
            for holders in all_sets:
                self._pg[holders] = dist.new_group(list(holders))

    @staticmethod
    def _all_holder_sets(model, mesh) -> list:
        """Every rank's holder sets (the same list on all ranks): groups must be made collectively."""
        P, D = mesh.expert_parallel, mesh.data_parallel
        sets = set()
        for lp in model.compiled.placements.values():
            for hosts in lp.hosts:
                holders = tuple(sorted(i * P + h for i in range(D) for h in hosts))
                if len(holders) > 1:
                    sets.add(holders)
        return sorted(sets)

    @torch.no_grad()
    def __call__(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.shared]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            self._unflatten(flat, self.shared)
        for holders, items in self.expert_groups:
            parts = [p.grad[slot].reshape(-1) if p.grad is not None else torch.zeros_like(p[slot]).reshape(-1)
                     for p, slot in items]
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=self._pg[holders])
            offset = 0
            for p, slot in items:
                n = p[slot].numel()
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad[slot].copy_(flat[offset:offset + n].view_as(p[slot]))
                offset += n

    @staticmethod
    def _unflatten(flat: torch.Tensor, params: list) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def clip(self, max_norm: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clip by the global gradient norm, the norm of the single-process model's gradient:
        replicated parameters once, every expert once. Returns the norm before clipping.
        ``inv_scale``: the gradients hold (loss · S)'s gradient; they are divided by S here and
        the norm is that of the unscaled gradient. A non-finite norm zeroes every gradient (the
        same on every rank), so a NaN never reaches the weights."""
        dev = self.shared[0].device if self.shared else self.experts[0][0].device
        sq = torch.zeros((), dtype=torch.float32, device=dev)
        for p in self.shared:
            if p.grad is not None:
                sq = sq + p.grad.float().pow(2).sum()
        ex = torch.zeros((), dtype=torch.float32, device=dev)
        for p, share in self.experts:
            if p.grad is not None:
                ex = ex + (p.grad.float().pow(2).flatten(1).sum(1) * share).sum()
        if self.world > 1:
            dist.all_reduce(ex)
        norm = (sq + ex).sqrt()
        if inv_scale is not None:
            norm = norm * inv_scale
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm and max_norm > 0 else torch.ones_like(norm)
        if inv_scale is not None:
            coef = coef * inv_scale
        coef = torch.where(torch.isfinite(norm), coef, torch.zeros_like(coef))
        for p in self.shared + [p for p, _ in self.experts]:
            if p.grad is not None:  # NaN · 0 is NaN: nan_to_num makes the zeroing stick
                p.grad.mul_(coef).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return norm
