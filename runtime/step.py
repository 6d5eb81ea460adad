"""One training step as tensor operations only: what eager mode calls and what a CUDA graph
captures. Both modes run this same code, so they skip, scale and update alike.

    forward (autocast) → task loss + aux loss → backward of (loss + aux) / world (· S in float16),
    during which complete buckets of gradients start their all-reduces (runtime/grads.py), and
    the balancing gates' loads their one all-reduce → the rest of the gradient sync → clip by
    the global norm (÷ S) → found_inf = norm is not finite → fused AdamW (skips in its kernel
    when found_inf) → aux-loss-free bias (not when found_inf) → loss scale update (float16)

No value goes to the host here: the caller decides what to read back and when.

Micro-batches (``train.micro_batches`` M, gradient accumulation): the rank's batch is split
into M equal micro-batches, each run forward and backward in turn, its objective divided by M
more, so the gradients add up to those of the whole batch. The gradient sync starts with the
last backward (its hooks armed then, not before) and runs once. Routing is per micro-batch: a
capacity is that of the micro-batch's tokens, and the balancing losses are computed over its
groups (the papers compute both per group of tokens); a dropless layer without them routes each
token as the whole batch would (its draws keyed by the token's place in the global batch,
``Gate.share``). The step's loss and aux loss are the means over the micro-batches, its router
statistics their sums; the balancing bias moves once, from the load of all of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from moedsl.compiler.collectives import Traffic
from moedsl.nn.gates import Gate
from moedsl.nn.moe_ops import RouterStats

from .grads import GradSync, capturing
from .optim import LossScale, make_optimizer
from .shard import ShardedAdamW, ShardedSync, full_optimizer, fully_shard_model


def task_loss(spec, out, targets, loss_mask=None, count=None) -> torch.Tensor:
    """Next-token cross-entropy (token models), cross-entropy over the classes per image (image
    models: logits [B, classes], labels [B]) or mean squared error (vector models).

    ``loss_mask`` [B, T] bool (token models, instruction data): only the targets it marks count,
    their cross-entropies summed and divided by ``count`` (a 0-dim tensor; default this batch's
    marked targets, at least 1). A step on N ranks passes ``masked_count``: the step's marked
    targets over every rank ÷ N, so the ranks' losses average to the mean over the global batch
    and their gradients (each divided by N in the objective) sum to its gradient, however the
    marked targets fall between the ranks."""
    if spec.model.input == "image":
        return F.cross_entropy(out.output.float(), targets)
    if spec.model.input == "tokens":
        if loss_mask is None:
            return F.cross_entropy(out.output.flatten(0, 1).float(), targets.flatten())
        each = F.cross_entropy(out.output.flatten(0, 1).float(), targets.flatten(), reduction="none")
        mask = loss_mask.flatten()
        if count is None:
            count = mask.sum().clamp(min=1)
        return each.masked_fill(~mask, 0.0).sum() / count
    return F.mse_loss(out.output.float(), targets.float())


def masked_count(loss_mask: torch.Tensor, world: int) -> torch.Tensor:
    """The marked targets of the whole step (``loss_mask`` summed over every rank; at least 1) ÷
    ``world``: ``task_loss``'s ``count`` on each rank. A 0-dim device tensor and one all-reduce,
    no read to the host, so a captured CUDA graph holds it."""
    count = loss_mask.sum().to(torch.float32)
    if world > 1:
        with Traffic.waiting("other"):
            dist.all_reduce(count)
    return count.clamp(min=1) / world


def _split(t: Optional[torch.Tensor], M: int) -> list:
    """A batch tensor [b, ...] (or None) in M equal micro-batches along its first dim."""
    if t is None or M == 1:
        return [t] * M
    if t.shape[0] % M:
        raise ValueError(f"a batch of {t.shape[0]} rows does not split into {M} micro-batches")
    return list(t.chunk(M))


@contextlib.contextmanager
def _routing_share(gates: list, m: int, M: int):
    """The gates route the m-th of M micro-batches of this rank's batch (``Gate.share``)."""
    if M == 1:
        yield
        return
    for g in gates:
        g.share = (m, M)
    try:
        yield
    finally:
        for g in gates:
            g.share = (0, 1)


def merged_stats(parts: tuple) -> RouterStats:
    """One MoE layer's router statistics of a step's micro-batches, as one: counts, drops,
    assignments and capacities (slots) summed, the unweighted losses averaged."""
    first = parts[0]
    return RouterStats(layer=first.layer, tokens_per_expert=sum(p.tokens_per_expert for p in parts),
                       expert_load=sum(p.expert_load for p in parts), dropped=sum(p.dropped for p in parts),
                       assignments=sum(p.assignments for p in parts),
                       capacity=None if first.capacity is None else sum(p.capacity for p in parts),
                       losses={k: sum(p.losses[k] for p in parts) / len(parts) for k in first.losses})


@dataclass
class StepOutputs:
    """Device tensors of one step (0-dim), and the per-layer router statistics."""

    loss: torch.Tensor  # this rank's task loss (with a loss mask: its share of the step's, times world)
    aux_loss: torch.Tensor  # this rank's weighted auxiliary losses
    grad_norm: torch.Tensor  # global gradient norm before clipping (unscaled)
    skipped: torch.Tensor  # 1.0 when the gradient was not finite: nothing was updated
    router_stats: list


def balancing_gates(model) -> list:
    """The gates with aux-loss-free balancing (DeepSeek-V3 §2.1.2): their bias moves each step."""
    return [m for m in model.modules() if isinstance(m, Gate) and m.spec.bias_balancing_rate is not None]


class TrainStep:
    """``step(inputs, targets, loss_mask=None) -> StepOutputs`` on this rank; ``lr`` is a tensor set
    before each call."""

    def __init__(self, model, spec, optimizer, sync, world: int, amp, grad_clip: float,
                 loss_scale: Optional[LossScale] = None, lr: Optional[torch.Tensor] = None, teacher=None,
                 micro_batches: int = 1):
        self.model, self.spec, self.opt, self.sync = model, spec, optimizer, sync
        self.teacher = teacher  # distillation (runtime/distill.py Teacher): its soft targets mix into the loss
        self.world, self.amp, self.grad_clip, self.loss_scale = world, amp, grad_clip, loss_scale
        self.lr = lr  # the optimizer's learning rate tensor, when the step made it (``for_run``)
        self.micro_batches = micro_batches  # M: the rank's batch in M parts, gradients accumulated
        self.gates = balancing_gates(model)
        self.routers = [m for m in model.modules() if isinstance(m, Gate)]
        self.fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]  # shard full: FSDP2's units
        self.device_type = next(model.parameters()).device.type

    @classmethod
    def for_run(cls, model, spec, options, rank: int, world: int, amp, capturable: bool,
                teacher=None) -> "TrainStep":
        """The step a run executes, built as the ``Trainer`` builds it (and ``moedsl verify``, which
        checks it): the fused AdamW reading the tensor ``step.lr`` (fill it before each call; over this
        rank's rows of each parameter with ``options.shard`` optimizer, runtime/shard.py), the
        gradient sync of ``options.grad_sync`` (bucketed: its hooks registered now, before any
        backward), float16's loss scale (``amp`` float16), the clip at ``options.grad_clip``,
        distillation from ``teacher`` (runtime/distill.py) when given."""
        device = next(model.parameters()).device
        lr = torch.tensor(options.lr, dtype=torch.float32, device=device)
        if options.shard == "full" and world > 1:  # FSDP2: the parameters become DTensors of this rank's rows here
            fully_shard_model(model, rank, world)
            optimizer, sync = full_optimizer(model, options, lr, capturable), ShardedSync(model, world)
        else:
            optimizer = ShardedAdamW(model, options, lr, rank, world, capturable=capturable) \
                if options.shard == "optimizer" else make_optimizer(model, options, lr, capturable=capturable)
            sync = GradSync(model, model.compiled.mesh, rank, mode=options.grad_sync, bucket_mb=options.bucket_mb)
        loss_scale = LossScale(device) if amp == torch.float16 else None
        return cls(model, spec, optimizer, sync, world, amp, options.grad_clip, loss_scale, lr, teacher,
                   micro_batches=options.micro_batches)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_mask: Optional[torch.Tensor] = None,
                 documents: Optional[torch.Tensor] = None, decoder_inputs: Optional[torch.Tensor] = None,
                 source_mask: Optional[torch.Tensor] = None) -> StepOutputs:
        """``loss_mask`` [B, T]: the targets that count (instruction data; an encoder-decoder's labels
        that are not padding); ``documents`` [B, T]: packed rows (--pack documents), each token's
        document in its row. An encoder-decoder: ``inputs`` the source ids [B, S], ``decoder_inputs``
        [B, T] the decoder's, ``source_mask`` [B, S] the real source tokens (None: all);
        ``model(inputs, decoder_inputs, source_mask)``."""
        self.model.train()
        M = self.micro_batches
        # with a loss mask: each micro-batch's share of the step's marked targets (÷ M more)
        count = None if loss_mask is None else masked_count(loss_mask, self.world) / M
        parts = zip(*(_split(t, M) for t in (inputs, targets, loss_mask, documents, decoder_inputs, source_mask)))
        losses, aux, stats = [], [], []
        for m, (x, y, mask, docs, dec, src) in enumerate(parts):
            with _routing_share(self.routers, m, M):
                with torch.autocast(self.device_type, dtype=self.amp, enabled=self.amp is not None):
                    if dec is not None:
                        out = self.model(x, dec, src)
                    else:
                        out = self.model(x) if docs is None else self.model(x, docs)
                    loss = task_loss(self.spec, out, y, mask, count)
                    if self.teacher is not None:  # the same inputs, forward only; the same mask and count
                        soft = self.teacher.logits(x, docs)
                        loss = self.teacher.loss(loss, out.output, soft, mask, count)
                objective = (loss + out.aux_loss) / (self.world * M)
                if self.loss_scale is not None:
                    objective = objective * self.loss_scale.scale
                for unit in self.fsdp:  # FSDP2 reduce-scatters after the last backward only, as the sync does
                    unit.set_requires_gradient_sync(m == M - 1, recurse=False)
                if m == M - 1:  # the sync's hooks fire on the last backward only: one sync a step
                    loads = self._sum_loads()  # in flight during backward
                    self.sync.start()
                objective.backward()
            losses.append(loss.detach())
            aux.append(out.aux_loss.detach())
            stats.append(out.router_stats)
            out = loss = objective = None  # a micro-batch's output goes before the next one's forward
        self.sync()
        inv_scale = None if self.loss_scale is None else 1.0 / self.loss_scale.scale
        norm = self.sync.clip(self.grad_clip, inv_scale)  # non-finite: AdamW skips (found_inf)
        skipped = (~torch.isfinite(norm)).to(torch.float32)  # the same on every rank: the norm is global
        self.opt.found_inf = skipped
        self.opt.step()
        self._move_bias(loads, 1.0 - skipped)
        if self.loss_scale is not None:
            self.loss_scale.update(skipped)
        if M == 1:
            return StepOutputs(losses[0], aux[0], norm, skipped, stats[0])
        return StepOutputs(torch.stack(losses).mean(), torch.stack(aux).mean(), norm, skipped,
                           [merged_stats(layer) for layer in zip(*stats)])

    @torch.no_grad()
    def _sum_loads(self):
        """Every balancing gate's load, summed over ranks in one all-reduce that runs while
        backward does (blocking while a CUDA graph is captured): (flat loads, work or None)."""
        if not self.gates:
            return None
        flat = torch.cat([g.load_acc for g in self.gates])  # a copy: balance_step zeroes load_acc
        if self.world == 1:
            return flat, None
        if capturing(flat.device):
            with Traffic.waiting("other"):
                dist.all_reduce(flat)
            return flat, None
        return flat, dist.all_reduce(flat, async_op=True)

    @torch.no_grad()
    def _move_bias(self, loads, keep: torch.Tensor) -> None:
        """The balancing bias from the load of every rank, left as it was when the step is skipped."""
        if loads is None:
            return
        flat, work = loads
        if work is not None:
            with Traffic.waiting("other"):
                work.wait()
        offset = 0
        for g in self.gates:
            n = g.load_acc.numel()
            g.balance_step(flat[offset:offset + n], keep)
            offset += n
