"""Replicated experts that follow the measured load while training (``placement.replication``).

A layer holds E + R physical slots, (E + R) / EP on each expert-parallel rank; ``phy2log``
names the logical expert in each slot (compiler/passes/placement.py ``LayerPlacement.of``).
Replicas of one expert hold the same weights and moments; dispatch splits each source's tokens
over them (``placement.replication.dispatch``, compiler/passes/placement.py); their gradients
are summed over the ranks holding them (runtime/grads.py), so every copy takes the same AdamW
step and the model is the model without replicas. What
moves is where an expert computes, never what (FasterMoE, He et al. 2022, §4: shadowed
experts' gradients are reduced to the owner; DeepSeek's EPLB: redundant experts by load).

    every step   (``observe``) each MoE layer's computed assignments per logical expert
                 (``RouterStats.tokens_per_expert``, this rank's tokens), the last W steps kept
                 on the device: no collective, no read to the host
    every N steps, after the optimizer step (``migrate``):
                 the window's loads summed over every rank (one all-reduce)
              -> the policy, per layer: ``policy(load, LayerInfo) -> phy2log`` (rank 0's answer,
                 broadcast: every rank applies the same one)
              -> the moves: a slot whose expert is not on its rank already takes it from one of
                 the expert's old holders: the weights and both AdamW moments, as rows of bytes
                 in one all-to-all per layer over the EP group (point to point: each row goes
                 from one holder to one rank that needs it); a slot whose expert is on its rank
                 copies it there
              -> ``expert_ids``, the dispatch tables (collectives ``rebind``) and the gradient
                 sync's groups follow; what moved and how long it took go to metrics.jsonl

The slots per rank never change, so the compiled graph, the parameters' shapes and the
optimizer's state keep theirs. Everything logical stays logical: checkpoints store experts by
id (a checkpoint loads whatever the placement), router statistics and ``inspect`` count
logical experts, and a run on one process (``inspect``, ``export``, ``eval``) has one copy of
each.

A checkpoint also records where the run stands (``record``, meta.json ``replication``: each
layer's phy2log, the settings, the world and EP sizes; ``window_state``: each rank's load window
as ``extra/`` tensors). A resume with the same settings, world and EP size moves the logically
loaded experts there, as a migration would, and refills the window (``restore``), so its later
migrations are the uninterrupted run's; any other resume starts from its own initial placement.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from moedsl import spec as S
from moedsl.compiler.collectives import CapacityAllToAll, PackedAllToAll, Traffic
from moedsl.compiler.passes.placement import LayerPlacement
from moedsl.compiler.replication import layer_cost, place
from moedsl.errors import MoedslError

from .grads import WORLD, GradSync


@dataclass(frozen=True)
class LayerInfo:
    """What a policy knows of one MoE layer besides its load."""

    name: str  # "layers.3"
    moe_index: int  # its place among the MoE layers (``spec.moe_layers``' moe_index)
    experts: int  # E logical experts
    slots: int  # E + R physical slots, slots // ep on each rank
    ep: int  # expert-parallel ranks
    nodes: int  # nodes the EP group spans
    groups: Optional[int]  # the gate's expert groups (group-limited routing); None without
    phy2log: tuple  # the placement now
    replication: S.Replication


Policy = Callable[[list, LayerInfo], Sequence[int]]


def spec_policy(spec) -> Policy:
    """The policy ``placement.replication.policy`` names: compiler/replication.py's ``place``
    (EPLB, FasterMoE's shadowing) with this layer's mesh, expert groups and cost figures."""
    rep = spec.placement.replication
    layers = sorted(spec.moe_layers, key=lambda layer: layer.moe_index)

    def policy(load: list, info: LayerInfo) -> Sequence[int]:
        cost = None if rep.policy == "eplb" else \
            layer_cost(spec, layers[info.moe_index], devices_per_node=info.ep // info.nodes)  # shadow's model
        return place(rep, load, info.ep, info.nodes, info.groups, cost=cost)
    return policy


@dataclass(frozen=True)
class Move:
    """One expert copied from one rank's slot to another rank's slot (EP ranks, local slots)."""

    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_moves(old: LayerPlacement, new: LayerPlacement) -> list:
    """The copies between ranks that turn ``old`` into ``new``: a slot whose expert its rank held
    before copies it locally (no move); any other takes it from an old holder, picked by the
    receiving rank modulo the holders (spreading the sends). Sorted by (source, destination,
    destination slot): the order rows leave and arrive in."""
    moves = []
    for r, slots in enumerate(new.slots):
        for j, e in enumerate(slots):
            if e in old.slots[r]:
                continue
            holders = old.hosts[e]
            src = holders[r % len(holders)]
            moves.append(Move(e, src, old.slots[src].index(e), r, j))
    return sorted(moves, key=lambda m: (m.src, m.dst, m.dst_slot))


def _slot_tensors(mod, optimizer) -> list:
    """The tensors of an Experts module with one row per slot: each parameter, then its optimizer
    state of the same leading size (AdamW's exp_avg and exp_avg_sq; the step count is shared)."""
    out = []
    for p in mod.parameters(recurse=False):
        out.append(p.data)
        for k, v in sorted(optimizer.state.get(p, {}).items()) if optimizer is not None else ():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0]:
                out.append(v)
    return out


@torch.no_grad()
def move_experts(mod, optimizer, old: LayerPlacement, new: LayerPlacement, ep_rank: int, group) -> list:
    """Rewrite this rank's slots of Experts module ``mod`` (and their optimizer state) from placement
    ``old`` to ``new``, in place; every rank of the EP group calls it with the same placements.
    Returns the moves (``plan_moves``)."""
    moves = plan_moves(old, new)
    tensors = _slot_tensors(mod, optimizer)
    fresh = [t.clone() for t in tensors]
    local = old.slots[ep_rank]
    for j, e in enumerate(new.slots[ep_rank]):
        if e in local and local.index(e) != j:
            for t, f in zip(tensors, fresh):
                f[j] = t[local.index(e)]
    if moves:  # every rank knows every move: the collective is skipped everywhere or nowhere
        sizes = [t[0].numel() * t.element_size() for t in tensors]
        row = sum(sizes)
        out = [m for m in moves if m.src == ep_rank]  # already in (destination, slot) order
        inc = sorted((m for m in moves if m.dst == ep_rank), key=lambda m: (m.src, m.dst_slot))
        send = torch.stack([torch.cat([t[m.src_slot].reshape(-1).view(torch.uint8) for t in tensors])
                            for m in out]) if out else tensors[0].new_empty((0, row), dtype=torch.uint8)
        got = send.new_empty((len(inc), row))
        P = old.ep
        with Traffic.waiting("other"):
            dist.all_to_all_single(got, send, [sum(1 for m in inc if m.src == s) for s in range(P)],
                                   [sum(1 for m in out if m.dst == d) for d in range(P)], group=group)
        for k, m in enumerate(inc):
            at = 0
            for t, f, n in zip(tensors, fresh, sizes):
                f[m.dst_slot] = got[k, at:at + n].view(t.dtype).view_as(t[0])
                at += n
    for t, f in zip(tensors, fresh):
        t.copy_(f)
    mod.expert_ids.copy_(torch.tensor(new.slots[ep_rank], dtype=torch.int64))
    for p in mod.parameters(recurse=False):
        p.grad = None  # the last step's, of the experts that sat there
    return moves


def _trips(model) -> list:
    """Every dispatch module of the model (the overlap pass's chunks hold theirs in a list)."""
    found = []
    for mod in model.modules():
        for m in [mod] + list(getattr(mod, "trip", [])) + list(getattr(mod, "fwd", [])):
            if isinstance(m, (CapacityAllToAll, PackedAllToAll)) and all(m is not f for f in found):
                found.append(m)
    return found


class Replicator:
    """The replication runtime of one rank's model: ``observe`` after every step, ``migrate`` when
    ``observe`` says so. Made by ``for_run``, which also applies the policy's placement for an
    even load (the initial placement)."""

    def __init__(self, step, spec, rank: int, policy: Policy):
        self.step, self.spec, self.rank = step, spec, rank  # step: the TrainStep (its sync is replaced)
        self.model = step.model
        self.rep: S.Replication = spec.placement.replication
        self.policy = policy
        compiled = self.model.compiled
        self.mesh = compiled.mesh
        self.ep = self.mesh.expert_parallel
        self.ep_rank = rank % self.ep
        per_node = min(self.ep, self.mesh.devices_per_node)
        self.nodes = self.ep // per_node if self.ep % per_node == 0 else 1
        self.layers = list(compiled.placements)  # MoE layer names, the same order on every rank
        self.window: dict = {name: deque(maxlen=self.rep.window) for name in self.layers}
        self.experts = {name.rsplit(".", 1)[0]: mod for name, mod in self.model.named_modules()
                        if name.endswith(".experts")}
        modules = dict(self.model.named_modules())
        self._gate_groups = {name: getattr(getattr(getattr(modules.get(f"{name}.gate"), "spec", None), "groups", None),
                                           "count", None) for name in self.layers}
        self.ep_group = self.model.groups.topo.ep_group
        self.device = self.experts[self.layers[0]].expert_ids.device  # NCCL's collectives take device tensors
        # the sync's process groups by ranks, reused by the syncs of later placements
        self._made = {("world" if k == WORLD else k): g for k, g in step.sync._pg.items() if g is not None}

    @classmethod
    def for_run(cls, step, spec, rank: int, policy: Optional[Policy] = None) -> Optional["Replicator"]:
        """The replicator of a run (None without ``placement.replication`` or on one EP rank), its
        experts already where ``policy`` (default: the spec's) puts them for an even load."""
        rep = spec.placement.replication
        if rep is None or step.model.compiled.mesh.expert_parallel == 1:
            return None
        r = cls(step, spec, rank, policy or spec_policy(spec))
        r.migrate(0, initial=True)
        return r

    def info(self, name: str) -> LayerInfo:
        lp = self.model.compiled.placements[name]
        return LayerInfo(name=name, moe_index=self.layers.index(name), experts=len(lp.hosts), slots=len(lp.phy2log), ep=self.ep, nodes=self.nodes,
                         groups=self._gate_groups.get(name), phy2log=lp.phy2log, replication=self.rep)

    def observe(self, step: int, router_stats) -> bool:
        """Keep step ``step``'s (0-based) loads; True when the placement is due to move after it."""
        for s in router_stats:
            if s.layer in self.window:
                self.window[s.layer].append(s.tokens_per_expert.detach().float())
        return (step + 1) % self.rep.every == 0

    def _loads(self, initial: bool) -> list:
        """Per layer, the load of each logical expert over the window, summed over every rank."""
        sizes = [len(self.model.compiled.placements[n].hosts) for n in self.layers]
        if initial:
            return [[1.0] * E for E in sizes]
        dev = self.device
        flat = torch.cat([torch.stack(list(self.window[n])).sum(0) if self.window[n] else torch.zeros(E, device=dev)
                          for n, E in zip(self.layers, sizes)]).to(dev)
        with Traffic.waiting("other"):
            dist.all_reduce(flat)
        return [chunk.tolist() for chunk in torch.split(flat.cpu(), sizes)]

    def _ask(self, name: str, load: list) -> tuple:
        """The policy's phy2log for layer ``name``, checked."""
        info = self.info(name)
        phy = tuple(int(e) for e in self.policy(load, info))
        what = f"placement.replication: the {self.rep.policy} policy's placement of the MoE layer {name}"
        if len(phy) != info.slots:
            raise MoedslError(f"{what} has {len(phy)} slots, not {info.slots} ({info.experts} experts + "
                              f"{info.slots - info.experts} redundant)")
        try:
            LayerPlacement.of(phy, self.ep, experts=info.experts)
        except ValueError as e:
            raise MoedslError(f"{what}: {e}") from None
        return phy

    def migrate(self, step: int, initial: bool = False) -> dict:
        """Place every layer's experts from the window's load and move them: what moved (per
        layer: [expert, from EP rank, to EP rank] and the new phy2log), the bytes sent over
        the EP group and the seconds it took (the slowest rank's)."""
        t0 = time.perf_counter()
        loads = self._loads(initial)
        return self._place([self._ask(n, load) for n, load in zip(self.layers, loads)], step, t0)

    def _place(self, wanted: list, step: int, t0: float) -> dict:
        """Move every layer's experts to ``wanted`` (a phy2log per layer, ``self.layers``' order)."""
        # rank 0's answer for all: a policy that differs by a rounding between ranks cannot split them
        agreed = torch.tensor([e for phy in wanted for e in phy], dtype=torch.int64, device=self.device)
        dist.broadcast(agreed, src=0)
        agreed = agreed.tolist()
        compiled, trips = self.model.compiled, _trips(self.model)
        previous = [compiled.placements[n].phy2log for n in self.layers]
        out, sent, at = {}, 0, 0
        for name, phy in zip(self.layers, wanted):
            phy, at = tuple(agreed[at:at + len(phy)]), at + len(phy)
            old = compiled.placements[name]
            if phy == old.phy2log:
                out[name] = {"moved": [], "phy2log": list(phy)}
                continue
            new = LayerPlacement.of(phy, old.ep, old.dispatch, old.per_node, len(old.hosts))
            mod = self.experts[name]
            moves = move_experts(mod, self.step.opt, old, new, self.ep_rank, self.ep_group)
            row = sum(t[0].numel() * t.element_size() for t in _slot_tensors(mod, self.step.opt))
            sent += row * len(moves)
            for trip in trips:
                if trip.lp is old:
                    trip.rebind(new)
            for node in compiled.module.graph.nodes:
                if node.meta.get("placement") is old:
                    node.meta["placement"] = new
            compiled.placements[name] = new
            out[name] = {"moved": [[m.expert, m.src, m.dst] for m in moves], "phy2log": list(phy)}
        if any(compiled.placements[n].phy2log != tuple(before) for n, before in zip(self.layers, previous)):
            self._new_sync()
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=self.device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return {"step": step, "seconds": float(seconds), "bytes": sent * self.mesh.data_parallel, "layers": out}

    def _new_sync(self) -> None:
        """The gradient sync of the new placement (its groups made once per set of holders)."""
        old = self.step.sync
        old.close()
        self.step.sync = GradSync(self.model, self.mesh, self.rank, mode=old.mode, bucket_mb=old.bucket_bytes / 2**20,
                                  groups=self._made)

    # ------------------------------------------------------------------ checkpoints

    def _window_key(self, name: str) -> str:
        return f"replication_window_{self.rank}_{name}"  # each rank its own: the loads of its tokens

    def window_state(self) -> dict:
        """This rank's load window per layer as a checkpoint's ``extra`` tensors: [W, E], the last
        ``len(window)`` rows the steps kept (oldest first), zeros before them."""
        out = {}
        for name in self.layers:
            rows = torch.zeros(self.rep.window, len(self.model.compiled.placements[name].hosts), device=self.device)
            if self.window[name]:
                rows[self.rep.window - len(self.window[name]):] = torch.stack(list(self.window[name]))
            out[self._window_key(name)] = rows
        return out

    def record(self, step: int) -> dict:
        """What meta.json records of the replication at checkpoint step ``step`` (rank 0's; every
        rank places alike): the settings, the world and EP sizes, each layer's phy2log, the steps
        the windows hold and the steps since the last migration (the next one comes after
        ``every`` - that many)."""
        return {"settings": asdict(self.rep), "world": dist.get_world_size(), "expert_parallel": self.ep,
                "phy2log": {n: list(self.model.compiled.placements[n].phy2log) for n in self.layers},
                "window_steps": len(self.window[self.layers[0]]), "steps_since_move": step % self.rep.every}

    def _differs(self, record: dict) -> Optional[str]:
        """Why the checkpoint's placement cannot be this run's (one phrase), or None."""
        settings = record.get("settings") or {}
        for k, v in asdict(self.rep).items():
            if settings.get(k) != v:
                return f"placement.replication.{k} {settings.get(k)!r} in the checkpoint, {v!r} now"
        if record.get("world") != dist.get_world_size():
            return f"{record.get('world')} processes wrote it, {dist.get_world_size()} run now"
        if record.get("expert_parallel") != self.ep:
            return f"{record.get('expert_parallel')} expert-parallel ranks wrote it, {self.ep} now"
        if sorted(record.get("phy2log") or {}) != sorted(self.layers):
            return f"its MoE layers {sorted(record.get('phy2log') or {})} are not {sorted(self.layers)}"
        return None

    def restore(self, record: dict, restored: dict, step: int) -> Optional[str]:
        """After a logical checkpoint of step ``step`` is loaded into the initial placement: move
        the experts (weights, both AdamW moments) to the placements its meta.json ``record``s, as
        a migration moves them, and refill the load windows from ``restored`` (``window_state``'s
        tensors, as read back). Returns why not, changing nothing, when the checkpoint was written
        under other settings, world or EP size (every rank decides alike, from meta.json)."""
        why = self._differs(record)
        if why is not None:
            return why
        wanted = []
        for name in self.layers:
            phy = tuple(int(e) for e in record["phy2log"][name])
            try:
                LayerPlacement.of(phy, self.ep, experts=len(self.model.compiled.placements[name].hosts))
            except ValueError as e:
                raise MoedslError(f"the checkpoint's placement of the MoE layer {name}: {e}") from None
            wanted.append(phy)
        missing = [n for n in self.layers if self._window_key(n) not in restored]
        if missing:
            raise MoedslError(f"the checkpoint records a replicated placement but not rank {self.rank}'s load window "
                              f"of {missing[0]} (extra/{self._window_key(missing[0])})")
        self._place(wanted, step, time.perf_counter())
        kept = int(record.get("window_steps", 0))
        for name in self.layers:
            rows = restored[self._window_key(name)].to(self.device).float()
            self.window[name].clear()
            self.window[name].extend(rows[len(rows) - kept:].unbind(0) if kept else ())
        return None
