"""Gradient synchronisation of a compiled model across its mesh.

Every rank back-propagates (its loss) / world. Then:
- a replicated (non-expert) parameter's gradient is summed over all ranks;
- an expert's gradient is summed over the ranks that hold a copy of that expert: its
  replicas inside an EP group (each copy saw a share of the tokens) and its copies in the
  other EP groups (expert data parallelism); an expert held once gets no collective.

Two ways to get there, the same sums:

- ``after_backward``: when backward has ended, every gradient of a group of ranks is
  flattened into one buffer, one blocking all-reduce per group. Nothing overlaps compute.
- ``bucketed`` (PyTorch DDP's reducer, Li et al. 2020, "PyTorch Distributed", §3.2.3 and
  §4.2): gradients are packed into buckets of about ``bucket_mb`` in the order backward
  produces them; a hook on each parameter (``register_post_accumulate_grad_hook``) counts
  what is ready, and a complete bucket's all-reduce is launched asynchronously while backward
  goes on. ``__call__`` waits for them before the optimizer step.

Launch order. Every rank launches its buckets in one order that all ranks agree on, a bucket
ready early waiting for those before it, so two ranks never issue collectives (of one
process group, or of two groups they share) in different orders: that hangs gloo, and NCCL
when communicators' kernels wait on each other. The order is that of the parameters'
readiness: the first step uses the reverse of registration order (backward runs roughly
backwards), records when each gradient became ready, and at its end all ranks take rank 0's
record (DDP's bucket rebuild, same paper §3.2.3), which puts the head (registered early,
ready first) at the front and never-used parameters at the back. A parameter that got no
gradient in a step is sent as zeros when the step's sync ends, in its bucket's place.

Buckets of replicated gradients go to a group of all ranks made for them, not the default
group: a launch from a hook may fall between the model's own backward collectives (the
all-to-alls' way back), at a point that need not be the same on every rank. Buckets of expert
gradients go to the group of the ranks holding that expert (per slot of a stacked
[E_local, ...] parameter: slots of one parameter can belong to different groups); inside a
bucket, pieces follow (parameter order, global expert id), the same on every holder.

A CUDA graph captures the after-backward sync: while a stream is being captured the hooks
stay idle and ``__call__`` runs the flat sync (capturing asynchronous NCCL work launched from
autograd's thread is left alone until it can be checked on a multi-GPU machine).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moedsl.compiler.collectives import Traffic

MODES = ("bucketed", "after_backward")
# PyTorch DDP uses 25. Measured on 2 gloo processes (bench/grad_sync.py, mixtral with its experts
# on both ranks, ~10 MiB of gradients): blocked in the sync 1-3 ms a step with 0.25-4 MiB buckets,
# 10 ms with 25 (one bucket: launched when backward ends), step times equal within the noise.
DEFAULT_BUCKET_MB = 4.0
WORLD = ()  # the group key of replicated parameters (all ranks); an expert group's key is its holders


@dataclass
class _Piece:
    """One parameter's gradient, or one slot of a stacked expert parameter, inside a bucket."""

    param: torch.Tensor
    slot: Optional[int]  # None: the whole parameter
    numel: int

    def grad(self) -> torch.Tensor:
        g = self.param.grad
        if g is None:  # no gradient this step: a zero contribution
            return torch.zeros(self.numel, dtype=self.param.dtype, device=self.param.device)
        return (g if self.slot is None else g[self.slot]).reshape(-1)

    def put(self, values: torch.Tensor) -> None:
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        g = self.param.grad if self.slot is None else self.param.grad[self.slot]
        g.copy_(values.view_as(g))


def _scatter(flat: torch.Tensor, pieces: list) -> None:
    """The summed buffer back into the gradients it was flattened from."""
    offset = 0
    for pc in pieces:
        pc.put(flat[offset:offset + pc.numel])
        offset += pc.numel


@dataclass
class _Bucket:
    group: tuple  # WORLD, or the holders of its experts
    key: tuple  # its place in the launch order, the same on every rank that has it
    pieces: list
    waits_for: set  # indices of the parameters whose hooks must have fired
    pending: int = 0
    flat: Optional[torch.Tensor] = None
    work: object = None


class GradSync:
    """``sync.start()`` before backward (bucketed: arms the hooks), ``sync()`` after it: every
    gradient summed over the ranks that share it. ``mode``: ``bucketed`` or ``after_backward``;
    ``bucket_mb``: a bucket's size cap in MiB. ``groups``: process groups by their ranks, kept
    between the syncs of one model whose experts move (runtime/replicate.py rebuilds the sync
    after each migration; a group is made once, by every rank, the first time a set needs it)."""

    def __init__(self, model, mesh, rank: int, mode: str = "bucketed", bucket_mb: float = DEFAULT_BUCKET_MB,
                 groups: Optional[dict] = None):
        if mode not in MODES:
            raise ValueError(f"grad_sync {mode!r}: must be one of {', '.join(MODES)}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb {bucket_mb!r}: must be > 0")
        self.world, self.mode, self.bucket_bytes = mesh.world, mode, int(bucket_mb * 2**20)
        P, D = mesh.expert_parallel, mesh.data_parallel
        ep_rank = rank % P
        compiled = model.compiled
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shared = [p for n, p in named if ".experts." not in n]
        # the expert norm: with one EP rank every rank holds every expert and the sum is local
        self._local_expert_norm = P == 1
        # for the global gradient norm: each distinct expert counted once, however many hold it
        self.experts = []  # (param, [E_local] 1 / holders)
        # the flat sync's expert groups: (param, slot) grouped by the ranks holding that slot's expert
        by_holders: dict = defaultdict(list)
        contrib = {id(p): [] for _, p in named}  # per parameter: (group, expert id, piece)
        for name, mod in model.named_modules():
            if not name.endswith(".experts"):
                continue
            lp = compiled.placements[name.rsplit(".", 1)[0]]
            copies = 1 if self._local_expert_norm else D  # EP groups whose norms are summed
            share = torch.tensor([1.0 / (copies * len(lp.hosts[e])) for e in lp.slots[ep_rank]])
            for p in mod.parameters(recurse=False):
                self.experts.append((p, share.to(p.device)))
            for slot, e in enumerate(lp.slots[ep_rank]):
                holders = tuple(sorted(i * P + h for i in range(D) for h in lp.hosts[e]))
                if len(holders) > 1:
                    for p in mod.parameters(recurse=False):
                        by_holders[holders].append(_Piece(p, slot, p[slot].numel()))
                        if p.requires_grad:
                            contrib[id(p)].append((holders, e, _Piece(p, slot, p[slot].numel())))
        for p in self.shared:
            contrib[id(p)].append((WORLD, -1, _Piece(p, None, p.numel())))
        # the flat sync's buffers: the replicated gradients, then each expert group's (sorted: every
        # rank creates every group, in the same order)
        self._flat_groups = [(WORLD, [_Piece(p, None, p.numel()) for p in self.shared])]
        self._flat_groups += [(holders, by_holders[holders]) for holders in sorted(by_holders)]
        self.hooked = mode == "bucketed" and self.world > 1 and dist.is_initialized()
        self._pg = {WORLD: None}  # None: the default group, all ranks
        if dist.is_initialized() and self.world > 1:
            made = {} if groups is None else groups
            if self.hooked:  # a group of its own: launches may fall between the model's backward collectives
                self._pg[WORLD] = _group(made, "world", range(self.world))
            all_sets = self._all_holder_sets(model, mesh)
            for holders in all_sets:
                self._pg[holders] = _group(made, holders, holders)
        # bucketed: parameters by their index in registration order (the same list on every rank)
        self._params = [p for _, p in named]
        self._contrib = [sorted(contrib[id(p)], key=lambda c: (c[0], c[1])) for p in self._params]
        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._armed = False
        self._ordered = False  # the launch order is still the first step's guess
        self.launched: list = []  # this step's launches: (group, key, numel), for tests and benchmarks
        self.from_hooks = 0  # how many of them the hooks launched while backward ran (``moedsl verify`` shows it)
        self._handles = []
        if self.hooked:
            self._build(list(reversed(range(len(self._params)))))
            for i, p in enumerate(self._params):
                self._handles.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._ready(i)))

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

    # ------------------------------------------------------------------ bucketed

    def _build(self, order: list) -> None:
        """Buckets from the parameters in ``order`` (indices): per group, pieces in that order
        until a bucket holds ``bucket_bytes``; the launch order is where each bucket's last piece
        comes in ``order`` (then group, then the group's count), the same on every rank."""
        open_: dict = defaultdict(list)
        size: dict = defaultdict(int)
        count: dict = defaultdict(int)
        buckets = []

        def close(group, position):
            pieces = open_.pop(group)
            size.pop(group)
            waits = {self._index[id(pc.param)] for pc in pieces}
            buckets.append(_Bucket(group, (position, group, count[group]), pieces, waits))
            count[group] += 1

        self._index = {id(p): i for i, p in enumerate(self._params)}
        for position, i in enumerate(order):
            for group, _, piece in self._contrib[i]:
                open_[group].append(piece)
                size[group] += piece.numel * piece.param.element_size()
                if size[group] >= self.bucket_bytes:
                    close(group, position)
        for group in sorted(open_):
            close(group, len(order))
        self.buckets = sorted(buckets, key=lambda b: b.key)
        self._of_param = [[] for _ in self._params]
        for b in self.buckets:
            for i in b.waits_for:
                self._of_param[i].append(b)

    def start(self) -> None:
        """Arm the hooks for the next backward (bucketed, world > 1, not while a CUDA graph is
        being captured); otherwise ``__call__`` runs the after-backward sync."""
        self._armed = self.hooked and not capturing(self._device)
        if not self._armed:
            return
        for b in self.buckets:
            b.pending, b.flat, b.work = len(b.waits_for), None, None
        self._next = 0
        self._seen = [False] * len(self._params)
        self._ready_order: list = []
        self.launched, self.from_hooks = [], 0

    def _ready(self, i: int) -> None:
        """A parameter's gradient is complete: launch every bucket now complete, in order."""
        if not self._armed or self._seen[i]:
            return
        self._seen[i] = True
        self._ready_order.append(i)
        for b in self._of_param[i]:
            b.pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    @torch.no_grad()
    def _launch(self, b: _Bucket) -> None:
        b.flat = torch.cat([pc.grad() for pc in b.pieces])
        b.work = dist.all_reduce(b.flat, group=self._pg[b.group], async_op=True)
        self.launched.append((b.group, b.key, b.flat.numel()))

    @torch.no_grad()
    def _finish(self) -> None:
        """The buckets not launched yet (a parameter without a gradient: zeros), in order; then
        every wait, and the sums back into the gradients."""
        self._armed = False
        self.from_hooks = len(self.launched)
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            with Traffic.waiting("gradients"):
                b.work.wait()
            _scatter(b.flat, b.pieces)
            b.flat = b.work = None
        if not self._ordered:
            self._agree_order()

    def _agree_order(self) -> None:
        """Rebuild the buckets in rank 0's order of readiness (never-ready parameters last, in
        reverse registration order): one broadcast, once."""
        seen = set(self._ready_order)
        mine = self._ready_order + [i for i in reversed(range(len(self._params))) if i not in seen]
        order = torch.tensor(mine, dtype=torch.int64, device=self._device)
        with Traffic.waiting("gradients"):
            dist.broadcast(order, src=0, group=self._pg[WORLD])
        self._build(order.tolist())
        self._ordered = True

    # ------------------------------------------------------------------ after backward

    @torch.no_grad()
    def _flat_sync(self) -> None:
        """One blocking all-reduce per group of ranks, of all its gradients flattened."""
        for group, pieces in self._flat_groups:
            if not pieces:
                continue
            flat = torch.cat([pc.grad() for pc in pieces])
            with Traffic.waiting("gradients"):
                dist.all_reduce(flat, group=self._pg[group])
            _scatter(flat, pieces)

    def __call__(self) -> None:
        """Every gradient summed over its ranks: the bucketed step's waits when ``start`` armed
        the hooks, else the after-backward sync."""
        if self.world == 1:
            return
        if self._armed:
            self._finish()
        else:
            self._flat_sync()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles, self.hooked, self._armed = [], False, False

    # ------------------------------------------------------------------ clipping

    @torch.no_grad()
    def clip(self, max_norm: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clip by the global gradient norm, the norm of the single-process model's gradient:
        replicated parameters once, every expert once. Returns the norm before clipping.
        ``inv_scale``: the gradients hold (loss · S)'s gradient; they are divided by S here and
        the norm is that of the unscaled gradient. A non-finite norm (the same on every rank) is
        the step's ``found_inf``: the fused AdamW then leaves every weight and moment as it was
        (runtime/optim.py), so a NaN never reaches the weights; the gradients are not rewritten.
        Without clipping or a loss scale the gradients are only read. One scalar all-reduce when
        experts are sharded over ranks; none when every rank holds every expert (or none)."""
        dev = self.shared[0].device if self.shared else self.experts[0][0].device
        f32 = torch.float32
        shared = [p.grad for p in self.shared if p.grad is not None]
        # one pass over each gradient (a norm), not a squared copy and a sum
        sq = torch.stack(torch._foreach_norm(shared)).to(f32).square().sum() if shared else \
            torch.zeros((), dtype=f32, device=dev)
        ex = torch.zeros((), dtype=f32, device=dev)
        for p, share in self.experts:
            if p.grad is not None:  # each local expert's norm [E_local], counted by its share of holders
                ex = ex + (torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=f32).square() * share).sum()
        if self.world > 1 and self.experts and not self._local_expert_norm:
            with Traffic.waiting("gradients"):
                dist.all_reduce(ex)
        grads = shared + [p.grad for p, _ in self.experts if p.grad is not None]
        return unscale_and_clip(grads, (sq + ex).sqrt(), max_norm, inv_scale)


@torch.no_grad()
def unscale_and_clip(grads: list, norm: torch.Tensor, max_norm: float,
                     inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grads`` (whose global norm is ``norm``) divided by the loss scale (``inv_scale`` = 1/S)
    and clipped to ``max_norm``, in place, in one multiply; returns the unscaled norm. Without
    clipping or a loss scale the gradients are left as they are."""
    if inv_scale is not None:
        norm = norm * inv_scale
    clipping = bool(max_norm and max_norm > 0)
    if clipping or inv_scale is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if clipping else torch.ones_like(norm)
        if inv_scale is not None:
            coef = coef * inv_scale
        torch._foreach_mul_(grads, coef)
    return norm


def _group(made: dict, key, ranks):
    """The process group of ``ranks`` made under ``key`` before, or made now (collectively: every
    rank asks for the same keys in the same order)."""
    if key not in made:
        made[key] = dist.new_group(list(ranks))
    return made[key]


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
