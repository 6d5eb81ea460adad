"""Routing: what a gate decides, and the bookkeeping every gate shares.

A gate sees the tokens of one routing batch, split into G equal routing groups
(GShard's local groups; G = 1 is the whole batch), and returns a ``Routing``:
a flat list of A assignments (token, expert, weight, slot). ``slot`` is the
assignment's position in its expert's buffer (group g owns slots
[g·C, (g+1)·C)), or -1 when it was dropped past capacity. Shapes depend only on
the batch shape, never on the data, so a capacity layer is CUDA-graph capturable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import cpu_gemm


@dataclass
class Routing:
    token: torch.Tensor  # [A] int64: index of the token in the routing batch
    expert: torch.Tensor  # [A] int64: global expert id
    weight: torch.Tensor  # [A] float: gate weight (0 where dropped)
    slot: torch.Tensor  # [A] int64: position in the expert's buffer, -1 = dropped
    num_tokens: int  # S, tokens in the routing batch
    num_experts: int  # E
    capacity: Optional[int]  # slots per expert buffer over all G routing groups (G·C), None = dropless
    aux_loss: torch.Tensor  # scalar: the weighted sum of this layer's auxiliary losses
    losses: dict = field(default_factory=dict)  # name -> unweighted value (detached), for logging
    expert_load: Optional[torch.Tensor] = None  # [E] assignments the router chose per expert (before drops)
    dropped: Optional[torch.Tensor] = None  # scalar int64: assignments dropped past capacity
    all_kept: bool = False  # known without looking: every assignment has a slot (dropless, all routed)
    kept_counts: Optional[torch.Tensor] = None  # [E] int64 kept assignments per expert, if the gate counted them
    routed: Optional[torch.Tensor] = None  # [A] bool: the router chose this assignment (None: all were chosen)
    # [A] bool: the assignment is a token that counts (None: every token does); one that does not
    # (an image that only fills a held-out batch) is never routed, dropped, or counted
    real: Optional[torch.Tensor] = None
    # [S] per token, the sum of the weights of its dropped assignments, which the layer adds times
    # the token's input (``dropped_tokens: scaled_input``; None: a dropped assignment adds 0)
    passthrough: Optional[torch.Tensor] = None

    def assignments(self):
        """The assignments the router made for tokens that count: A, or a 0-dim tensor."""
        return self.token.numel() if self.real is None else self.real.sum()

    @property
    def kept(self) -> torch.Tensor:
        return self.slot >= 0

    def tokens_per_expert(self) -> torch.Tensor:
        """[E] assignments each expert computes (after drops)."""
        if self.kept_counts is not None:
            return self.kept_counts
        return counts(self.expert, self.num_experts, None if self.all_kept else self.kept)

    def localize(self, start: int, count: int) -> "Routing":
        """The assignments of tokens [start, start + count) of the batch, re-indexed from 0
        (a rank's share of a batch routed as a whole)."""
        mine = (self.token >= start) & (self.token < start + count)
        expert, slot = self.expert[mine], self.slot[mine]
        routed = None if self.routed is None else self.routed[mine]
        real = None if self.real is None else self.real[mine]
        # the share's own load and drops: summed over the ranks' shares they are the batch's
        dropped = (slot < 0) if routed is None else routed & (slot < 0)
        return Routing(token=self.token[mine] - start, expert=expert, weight=self.weight[mine],
                       slot=slot, num_tokens=count, num_experts=self.num_experts,
                       capacity=self.capacity, aux_loss=self.aux_loss, losses=self.losses,
                       expert_load=counts(expert, self.num_experts, routed).float(), dropped=dropped.sum(),
                       all_kept=self.all_kept, routed=routed, real=real,
                       passthrough=None if self.passthrough is None else self.passthrough[start:start + count])


def counts(index: torch.Tensor, n: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ``index`` (where ``mask``): a bincount of fixed length,
    without the host sync bincount needs to size its output (so CUDA graphs can capture it)."""
    if mask is None and index.device.type == "cpu":  # nothing to sync on a CPU: one op (a decode step's ~5)
        return torch.bincount(index.reshape(-1), minlength=n)
    ones = torch.ones_like(index) if mask is None else mask.to(index.dtype)
    return torch.zeros(n, dtype=index.dtype, device=index.device).scatter_add_(0, index.reshape(-1), ones.reshape(-1))


def bucket_positions(bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """For a sequence of bucket ids (in priority order), each element's position among the
    earlier elements of its bucket: a stable sort, no one-hot [A, E] tensor.
    Elements with bucket == num_buckets (a trash bucket) get positions too; callers ignore them."""
    n = bucket.numel()
    order = torch.sort(bucket, stable=True).indices
    sizes = counts(bucket, num_buckets + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    pos_sorted = torch.arange(n, device=bucket.device) - starts[bucket[order]]
    return torch.empty_like(bucket).scatter_(0, order, pos_sorted)


def assign_slots(expert: torch.Tensor, routed: Optional[torch.Tensor], num_experts: int,
                 capacity: Optional[int], priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Slots for top-k style choices ``expert [G, S, k]``.

    Priority order is k-major (every first choice before any second choice, GShard), and
    within one k the token order, or descending ``priority [G, S]`` (V-MoE's batch
    prioritized routing). Assignments not ``routed`` take no slot. Returns slot [G, S, k]:
    g·C + position within (group, expert), or -1 when past the capacity C (or not routed).
    Dropless (capacity None): every routed assignment gets slot 0.
    """
    if capacity is not None and priority is None and cpu_gemm.slots_usable(expert, routed):
        return cpu_gemm.assign_slots(expert, routed, num_experts, capacity)  # the same, in one pass
    return assign_slots_torch(expert, routed, num_experts, capacity, priority)


def assign_slots_torch(expert: torch.Tensor, routed: Optional[torch.Tensor], num_experts: int,
                       capacity: Optional[int], priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """assign_slots in torch ops: any device, any priority; no host sync (CUDA-graph capturable)."""
    G, S, k = expert.shape
    routed = torch.ones_like(expert, dtype=torch.bool) if routed is None else routed
    if capacity is None:
        return torch.where(routed, torch.zeros_like(expert), torch.full_like(expert, -1))
    if priority is None:
        tok = torch.arange(S, device=expert.device).expand(G, S)
    else:
        tok = torch.sort(-priority, dim=1, stable=True).indices  # [G, S] tokens, highest first
    e = expert.gather(1, tok[..., None].expand(G, S, k))
    r = routed.gather(1, tok[..., None].expand(G, S, k))
    trash = G * num_experts
    bucket = torch.where(r, e + num_experts * torch.arange(G, device=e.device)[:, None, None],
                         torch.full_like(e, trash))
    seq = bucket.transpose(1, 2).reshape(-1)  # [G, k, S] flattened: k-major within each group
    pos = bucket_positions(seq, trash).view(G, k, S).transpose(1, 2)  # back to [G, S(sorted), k]
    g_off = capacity * torch.arange(G, device=e.device)[:, None, None]
    slot_sorted = torch.where(r & (pos < capacity), pos + g_off, torch.full_like(pos, -1))
    return torch.empty_like(slot_sorted).scatter_(1, tok[..., None].expand(G, S, k), slot_sorted)


# ----------------------------------------------------------------------------- group-limited choice

def group_limited_top(v: torch.Tensor, k: int, groups: int, top: int) -> torch.Tensor:
    """Indices of the top k of ``v`` [..., E] among the experts of the ``top`` best of ``groups``
    equal groups of consecutive ids, a group's score being the sum of its two largest values
    (transformers' modeling_deepseek_v3.py, DeepseekV3TopkRouter: ``n_group``, ``topk_group``).

    Shapes: E experts in N = groups groups of g = E / N; k' = top groups kept.
    """
    *lead, E = v.shape
    N = groups
    by_group = v.reshape(*lead, N, E // N)  # [..., N, g]
    group_score = by_group.topk(2, dim=-1).values.sum(dim=-1)  # [..., N]
    kept = torch.topk(group_score, top, dim=-1).indices  # [..., k']
    eligible = torch.zeros_like(group_score, dtype=torch.bool).scatter(-1, kept, True)  # [..., N]
    masked = by_group.masked_fill(~eligible[..., None], float("-inf")).reshape(*lead, E)  # [..., E]
    return torch.topk(masked, k, dim=-1).indices  # [..., k]


# ----------------------------------------------------------------------------- losses

def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over the last dim: var / mean² (population variance,
    as Shazeer's implementation); 0 for a single value."""
    if x.shape[-1] <= 1:
        return x.new_zeros(x.shape[:-1])
    x = x.float()
    return x.var(dim=-1, unbiased=False) / (x.mean(dim=-1) ** 2 + eps)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (1/S) Σ_x (logsumexp_i h_i(x))², averaged over all leading dims."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def balance_loss(probs: torch.Tensor, expert: torch.Tensor, routed: Optional[torch.Tensor]) -> torch.Tensor:
    """E · Σ_i f_i · P_i per group, averaged over groups.

    probs [G, S, E]: the router's probabilities; P_i = their mean over the group.
    expert [G, S, k']: the choices f counts; f_i = the fraction of those choices that are i
    (Switch: k' = 1 the argmax; GShard: the first choice; top-k: all k choices). A uniform
    router gives 1 at every k.
    """
    G, S, E = probs.shape
    onehot_counts = torch.zeros(G, E, device=probs.device, dtype=torch.float32)
    ones = torch.ones_like(expert, dtype=torch.float32) if routed is None else routed.float()
    onehot_counts.scatter_add_(1, expert.reshape(G, -1), ones.reshape(G, -1))
    f = onehot_counts / ones.reshape(G, -1).sum(dim=1, keepdim=True).clamp(min=1)
    P = probs.float().mean(dim=1)
    return (E * (f * P).sum(dim=-1)).mean()


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def load_estimate(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer's smooth load estimator P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / std_i)
    for logits [..., E]. kth_excluding(H, k, i) is the (k+1)-th largest of H when H_i is in
    the top k, else the k-th largest. Returns P [..., E]."""
    E = clean.shape[-1]
    if k >= E:  # every expert is chosen: the probability is 1
        return torch.ones_like(clean)
    top = torch.topk(noisy, k + 1, dim=-1).values
    thr_in = top[..., k:k + 1]  # (k+1)-th largest: the k-th largest of the others when i is in
    thr_out = top[..., k - 1:k]  # k-th largest: the k-th largest of the others when i is out
    is_in = noisy > thr_in
    return torch.where(is_in, normal_cdf((clean - thr_in) / noise_std), normal_cdf((clean - thr_out) / noise_std))
