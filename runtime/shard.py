"""Sharded training states over each parameter's data-parallel group (``placement.shard``).

A parameter's data-parallel group is the set of ranks that hold the same copy of it: every rank
for a replicated (non-expert) parameter; for an expert, the ranks with the same EP index, one per
EP group (expert data parallelism, ``process_groups.expert_dp_group``). N is that group's size.

``none``: every rank holds every state of the parameters it holds (a plain fused AdamW).

``optimizer`` (ZeRO stage 1, Rajbhandari et al. 2020, "ZeRO", §5.1; Megatron-Core's distributed
optimizer): each rank keeps AdamW's two moments for 1/N of the rows of each parameter it holds.
    backward → gradient sync (runtime/grads.py, unchanged: full gradients) → clip by the global
    norm (unchanged) → fused AdamW over this rank's rows only → all-gather of the updated rows
    over the group, so every rank holds the whole updated parameter again.
The rows a rank updates are views into the parameter and its gradient (dim 0 split as
``torch.chunk`` splits it, the last ranks' pieces shorter or empty), so the fused kernel reads
the clipped gradient and ``found_inf`` as the unsharded optimizer does: a skipped step changes
nothing on any rank, and the all-gather then copies back the same values. The parameters stay
float32 on every rank: they are the master weights the model computes with under autocast, so
there is no second copy to shard; what 1/N saves is the 8 bytes a parameter of the moments.
An expert parameter ``[E_local, ...]`` is split per slot (each slot's rows), so a slot's state
is one global expert's, as the checkpoint stores it (``ckpt_format``: ``optim/<name>/e<id>``).
An expert copied on several ranks of one EP group (``placement.experts.replicas``) keeps its
moments on each of them, split over its expert-data-parallel copies only: the copies get the
same summed gradient, so they make the same update.

Why AdamW runs on plain views and not on DTensor parameters (as FSDP2's optimizer does): the
weights stay whole for the forward, so only the optimizer sees shards, and torch's fused AdamW
over plain contiguous rows is the same single kernel as the unsharded run's (bit for bit the
same update, no DTensor dispatch each step). DTensor is what DCP reads to reshard, so the
checkpoint gets DTensors over the same storage.

Checkpoints: each moment is handed to DCP as a ``DTensor`` with ``Shard(0)`` over its group
(``DTensor.from_local`` over the same storage, no copy), with the parameter's (or the slot's)
global shape. DCP records each rank's rows with their offsets, so a checkpoint saved with any
shard mode and world size loads into any other: a plain tensor reads every row, a DTensor its own.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moedsl.compiler.collectives import Traffic

from .grads import unscale_and_clip

MODES = ("none", "optimizer", "full")


@dataclass
class _Piece:
    """One parameter, or one slot of a stacked expert parameter, and this rank's rows of it."""

    param: torch.Tensor  # the model's parameter
    slot: Optional[int]  # None: the whole parameter
    group: str  # "world" or "experts": the data-parallel group that shares it
    size: int  # ranks in that group (N)
    index: int  # this rank's place in it
    chunk: int  # rows of the largest piece, ceil(rows / N): the all-gather pads every piece to it
    local: torch.Tensor  # this rank's rows of dim 0, a view of the parameter: what AdamW updates

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter, or its gradient) at this piece's slot."""
        return t if self.slot is None else t[self.slot]

    def rows(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """Rank ``index``'s rows of ``t`` at this piece's slot."""
        w = self.whole(t)
        if w.dim() == 0:
            return w
        start = min(index * self.chunk, w.shape[0])
        return w[start:min(start + self.chunk, w.shape[0])]

    def row_numel(self) -> int:
        w = self.whole(self.param)
        return 1 if w.dim() == 0 else w[0].numel() if w.shape[0] else 0


class _State(Mapping):
    """``ShardedAdamW.state``: the inner optimizer's state, keyed by the row views it updates; and
    under a model parameter, that parameter's moment buffers."""

    def __init__(self, inner: dict, by_param: dict):
        self._inner, self._by_param = inner, by_param

    def __getitem__(self, key):
        if key in self._inner:
            return self._inner[key]
        return self._by_param[id(key)]

    def __contains__(self, key) -> bool:
        return key in self._inner or id(key) in self._by_param

    def __iter__(self):
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


def _split(param, slot, group: str, size: int, index: int) -> _Piece:
    w = param.detach() if slot is None else param.detach()[slot]
    if w.dim() == 0:  # nothing to split: every rank updates it whole
        return _Piece(param, slot, group, 1, 0, 1, w)
    rows = w.shape[0]
    chunk = -(-rows // size)  # torch.chunk's (and DTensor's Shard(0)'s) split: the last pieces shorter or empty
    start = min(index * chunk, rows)
    return _Piece(param, slot, group, size, index, chunk, w[start:min(start + chunk, rows)])


class ShardedAdamW:
    """``placement.shard: optimizer``: torch's fused AdamW over this rank's rows of every
    parameter, then an all-gather per data-parallel group. Used as the step uses a
    ``torch.optim.AdamW``: ``found_inf`` (set before ``step``), ``step()``, ``zero_grad()``,
    ``param_groups`` and ``state`` (the inner optimizer's: the local rows and their moments)."""

    def __init__(self, model, o, lr: torch.Tensor, rank: int, world: int, capturable: bool = False):
        mesh = model.compiled.mesh
        P = mesh.expert_parallel
        groups = getattr(model, "groups", None)
        self._pg = {"world": None, "experts": groups.expert_dp_group if groups is not None else None}
        self._size = {"world": world, "experts": mesh.data_parallel}
        index = {"world": rank, "experts": rank // P}
        self.pieces: list[_Piece] = []
        self._of: dict = {}  # (id(parameter), slot) -> its piece
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            expert = ".experts." in name
            group = "experts" if expert else "world"
            slots = range(p.shape[0]) if expert else [None]
            for slot in slots:
                pc = _split(p, slot, group, self._size[group], index[group])
                self.pieces.append(pc)
                self._of[(id(p), slot)] = pc
                # make_optimizer's rule (runtime/optim.py): decay on matrices except the embedding
                (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(pc.local)
        groups_ = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups_, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True,
                                       capturable=capturable)
        self._by_param = self._make_state(model)
        self.found_inf: Optional[torch.Tensor] = None
        self._meshes: dict = {}

    def _make_state(self, model) -> dict:
        """AdamW's state made now (step 0, zero moments, as ``prime_optimizer`` makes it): a
        parameter's moments are one buffer each, its pieces' rows back to back, and each piece's
        moments views of it. Returns {id(parameter): {"exp_avg": buffer, "exp_avg_sq": buffer}}:
        what ``state[parameter]`` answers, as torch's AdamW does, so the bytes a rank holds for a
        parameter are counted from its parameter (runtime/memory.py)."""
        by_param: dict = {}
        of_param: dict = defaultdict(list)
        for pc in self.pieces:
            of_param[id(pc.param)].append(pc)
        for p in model.parameters():
            pieces = of_param.get(id(p))
            if not pieces:
                continue
            n = sum(pc.local.numel() for pc in pieces)
            m, v = (torch.zeros(n, dtype=p.dtype, device=p.device) for _ in range(2))
            offset = 0
            for pc in pieces:
                k = pc.local.numel()
                self.inner.state[pc.local] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": m[offset:offset + k].view_as(pc.local),
                    "exp_avg_sq": v[offset:offset + k].view_as(pc.local)}
                offset += k
            by_param[id(p)] = {"exp_avg": m, "exp_avg_sq": v}
        return by_param

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self) -> "_State":
        """The inner AdamW's state (keyed by the row views it updates), and for a model parameter
        its moments' buffers (this rank's rows of every piece of it)."""
        return _State(self.inner.state, self._by_param)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for pc in self.pieces:
            pc.local.grad = None
            if pc.slot in (None, 0):
                if set_to_none:
                    pc.param.grad = None
                elif pc.param.grad is not None:
                    pc.param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's rows (the fused kernel skips when ``found_inf``), then every
        rank's rows all-gathered into the whole parameters."""
        for pc in self.pieces:  # a parameter without a gradient is left alone, as AdamW leaves it
            g = pc.param.grad
            pc.local.grad = None if g is None else pc.rows(g, pc.index)
        self.inner.found_inf = self.found_inf
        self.inner.step()
        self._gather()

    @torch.no_grad()
    def _gather(self) -> None:
        """Per group, one all-gather of every piece's rows, each padded to its largest piece:
        rank i's buffer holds its rows of every piece, so a piece's rows from all ranks are one
        column block of the gathered [N, width] matrix, written back with one strided copy."""
        for group in ("world", "experts"):
            size = self._size[group]
            pieces = [pc for pc in self.pieces if pc.group == group and pc.size > 1]
            if size == 1 or not pieces:
                continue
            width = [pc.chunk * pc.row_numel() for pc in pieces]
            mine = torch.zeros(sum(width), dtype=pieces[0].local.dtype, device=pieces[0].local.device)
            offset = 0
            for pc, w in zip(pieces, width):
                mine[offset:offset + pc.local.numel()].copy_(pc.local.reshape(-1))
                offset += w
            every = torch.empty(size, mine.numel(), dtype=mine.dtype, device=mine.device)
            with Traffic.waiting("other"):
                dist.all_gather(list(every.unbind(0)), mine, group=self._pg[group])
            offset = 0
            for pc, w in zip(pieces, width):
                flat = pc.whole(pc.param.detach()).view(-1)  # a view: written in place
                full, rest = divmod(flat.numel(), w) if w else (0, 0)
                if full:  # the ranks with a whole chunk
                    flat[:full * w].view(full, w).copy_(every[:full, offset:offset + w])
                if rest:  # the one with a shorter chunk (those after it have none)
                    flat[full * w:].copy_(every[full, offset:offset + rest])
                offset += w

    # ------------------------------------------------------------------ checkpoints

    def _mesh(self, group: str, device):
        """The 1-D device mesh of a group (made without a collective: the group exists)."""
        if group not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            pg = self._pg[group] if self._pg[group] is not None else dist.group.WORLD
            self._meshes[group] = DeviceMesh.from_group(pg, device.type)
        return self._meshes[group]

    def checkpoint_state(self, param, slot: Optional[int]) -> dict:
        """The optimizer state of ``param`` (at ``slot``) for DCP: each moment a ``DTensor``
        sharded on dim 0 over the group, over this rank's own storage; the step count as it is."""
        from torch.distributed.tensor import DTensor, Shard

        pc = self._of[(id(param), slot)]
        out = {}
        for k, v in self.inner.state.get(pc.local, {}).items():
            if not torch.is_tensor(v):
                continue
            whole = pc.whole(param)
            if v.dim() == 0 or pc.size == 1:
                out[k] = v
            else:
                out[k] = DTensor.from_local(v, self._mesh(pc.group, v.device), [Shard(0)], run_check=False,
                                            shape=whole.shape, stride=_contiguous_stride(whole.shape))
        return out


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


# ---------------------------------------------------------------------------------------- full

def fully_shard_model(model, rank: int, world: int) -> None:
    """``placement.shard: full``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over each layer,
    composed with expert parallelism as torchtitan composes it (``apply_fsdp`` in
    torchtitan/models/*/infra/parallelize.py): a layer's dense modules form one unit sharded over
    every rank; its experts form their own unit, sharded over the expert-data-parallel mesh
    dimension (the D ranks holding the same experts), on dim 1 of the stacked ``[E_local, d, h]``
    tensors (dim 2 where D does not divide dim 1: FSDP2 splits dims past 0 only evenly), so that
    each slot (one global expert, a checkpoint key) is split within itself.

    Each unit's parameters are all-gathered just before the module the graph calls runs
    (forward, and again in backward), and its gradients reduce-scattered after backward, summed:
    each rank back-propagates loss / world already (runtime/step.py). The parameters between
    steps, their gradients and AdamW's moments are ``DTensor``s holding this rank's rows.

    Refused: an expert copied inside an EP group (``placement.experts.replicas``): FSDP sums a
    unit's gradients over one mesh, and such a slot's copies sit on other ranks of the same EP
    group (``optimizer`` sharding handles them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from moedsl.errors import MoedslError

    mesh = model.compiled.mesh
    P, D = mesh.expert_parallel, mesh.data_parallel
    for name, lp in model.compiled.placements.items():
        copied = [e for e, hosts in enumerate(lp.hosts) if len(hosts) > 1]
        if copied:
            raise MoedslError(f"placement.shard full: {name} copies expert {copied[0]} on {len(lp.hosts[copied[0]])} "
                              "ranks of an EP group (placement.experts.replicas); FSDP sums an expert's gradient "
                              "over its data-parallel copies only: use placement.shard optimizer with replicas")
    device = next(model.parameters()).device.type
    # meshes of their own (new process groups): FSDP's collectives never share a group with the
    # model's all-to-alls, whose order against them backward does not fix
    dense = init_device_mesh(device, (world,), mesh_dim_names=("dp_shard",))
    experts = init_device_mesh(device, (D, P), mesh_dim_names=("edp", "ep"))["edp"]
    units: dict = {}  # layer -> (dense modules, expert modules), in the graph's call order
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        mod = model.get_submodule(node.target)
        if not any(True for _ in mod.parameters(recurse=True)):
            continue
        layer = node.target.rsplit(".", 1)[0] if node.target.startswith("layers.") else node.target
        dense_mods, expert_mods = units.setdefault(layer, ([], []))
        target = expert_mods if node.target.endswith(".experts") else dense_mods
        if mod not in target:
            target.append(mod)
    def expert_dim(p):  # FSDP2 splits a dim other than 0 only evenly
        return Shard(next(i for i in range(1, p.dim()) if p.shape[i] % D == 0))

    for name, p in model.named_parameters():
        if ".experts." in name and not any(p.shape[i] % D == 0 for i in range(1, p.dim())):
            raise MoedslError(f"placement.shard full: {name} {list(p.shape)}: no dim of an expert's tensor "
                              f"divides over its {D} expert-data-parallel copies (FSDP2 splits those evenly); "
                              "use placement.shard optimizer")
    for dense_mods, expert_mods in units.values():
        for mod in expert_mods:
            fully_shard(mod, mesh=experts, shard_placement_fn=expert_dim)
        if dense_mods:
            fully_shard(dense_mods if len(dense_mods) > 1 else dense_mods[0], mesh=dense)
    fully_shard(model, mesh=dense)
    for mod in model.modules():
        if hasattr(mod, "set_gradient_divide_factor"):
            mod.set_gradient_divide_factor(1.0)  # a sum: the objective is divided by world already
            mod.set_force_sum_reduction_for_comms(True)  # SUM, not PREMUL_SUM (which gloo does not have)


def full_optimizer(model, o, lr: torch.Tensor, capturable: bool) -> torch.optim.AdamW:
    """make_optimizer's AdamW over the DTensor parameters, the experts' in groups of their own: the
    fused kernel runs once per group, and a group's tensors must share one device mesh."""
    groups = []
    for experts in (False, True):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if (".experts." in name) == experts:
                (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
        groups += [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True, capturable=capturable)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedSync:
    """GradSync's part of the step under ``full``: FSDP has summed each gradient over its ranks
    by the end of backward, each rank keeping its rows; what is left is the clip by the global
    norm. Every parameter's rows lie on exactly one rank of its data-parallel group, and each EP
    group holds every expert once, so the squared norms of every rank's rows, summed over all
    ranks (one all-reduce), are the single-process model's."""

    def __init__(self, model, world: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world
        self.launched: list = []  # GradSync's fields that moedsl verify reads: FSDP launches its own
        self.from_hooks = 0

    def start(self) -> None:
        pass

    def __call__(self) -> None:
        pass

    def close(self) -> None:
        pass

    @torch.no_grad()
    def clip(self, max_norm: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As ``GradSync.clip``: the norm before clipping (of the unscaled gradient); the gradients
        divided by the loss scale and clipped in place; a non-finite norm is the step's found_inf."""
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        dev = self.params[0].device if self.params else torch.device("cpu")
        f32 = torch.float32
        sq = torch.stack(torch._foreach_norm(grads)).to(f32).square().sum() if grads else \
            torch.zeros((), dtype=f32, device=dev)
        if self.world > 1:
            with Traffic.waiting("gradients"):
                dist.all_reduce(sq)
        return unscale_and_clip(grads, sq.sqrt(), max_norm, inv_scale)
