"""Gates: every router the spec language names, each computing exactly its paper's formulas
(Shazeer et al. 2017 §2.1 and Appendix A-B; GShard, Lepikhin et al. 2020, §2.2 and Algorithm 1;
Switch, Fedus et al. 2021, §2.1-2.2; ST-MoE, Zoph et al. 2022, §3; Expert Choice, Zhou et al.
2022, §3.1; Mixtral, Jiang et al. 2024, §2.1; hash layers, Roller et al. 2021; DeepSeek-V3,
Liu et al. 2024, §2.1.2).

A gate maps the tokens x [S, d] of a routing batch (split into G groups) to a
``Routing``. A router's linear computes in the spec's router dtype (float32: Switch's selective
precision) outside autocast, its softmax or sigmoid in float32 at least. All randomness comes from ``moedsl.nn.rng`` keyed by the
token's index in the global batch (``offset`` + position), so it does not depend on
how the batch is spread over ranks.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import spec as S
from ..dtypes import torch_dtype
from ..kinds.gates import gate_type
from . import rng
from .grouped import grouped_matmul
from .routing import (Routing, assign_slots, balance_loss, bucket_positions, counts, cv_squared, group_limited_top,
                      load_estimate, z_loss)



@dataclass
class Choice:
    """What a top-k style gate chose for the tokens of G groups of n."""

    expert: torch.Tensor  # [G, n, k] int64
    weight: torch.Tensor  # [G, n, k] float
    routed: Optional[torch.Tensor] = None  # [G, n, k] bool: the assignment exists (GShard's random 2nd)
    losses: dict = field(default_factory=dict)  # unweighted, differentiable
    # [G, n, k] the chosen experts' router probabilities before any renormalisation over the k
    # (None: ``weight`` is them): batch prioritized routing ranks a token by their maximum
    prob: Optional[torch.Tensor] = None
    # the weights are divided by their sum over the token's kept choices once the drops are known
    # (fairseq's top2gating with normalize_gate_prob_before_dropping false)
    normalize_kept: bool = False

    def priority(self) -> torch.Tensor:
        """[G, n] V-MoE's priority score (Riquelme et al. 2021, §4.1): max_i g_i(x), the largest
        routing weight of g(x) = TOP_k(softmax(W·x)), i.e. before any renormalisation over the k."""
        return (self.weight if self.prob is None else self.prob).max(dim=-1).values


def top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values over the last dim, largest first (as torch.topk). For
    k <= 2, repeated max is several times faster than topk on a CPU, and it breaks ties the same
    way whatever the number of rows (the lowest index first; torch.topk's order among equal
    values varies with the width: a zero-initialised router ties every expert), so a decode
    step and a full forward choose alike."""
    if k > 2 or k >= v.shape[-1]:
        return torch.topk(v, k, dim=-1).indices
    first = v.argmax(dim=-1, keepdim=True)
    if k == 1:
        return first
    second = v.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
    return torch.cat([first, second], dim=-1)


def normal_init(*shape: int, std: float) -> torch.Tensor:
    """N(0, std²) from the global RNG, on the current default device; on the meta device an empty
    tensor (there is nothing to draw, and drawing there imports torch's tracing machinery: 1.6 s)."""
    if torch.get_default_device().type == "meta":
        return torch.empty(*shape)
    return torch.randn(*shape) * std


@functools.lru_cache(maxsize=64)
def _capacities(gate: S.Gate, n: int, experts: int, training: bool) -> tuple:
    """The capacity of a routing group of m tokens, for m = 0..n."""
    return tuple(gate.capacity(m, experts, training) for m in range(n + 1))


def real_capacity(gate: S.Gate, real: torch.Tensor, experts: int, training: bool) -> torch.Tensor:
    """[G] each routing group's capacity for its tokens that count (``real`` [G, n] bool): the
    spec's C of that many tokens, as if the others were not in the batch. A table lookup: no
    host sync."""
    table = torch.tensor(_capacities(gate, real.shape[1], experts, training), device=real.device)
    return table[real.sum(dim=1)]


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class Gate(nn.Module):
    """Base of the top-k style gates: capacity, drops, losses and statistics are shared."""

    # The part of this rank's batch a training forward routes: (m, M), the m-th of M equal
    # micro-batches (train.micro_batches, runtime/step.py). A token's random draws are keyed by
    # its place in the global batch, and the draws' counter (rng_step) advances once a step, after
    # the last part: a step in micro-batches draws what one batch of M× the size draws.
    share = (0, 1)

    def __init__(self, gate: S.Gate, losses: S.Losses, d_model: int, num_experts: int,
                 router_dtype: str = "float32", seed: int = 0, layer: int = 0):
        super().__init__()
        self.spec, self.loss_weights = gate, losses
        self.d_model, self.num_experts = d_model, num_experts
        self.router_dtype = torch_dtype(router_dtype)
        self.seed, self.layer = seed, layer
        self.register_buffer("rng_step", torch.zeros((), dtype=torch.int64))
        if gate.bias_balancing_rate is not None:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("load_acc", torch.zeros(num_experts))

    def _apply(self, fn, recurse=True):
        """Casting the model (to bfloat16, say) leaves the balancing bias and load in float32:
        rate-sized steps would vanish in 8 mantissa bits (a loaded bias too: DeepSeek-V3's
        ``e_score_correction_bias`` differs between experts by less than a bfloat16 step). It
        leaves the router's own weights in the router dtype where that is wider: ``router_dtype:
        float32`` keeps them float32 (as transformers keeps DeepSeek-V3's router,
        ``_keep_in_fp32_modules_strict``; as the trainer's float32 weights are). Each keeps its
        values from before the cast, not the cast's rounding of them."""
        kept = {n: b for n, b in self._buffers.items()
                if n in ("expert_bias", "load_acc") and b is not None and b.is_floating_point()}
        weights = {n: p.data for n, p in self._parameters.items() if p is not None and p.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype.itemsize < 4:  # cast to 16 bits: the float32 values, moved where the cast put them
                self._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        for name, before in weights.items():
            p = self._parameters[name]
            if p.dtype.itemsize < self.router_dtype.itemsize:
                p.data = before.to(device=p.device, dtype=self.router_dtype)
        return self

    # -- helpers -------------------------------------------------------------------
    def dtype(self, x: torch.Tensor) -> torch.dtype:
        """The router's linear computes in the spec's router dtype, or wider if the model computes
        wider: x's dtype (float64), or under autocast the autocast dtype (x there is the float32
        residual stream's norm: a bfloat16 router dtype trains in bfloat16, as it infers)."""
        device = x.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            return torch.promote_types(self.router_dtype, torch.get_autocast_dtype(device))
        return torch.promote_types(self.router_dtype, x.dtype)

    @staticmethod
    def score_dtype(dt: torch.dtype) -> torch.dtype:
        """The scores (softmax, sigmoid) of logits computed in ``dt``: at least float32."""
        return torch.promote_types(dt, torch.float32)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ in the router dtype, returned widened to float32 for the scores: a 16-bit router
        dtype rounds the logits to 16 bits and the softmax runs in float32, as transformers'
        routers do (MixtralTopKRouter: ``softmax(router_logits.float())``; Qwen2MoeTopKRouter:
        ``softmax(router_logits, dtype=torch.float)``)."""
        dt = self.dtype(x)
        if x.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(x.device.type):
            if x.dtype == dt and weight.dtype == dt:  # nothing to cast (a decode step: each call counts)
                out = F.linear(x, weight)
            else:
                out = F.linear(x.to(dt), weight.to(dt))  # no autocast to leave (a decode step: ~5 us saved)
        else:
            with _no_autocast(x.device):
                out = F.linear(x.to(dt), weight.to(dt))
        return out.to(self.score_dtype(dt))

    def token_keys(self, rank: int, Sn: int, device) -> torch.Tensor:
        """[Sn] the keys of the random draws of the Sn tokens routed here, the rank-th of equal
        shares of the global batch (of the micro-batch ``share``): their places in that batch."""
        m, M = self.share
        return (rank * M + m) * Sn + torch.arange(Sn, device=device)

    def advance(self) -> None:
        """A training forward's draws are made: the next step draws afresh (after the last part
        of a step in micro-batches)."""
        if self.training and self.share[0] == self.share[1] - 1:
            self.rng_step += 1

    def stream(self, purpose: str) -> torch.Tensor:
        return (self.rng_step * 0x9E3779B1 + rng.stream_id(self.layer, purpose)) & 0xFFFFFFFF

    def jitter(self, x: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
        """Switch's router jitter: x · U(1 − ε, 1 + ε), training only."""
        eps = self.spec.jitter
        if not (self.training and eps > 0):
            return x
        d = x.shape[-1]
        idx = gidx[..., None] * d + torch.arange(d, device=x.device)
        u = rng.uniform(self.seed, self.stream("jitter"), idx)
        return x * (1 - eps + 2 * eps * u).to(x.dtype)

    def select(self, scores: torch.Tensor, k: int, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Indices of the top k of scores (+ the balancing bias, which only chooses). Without a bias,
        the top k of the logits when given: the same choice for a monotone score, without the ties
        of scores that saturate (a sigmoid rounds to 1.0 above ~17). With expert groups, the top k
        of the groups chosen by their two best scores (+ bias): scores, not logits, since a sum of
        two is not monotone in the logits."""
        biased = self.spec.bias_balancing_rate is not None
        groups = getattr(self.spec, "groups", None)  # an option of topk's (its Options)
        if groups is not None:
            v = scores + self.expert_bias if biased else scores
            return group_limited_top(v, k, groups.count, groups.top)
        v = scores + self.expert_bias if biased else (scores if logits is None else logits)
        return top_indices(v, k)

    def importance(self, weight: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """CV² of Importance = Σ_x G(x) per group (G(x) zero off the chosen experts)."""
        G = weight.shape[0]
        imp = torch.zeros(G, self.num_experts, device=weight.device, dtype=torch.float32)
        imp = imp.scatter_add(1, expert.reshape(G, -1), weight.reshape(G, -1).float())
        return cv_squared(imp).mean()

    # -- forward -------------------------------------------------------------------
    def choose(self, x: torch.Tensor, ids: Optional[torch.Tensor], gidx: torch.Tensor) -> Choice:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None, rank: int = 0,
                groups: int = 1, gidx: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, padding: Optional[torch.Tensor] = None) -> Routing:
        """Route the S tokens of ``x`` [S, d] in ``groups`` groups. ``rank``: this batch is the
        rank-th of equal shares of the global batch (its tokens start at rank · S there).
        ``gidx`` [S]: each token's key for the routing's random draws instead (a decode graph's:
        from its row and position, the same whichever step decodes it). ``mask`` [S] bool: the
        tokens that count (None: all); the others (images that only fill a held-out batch) are
        routed nowhere: no slot, no drop, no load, and a group's capacity is that of its tokens
        that count, as if the others were not in the batch. (The auxiliary losses still see every
        token: a batch with such rows is evaluated, and evaluation reports no auxiliary loss.)
        ``padding`` [S] bool: the tokens that are not padding (None: all), for ``route_padding:
        false``: padding takes no expert and no slot, and unlike ``mask`` the group's capacity
        still counts it (fairseq's top2gating ``input_mask``; transformers' NllbMoeTop2Router
        computes its capacity from every token and zeroes the padding's masks before the cumsum).

        ``dropped_tokens: scaled_input``: ``Routing.passthrough`` [S] is the sum of each token's
        dropped weights, which ``moe_ops.pass_dropped`` adds times its input."""
        Sn, d = x.shape
        G, n = groups, Sn // groups
        E = self.num_experts
        gidx = (self.token_keys(rank, Sn, x.device) if gidx is None else gidx).view(G, n)
        ids = token_ids.reshape(G, n) if token_ids is not None else None
        choice = self.choose(x.reshape(G, n, d), ids, gidx)
        k = choice.expert.shape[-1]
        if gate_type(self.spec.type).dense:
            cap = n  # dense: every expert takes every token of its group
        elif self.spec.has_capacity:
            cap = self.spec.capacity(n, E, self.training)
        else:
            cap = None
        real = None if mask is None else mask.view(G, n, 1).expand_as(choice.expert)  # [G, n, k]
        if real is not None:
            choice.routed = real if choice.routed is None else choice.routed & real
        if padding is not None:
            pad = padding.view(G, n, 1).expand_as(choice.expert)
            choice.routed = pad if choice.routed is None else choice.routed & pad
        all_kept = cap is None and choice.routed is None
        passthrough = None
        if all_kept:  # dropless and every choice routed: slot 0 each, nothing dropped (fewer ops)
            slot, weight = torch.zeros_like(choice.expert), choice.weight
            kept_counts = counts(choice.expert.reshape(-1), E)  # also the dispatch's group sizes
            load = kept_counts.float()
            dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        else:
            kept_counts = None
            priority = choice.priority() if cap is not None and self.spec.drop_priority == "score" else None
            slot = assign_slots(choice.expert, choice.routed, E, cap, priority)
            if real is not None and cap is not None and self.spec.has_capacity:
                slot = self._within_real_capacity(slot, mask.view(G, n), cap)
            routed = choice.routed if choice.routed is not None else torch.ones_like(slot, dtype=torch.bool)
            weight = torch.where(slot >= 0, choice.weight, torch.zeros_like(choice.weight))
            if choice.normalize_kept:  # fairseq: denominator clamped at the float's eps (both dropped: 0)
                total = weight.sum(-1, keepdim=True)
                weight = weight / total.clamp(min=torch.finfo(total.dtype).eps)
            if self.spec.dropped_tokens == "scaled_input":
                lost = routed & (slot < 0)
                passthrough = torch.where(lost, choice.weight, torch.zeros_like(choice.weight)).sum(-1)
            load = counts(choice.expert.reshape(-1), E, routed.reshape(-1)).float()
            dropped = (routed & (slot < 0)).sum()
        if self.training and self.spec.bias_balancing_rate is not None:
            self.load_acc += load.detach()
        self.advance()
        token = torch.arange(Sn, device=x.device).view(G, n, 1).expand(G, n, k)
        return Routing(
            token=token.reshape(-1), expert=choice.expert.reshape(-1), weight=weight.reshape(-1),
            slot=slot.reshape(-1), num_tokens=Sn, num_experts=E,
            capacity=None if cap is None else G * cap,
            aux_loss=self.weigh(choice.losses, x), losses={k_: v.detach() for k_, v in choice.losses.items()},
            expert_load=load.detach(), dropped=dropped, all_kept=all_kept,
            kept_counts=kept_counts, routed=None if choice.routed is None else choice.routed.reshape(-1),
            real=None if real is None else real.reshape(-1),
            passthrough=None if passthrough is None else passthrough.reshape(-1))

    def _within_real_capacity(self, slot: torch.Tensor, real: torch.Tensor, cap: int) -> torch.Tensor:
        """slot [G, n, k] assigned under the capacity ``cap`` of n tokens a group -> the slots under
        each group's capacity for its tokens that count (real [G, n]), C(m) ≤ C(n) for m ≤ n. Slots
        go in priority order and the tokens that do not count take none, so this is the routing of
        the batch without them."""
        G = slot.shape[0]
        limit = real_capacity(self.spec, real, self.num_experts, self.training)  # [G]
        pos = slot - cap * torch.arange(G, device=slot.device)[:, None, None]
        return torch.where((slot >= 0) & (pos < limit[:, None, None]), slot, torch.full_like(slot, -1))

    def weigh(self, losses: dict, x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        for name, value in losses.items():
            w = getattr(self.loss_weights, name)
            if w:
                total = total + w * value
        return total

    @torch.no_grad()
    def balance_step(self, load: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): b_i += γ · sign(mean load − load_i), from the
        assignments counted since the last step (``load``: those summed over ranks). ``keep``
        (0-dim, 1 or 0): 0 leaves the bias as it was (a skipped step), without a host sync."""
        if self.spec.bias_balancing_rate is None:
            return
        load = self.load_acc if load is None else load
        move = self.spec.bias_balancing_rate * torch.sign(load.mean() - load)
        self.expert_bias += move if keep is None else move * keep
        self.load_acc.zero_()

    def extra_repr(self) -> str:
        g = self.spec
        cap = (f"expert_capacity={g.expert_capacity}" if g.expert_capacity is not None else
               f"capacity_factor={g.capacity_factor}" if g.has_capacity else "dropless")
        groups = f", groups={g.groups.count} (top {g.groups.top})" if g.groups is not None else ""
        return f"type={g.type}, experts={self.num_experts}, k={g.k}{groups}, {cap}"


class RouterGate(Gate):
    """A gate with a linear router W [E, d] (logits h = x·Wᵀ) and the standard losses."""

    def __init__(self, *a, init_std: float = 0.02, **kw):
        super().__init__(*a, **kw)
        self.weight = nn.Parameter(normal_init(self.num_experts, self.d_model, std=init_std))

    def logits(self, x, gidx) -> torch.Tensor:
        return self.linear(self.jitter(x, gidx), self.weight)

    def losses(self, logits, probs, weight, expert, counted=None) -> dict:
        """Unweighted importance, balance and z-loss, each only when the spec weighs it.
        ``counted``: the choices the balance loss's f counts (default: all of them)."""
        lw, out = self.loss_weights, {}
        if lw.importance:
            out["importance"] = self.importance(weight, expert)
        if lw.balance:
            out["balance"] = balance_loss(probs, expert if counted is None else counted, None)
        if lw.z_loss:
            out["z_loss"] = z_loss(logits)
        return out


class SoftmaxGate(RouterGate):
    """Dense softmax gating: G(x) = softmax(x·W_g), every expert computes every token."""

    def choose(self, x, ids, gidx):
        logits = self.logits(x, gidx)
        probs = torch.softmax(logits, dim=-1)
        G, n, E = probs.shape
        expert = torch.arange(E, device=x.device).expand(G, n, E)
        return Choice(expert, probs, losses=self.losses(logits, probs, probs, expert))


class NoisyTopKGate(Gate):
    """Shazeer's noisy top-k: H = x·W_g + N(0,1)·softplus(x·W_noise) (training only),
    G = softmax(KeepTopK(H, k)). W_g = W_noise = 0 at the start."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.d_model))
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.d_model))

    def choose(self, x, ids, gidx):
        x = self.jitter(x, gidx)
        clean = self.linear(x, self.weight)
        std = F.softplus(self.linear(x, self.noise_weight)) + self.spec.noise_epsilon
        noisy = clean
        if self.training:
            E = self.num_experts
            idx = gidx[..., None] * E + torch.arange(E, device=x.device)
            noisy = clean + rng.normal(self.seed, self.stream("noise"), idx) * std
        k = self.spec.k
        expert = self.select(noisy, k)
        weight = torch.softmax(noisy.gather(-1, expert), dim=-1)
        # V-MoE's priority is a weight of TOP_k(softmax(noisy)), before Shazeer's softmax over the k
        prob = torch.softmax(noisy, dim=-1).gather(-1, expert) if self.spec.drop_priority == "score" else None
        lw, out = self.loss_weights, {}
        if lw.importance:
            out["importance"] = self.importance(weight, expert)
        if lw.load:
            if self.training:
                load = load_estimate(clean, noisy, std, k).sum(dim=1)
            else:  # no noise, no estimator: the load is the count
                load = torch.zeros_like(clean[:, 0]).scatter_add(1, expert.flatten(1),
                                                                 torch.ones_like(expert.flatten(1), dtype=clean.dtype))
            out["load"] = cv_squared(load).mean()
        if lw.balance:
            out["balance"] = balance_loss(torch.softmax(clean, -1), expert, None)
        if lw.z_loss:
            out["z_loss"] = z_loss(clean)
        return Choice(expert, weight, losses=out, prob=prob)


class TopKGate(RouterGate):
    """Top-k gating (Mixtral): weights = the scores of the k chosen experts, renormalised to
    sum 1 (for softmax scores: the softmax over the selected logits). score: sigmoid gives
    DeepSeek-V3's sigmoid affinities.

    As transformers computes them (modeling_mixtral.py MixtralTopKRouter, modeling_qwen2_moe.py
    Qwen2MoeTopKRouter, modeling_deepseek_v3.py DeepseekV3TopkRouter):
      1. s = softmax(x·Wᵀ) or sigmoid(x·Wᵀ), x·Wᵀ in the router dtype, s in float32;
      2. the k experts: the top k of s + b (b: the balancing bias, if any), among the best
         ``groups.top`` groups when the experts are grouped;
      3. w = the chosen s (without b); normalize: w / Σw (sigmoid: w / (Σw + 1e-20), as
         DeepseekV3TopkRouter); then w · scale (routed_scaling_factor).
    """

    def choose(self, x, ids, gidx):
        logits = self.logits(x, gidx)
        sigmoid = self.spec.score == "sigmoid"
        if sigmoid:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = torch.softmax(logits, dim=-1)
        expert = self.select(scores, self.spec.k, logits)
        weight = prob = scores.gather(-1, expert)
        if self.spec.normalize:
            total = weight.sum(-1, keepdim=True)
            weight = weight / (total + 1e-20 if sigmoid else total)
        losses = self.losses(logits, probs, weight, expert)
        if self.spec.scale != 1.0:
            weight = weight * self.spec.scale
        return Choice(expert, weight, losses=losses, prob=prob)


class SwitchGate(RouterGate):
    """Switch: p = softmax(x·W_r) in float32, expert = argmax p, weight = p_expert."""

    def choose(self, x, ids, gidx):
        logits = self.logits(x, gidx)
        probs = torch.softmax(logits, dim=-1)
        expert = self.select(probs, 1, logits)
        weight = probs.gather(-1, expert)
        return Choice(expert, weight, losses=self.losses(logits, probs, weight, expert))


class GShardGate(RouterGate):
    """GShard top-2: g1, g2 the two largest probabilities, normalised by g1 + g2; the second
    expert is used only with probability min(1, 2·g2) (second_expert: random).

    fairseq's top2gating (NLLB-MoE; transformers' NllbMoeTop2Router, route_tokens) with
    ``second_expert: sampling``: the second expert is the argmax of the logits plus Gumbel(0, 1)
    noise over the experts other than the first (a draw from their softmax: the Gumbel-max
    trick), in training and evaluation alike, as fairseq and transformers draw it; its weight is
    its probability. ``normalize_after_drops``: g1, g2 stay the raw probabilities until the
    capacity drops are known, then are divided by the sum of the kept ones, clamped at float32's
    eps (``normalize_router_prob_before_dropping: false``). ``random`` compares 2·g2 as it
    stands then: normalised (GShard, Algorithm 1; fairseq normalising before the drops), or the
    raw probability (fairseq and transformers normalising after)."""

    def choose(self, x, ids, gidx):
        logits = self.logits(x, gidx)
        probs = torch.softmax(logits, dim=-1)
        if self.spec.second_expert == "sampling":
            first = self.select(probs, 1, logits)
            E = self.num_experts
            u = rng.uniform(self.seed, self.stream("sampling"), gidx[..., None] * E + torch.arange(E, device=x.device))
            noisy = (logits.detach() - torch.log(-torch.log(u))).scatter(-1, first, float("-inf"))
            expert = torch.cat([first, noisy.argmax(dim=-1, keepdim=True)], dim=-1)
        else:
            expert = self.select(probs, 2, logits)
        weight = prob = probs.gather(-1, expert)
        after = self.spec.normalize_after_drops
        if self.spec.normalize and not after:
            weight = weight / weight.sum(-1, keepdim=True)
        routed = torch.ones_like(expert, dtype=torch.bool)
        if self.spec.second_expert == "random":
            u = rng.uniform(self.seed, self.stream("second"), gidx)
            routed = torch.stack([routed[..., 0], 2 * weight[..., 1].detach() > u], dim=-1)
        # the balance loss's c_e counts the tokens whose first choice is e
        losses = self.losses(logits, probs, weight * routed, expert, counted=expert[..., :1])
        return Choice(expert, weight, routed=routed, losses=losses, prob=prob, normalize_kept=after)


class HashGate(Gate):
    """Hash layers: expert = hash(token id) mod E (a fixed random table over the vocabulary), weight 1."""

    def __init__(self, *a, vocab_size: int, **kw):
        super().__init__(*a, **kw)
        if torch.get_default_device().type == "meta":  # nothing to draw (and no tracing machinery to import)
            table = torch.empty(vocab_size, dtype=torch.int64)
        else:
            ids = torch.arange(vocab_size, dtype=torch.int64)
            table = (rng.uniform(self.spec.hash_seed, rng.stream_id("hash"), ids, torch.float64)
                     * self.num_experts).long().clamp_(max=self.num_experts - 1)
        self.register_buffer("table", table)

    def choose(self, x, ids, gidx):
        if ids is None:
            raise ValueError("a hash gate needs the token ids")
        expert = self.table[ids][..., None]
        return Choice(expert, torch.ones_like(expert, dtype=torch.float32))


class ExpertChoiceGate(RouterGate):
    """Expert choice: S = softmax(X·W_g) over the n tokens of a group; each expert takes its top
    k_e = capacity_factor·n/E tokens. A token no expert picked gets 0. Optional cap on the
    experts per token (kept greedily by weight)."""

    def forward(self, x, token_ids=None, rank=0, groups=1, mask=None):
        """``mask`` [S] bool: the tokens that count (None: all); no expert picks another, and a
        group's k_e is that of its tokens that count."""
        Sn, d = x.shape
        G, n, E = groups, Sn // groups, self.num_experts
        gidx = self.token_keys(rank, Sn, x.device).view(G, n)
        logits = self.logits(x.reshape(G, n, d), gidx)
        probs = torch.softmax(logits, dim=-1)
        C = self.spec.capacity(n, E, self.training)
        if mask is not None:  # a token that does not count ranks below every one that does
            probs = probs.masked_fill(~mask.view(G, n, 1), -1.0)
        weight, idx = torch.topk(probs.transpose(1, 2), C, dim=-1)  # [G, E, C]
        token = idx + n * torch.arange(G, device=x.device)[:, None, None]
        expert = torch.arange(E, device=x.device)[None, :, None].expand(G, E, C)
        slot = (C * torch.arange(G, device=x.device)[:, None, None] + torch.arange(C, device=x.device)).expand(G, E, C)
        real = None
        if mask is not None:  # picks of tokens that do not count, and past a group's own k_e: none
            limit = real_capacity(self.spec, mask.view(G, n), E, self.training)  # [G]
            real = mask.view(G, n).gather(1, idx.view(G, E * C)).view(G, E, C) & \
                (torch.arange(C, device=x.device) < limit[:, None, None])
            slot = torch.where(real, slot, torch.full_like(slot, -1))
            weight = torch.where(real, weight, torch.zeros_like(weight))
            real = real.reshape(-1)
        token, expert, weight, slot = (t.reshape(-1) for t in (token, expert, weight, slot))
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        cap = self.spec.max_experts_per_token
        if cap is not None:  # keep each token's `cap` highest-weight experts
            order = torch.sort(-weight.detach(), stable=True).indices
            rank = torch.empty_like(token).scatter_(0, order, bucket_positions(token[order], Sn))
            over = (rank >= cap) & (slot >= 0)
            slot = torch.where(over, torch.full_like(slot, -1), slot)
            weight = torch.where(over, torch.zeros_like(weight), weight)
            dropped = over.sum()
        losses = {"z_loss": z_loss(logits)} if self.loss_weights.z_loss else {}
        self.advance()
        return Routing(token=token, expert=expert, weight=weight, slot=slot, num_tokens=Sn, num_experts=E,
                       capacity=G * C, aux_loss=self.weigh(losses, x),
                       losses={k: v.detach() for k, v in losses.items()},
                       expert_load=torch.full((E,), float(G * C), device=x.device) if real is None
                       else counts(expert, E, real).float(), dropped=dropped, real=real)


class HierarchicalGate(Gate):
    """Shazeer's hierarchical MoE: a primary gate over a groups, and in each group a secondary
    gate over its b experts, applied only to the tokens sent to that group:
    weight(i, j) = G_primary(x)_i · G_i(x)_j, expert id = i·b + j."""

    def __init__(self, gate: S.Gate, losses: S.Losses, d_model: int, num_experts: int,
                 hierarchy: S.Hierarchy, init_std: float = 0.02, **kw):
        super().__init__(gate, losses, d_model, num_experts, **kw)
        self.h = hierarchy
        a, b, d = hierarchy.groups, hierarchy.experts_per_group, d_model

        def weights(*shape, sub):
            if gate_type(sub.type).noise:  # Shazeer: zero init for W_g and W_noise
                return nn.Parameter(torch.zeros(*shape)), nn.Parameter(torch.zeros(*shape))
            return nn.Parameter(normal_init(*shape, std=init_std)), None

        self.primary_weight, self.primary_noise_weight = weights(a, d, sub=hierarchy.primary)
        self.secondary_weight, self.secondary_noise_weight = weights(a, b, d, sub=hierarchy.secondary)

    def _level(self, sub: S.SubGate, clean, std, noise_idx, purpose):
        """One level's choice: (top indices, weights, noisy logits, the weights before any
        renormalisation over the k: None when they are the weights or not needed)."""
        noisy = clean
        if std is not None and self.training:
            noisy = clean + rng.normal(self.seed, self.stream(purpose), noise_idx) * std
        if gate_type(sub.type).dense:
            probs = torch.softmax(noisy, dim=-1)
            idx = torch.arange(clean.shape[-1], device=clean.device).expand_as(clean)
            return idx, probs, noisy, None
        idx = torch.topk(noisy, sub.k, dim=-1).indices
        vals = noisy.gather(-1, idx)
        if sub.normalize:  # noisy_topk's: always (softmax over KeepTopK, eq. 3-5; not an option of it)
            w = torch.softmax(vals, dim=-1)
            prob = torch.softmax(noisy, dim=-1).gather(-1, idx) if self.spec.drop_priority == "score" else None
        else:
            w, prob = torch.softmax(noisy, dim=-1).gather(-1, idx), None
        return idx, w, noisy, prob

    def choose(self, x, ids, gidx):
        h, lw = self.h, self.loss_weights
        a, b = h.groups, h.experts_per_group
        G, n, d = x.shape
        x = self.jitter(x, gidx)
        # primary
        clean_p = self.linear(x, self.primary_weight)
        std_p = (F.softplus(self.linear(x, self.primary_noise_weight)) + h.primary.noise_epsilon
                 if self.primary_noise_weight is not None else None)
        nidx = gidx[..., None] * a + torch.arange(a, device=x.device)
        gi, gw, noisy_p, gp = self._level(h.primary, clean_p, std_p, nidx, "primary")  # [G, n, k1]
        k1 = gi.shape[-1]
        # secondary, only for the (token, group) pairs the primary chose: grouped by group
        rows_group = gi.reshape(-1)  # [R]
        rows_token = torch.arange(G * n, device=x.device).repeat_interleave(k1)
        order = torch.sort(rows_group, stable=True).indices
        sizes = counts(rows_group, a)
        dt = self.dtype(x)
        xr = x.reshape(G * n, d)[rows_token[order]].to(dt)
        with _no_autocast(x.device):
            clean_s = grouped_matmul(xr, self.secondary_weight.to(dt).transpose(1, 2), sizes).to(self.score_dtype(dt))
            std_s = None
            if self.secondary_noise_weight is not None:
                raw = grouped_matmul(xr, self.secondary_noise_weight.to(dt).transpose(1, 2), sizes)
                raw = raw.to(self.score_dtype(dt))
                std_s = F.softplus(raw) + h.secondary.noise_epsilon
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        clean_s = clean_s[unsort]
        std_s = std_s[unsort] if std_s is not None else None
        row_gidx = gidx.reshape(-1).repeat_interleave(k1)
        sidx = (row_gidx * a + rows_group)[:, None] * b + torch.arange(b, device=x.device)
        ji, jw, noisy_s, jp = self._level(h.secondary, clean_s, std_s, sidx, "secondary")  # [R, k2]
        k2 = ji.shape[-1]
        expert = (gi[..., None] * b + ji.view(G, n, k1, k2)).reshape(G, n, k1 * k2)
        weight = (gw[..., None] * jw.view(G, n, k1, k2)).reshape(G, n, k1 * k2)
        prob = None  # the product of the two levels' weights before their renormalisations
        if gp is not None or jp is not None:
            gp, jp = gw if gp is None else gp, jw if jp is None else jp
            prob = (gp[..., None] * jp.view(G, n, k1, k2)).reshape(G, n, k1 * k2)
        out = {}
        if lw.importance:
            out["importance"] = self.importance(weight, expert)
        if lw.load:
            out["load"] = self._load(clean_p, noisy_p, std_p, gi, clean_s, noisy_s, std_s, rows_group, G, n)
        if lw.z_loss:
            out["z_loss"] = z_loss(clean_p) + z_loss(clean_s)
        return Choice(expert, weight, losses=out, prob=prob)

    def _load(self, clean_p, noisy_p, std_p, gi, clean_s, noisy_s, std_s, rows_group, G, n):
        """CV² of Load_H(X)_{i,j} = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|."""
        h = self.h
        a, b = h.groups, h.experts_per_group
        rg = rows_group.view(G, -1)  # the group of each row, per routing group
        count = torch.zeros(G, a, device=clean_p.device).scatter_add_(1, rg, torch.ones_like(rg, dtype=torch.float32))
        if self.training:
            load_p = load_estimate(clean_p, noisy_p, std_p, h.primary.k).sum(dim=1)  # [G, a]
            p_s = load_estimate(clean_s, noisy_s, std_s, h.secondary.k).view(G, -1, b)  # [G, n·k1, b]
        else:  # without noise the loads are counts
            load_p = count
            top = torch.topk(clean_s, h.secondary.k, dim=-1).indices
            p_s = torch.zeros_like(clean_s).scatter_(1, top, 1.0).view(G, -1, b)
        load_s = torch.zeros(G, a, b, device=clean_p.device).index_put_(
            (torch.arange(G, device=rg.device)[:, None].expand_as(rg), rg), p_s, accumulate=True)
        load_h = load_p[..., None] * load_s / count.clamp(min=1)[..., None]
        return cv_squared(load_h.reshape(G, a * b)).mean()


def make_gate(moe: S.MoE, d_model: int, router_dtype: str, seed: int, layer: int, init_std: float,
              vocab_size: Optional[int] = None) -> Gate:
    kw = dict(router_dtype=router_dtype, seed=seed, layer=layer)
    E = moe.experts.count
    if moe.hierarchy is not None:
        return HierarchicalGate(moe.gate, moe.losses, d_model, E, moe.hierarchy, init_std=init_std, **kw)
    cls = gate_type(moe.gate.type).module_class()
    if cls is HashGate:
        return HashGate(moe.gate, moe.losses, d_model, E, vocab_size=vocab_size, **kw)
    if cls is NoisyTopKGate:
        return NoisyTopKGate(moe.gate, moe.losses, d_model, E, **kw)
    return cls(moe.gate, moe.losses, d_model, E, init_std=init_std, **kw)
