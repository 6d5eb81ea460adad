"""Placement pass: which experts (and replicas) live on which rank, per MoE layer.

Ranks form a mesh of expert_parallel (EP) × data_parallel (DP): rank = dp_index · EP +
ep_rank, so an EP group is a run of consecutive ranks (inside a node when it fits). A
layer's experts are sharded over the EP ranks by the spec's strategy; a replicated
expert ("hot", FasterMoE's shadowing) is on several EP ranks. The pass records a
``LayerPlacement`` per MoE layer and makes each layer's ``Experts`` module with the experts
this rank hosts.

``dispatch`` says how a source splits its rows of a replicated expert over the copies:

- ``position`` (placement.replication's default): the source's k-th row of the expert goes to
  copy k mod copies (a capacity buffer: slot i of the source's [C] block to copy i mod copies),
  so every copy takes an equal share of each source's rows (±1), whatever the sources' loads:
  the share EPLB's placement assumes (DeepSeek's EPLB sizes replicas by load / copies);
- ``source`` (static ``placement.experts.replicas``): all of source s's rows go to copy
  s mod copies; a copy's share is the load of the sources it serves;
- ``nearest``: the source's own copy, else split by position over the copies on its node,
  else over all copies.

With ``placement.replication`` a layer holds E + R physical slots, (E + R) / EP on each EP rank,
described by ``phy2log`` (slot j, on EP rank j // ((E + R) / EP), holds logical expert
``phy2log[j]``; EPLB's name, DeepSeek's ``rebalance_experts``). The runtime moves experts between
slots while training (runtime/replicate.py); the compiled graph's shapes do not change, since
every rank keeps its slot count.

Static replicas keep ``source`` dispatch: a run (and a checkpoint resumed) with a spec written
before ``position`` existed computes the same rows on the same ranks, bit for bit, and the
plan prices its trips in whole capacity blocks; its user placed the copies by hand, knowing
which sources feed them. A placement computed from the load (EPLB, shadowing) is only as even
as its copies' shares are equal, hence ``position`` there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from moedsl import spec as S
from moedsl.mesh import MeshShape

from ..lower import Lowered, make_experts


@dataclass(frozen=True)
class LayerPlacement:
    hosts: tuple  # per global expert: the EP ranks holding a copy
    slots: tuple  # per EP rank: the global expert ids of its slots, in slot order
    ep: int
    dispatch: str = "source"  # position | source | nearest: how a source's rows split over an expert's copies
    per_node: int = 0  # EP ranks per node (nearest dispatch); 0: all on one node

    @staticmethod
    def of(phy2log, ep: int, dispatch: str = "source", per_node: int = 0,
           experts: Optional[int] = None) -> "LayerPlacement":
        """The placement of physical slots ``phy2log`` (rank-major, len(phy2log) / ep per rank) of
        ``experts`` logical experts (default: the largest id + 1). Raises ValueError naming the
        slot or the expert when an expert has no slot, a rank holds it twice or it does not exist."""
        phy2log = [int(e) for e in phy2log]
        if len(phy2log) % ep:
            raise ValueError(f"{len(phy2log)} slots do not divide over {ep} expert-parallel ranks")
        per = len(phy2log) // ep
        E = experts if experts is not None else max(phy2log) + 1 if phy2log else 0
        hosts = [[] for _ in range(E)]
        for j, e in enumerate(phy2log):
            if not 0 <= e < E:
                raise ValueError(f"slot {j} holds expert {e}: the experts are 0..{E - 1}")
            if j // per in hosts[e]:
                raise ValueError(f"slot {j} puts a second copy of expert {e} on rank {j // per}")
            hosts[e].append(j // per)
        empty = [e for e, h in enumerate(hosts) if not h]
        if empty:
            raise ValueError(f"expert {empty[0]} has no slot")
        slots = tuple(tuple(phy2log[r * per:(r + 1) * per]) for r in range(ep))
        return LayerPlacement(hosts=tuple(tuple(h) for h in hosts), slots=slots, ep=ep, dispatch=dispatch,
                              per_node=per_node)

    @property
    def phy2log(self) -> tuple:
        """Every rank's slots in rank order: the logical expert of each physical slot."""
        return tuple(e for s in self.slots for e in s)

    def send_slots(self, source: int) -> tuple:
        """For source EP rank ``source``: per global expert, the global slot ids of its copies that
        take the source's rows ([E][EP], -1 padded; in ``targets`` order), and how many [E]."""
        return _send_slots(self, source)

    def targets(self, expert: int, source: int) -> tuple:
        """The EP ranks among which source EP rank ``source`` splits its rows of ``expert`` by
        position (its k-th row to ``targets[k mod len(targets)]``); one rank: all of them go there."""
        key = (expert, source)
        if key not in self._target_cache:
            self._target_cache[key] = _targets(self, expert, source)
        return self._target_cache[key]

    @functools.cached_property
    def _target_cache(self) -> dict:  # (expert, source) -> targets, filled as asked
        return {}

    def host_for(self, expert: int, source: int) -> int:
        """The EP rank that takes ``expert``'s rows from ``source``, where one takes them all
        (``source`` dispatch, or an expert with one copy)."""
        t = self.targets(expert, source)
        if len(t) != 1:
            raise ValueError(f"{self.dispatch} dispatch splits expert {expert}'s rows over ranks {t}")
        return t[0]

    def split(self, expert: int, source: int, rows: int, offset: int = 0) -> list:
        """[(EP rank, rows)]: how ``source`` splits rows [offset, offset + rows) of ``expert``
        (positions in its block or its order of rows) over ``targets``."""
        t = self.targets(expert, source)
        return [(r, position_share(rows, len(t), c, offset)) for c, r in enumerate(t)]

    @functools.cached_property
    def _single_counts(self) -> tuple:
        counts = [0] * self.ep
        for hosts in self.hosts:
            if len(hosts) == 1:
                counts[hosts[0]] += 1
        return tuple(counts)

    @functools.cached_property
    def _replicated(self) -> tuple:
        return tuple(e for e, hosts in enumerate(self.hosts) if len(hosts) > 1)

    def sends(self, source: int, rows: int = 1, offset: int = 0) -> list:
        """Rows source EP rank ``source`` sends to each EP rank from a buffer of ``rows`` rows per
        expert from slot ``offset`` (a capacity layer's [E, C]; rows = 1 under ``source``
        dispatch: whole blocks)."""
        counts = [rows * n for n in self._single_counts]
        for e in self._replicated:
            for r, n in self.split(e, source, rows, offset):
                counts[r] += n
        return counts

    def receives(self, dest: int, rows: int = 1) -> list:
        """Rows EP rank ``dest`` receives from each source EP rank, as ``sends``."""
        return [self.sends(s, rows)[dest] for s in range(self.ep)]

    @functools.cached_property
    def uniform(self) -> bool:
        """Every EP rank hosts the same number of experts and no expert is replicated."""
        return len({len(s) for s in self.slots}) == 1 and all(len(h) == 1 for h in self.hosts)


@functools.lru_cache(maxsize=256)
def place_layer(placement: S.Placement, moe_index: int, num_experts: int, ep: int) -> LayerPlacement:
    """The same for every rank (and cached: a repeated layer is placed once)."""
    strategy = placement.strategy
    rep = placement.replication
    if rep is not None and ep > 1:  # E + R slots; moved while training (runtime/replicate.py)
        per_node = min(ep, placement.mesh.devices_per_node) if placement.mesh else 0  # 0: one node
        return LayerPlacement.of(initial_phy2log(num_experts, rep.redundant), ep, rep.dispatch, per_node, num_experts)
    if ep == 1:  # one rank hosts every expert, once
        hosts = [(0,)] * num_experts
    elif strategy == "explicit":
        hosts = [tuple(r) for r in placement.map_for(moe_index)]
    else:
        per = max(num_experts // ep, 1)
        if strategy == "contiguous":
            hosts = [(e // per,) for e in range(num_experts)]
        else:
            hosts = [(e % ep,) for e in range(num_experts)]
        for e, copies in placement.replicas:
            if e < num_experts:  # extra copies on the next ranks after the home rank
                hosts[e] = tuple((hosts[e][0] + i) % ep for i in range(min(copies, ep)))
    slots = [[] for _ in range(ep)]
    for e, hs in enumerate(hosts):
        for r in hs:
            slots[r].append(e)
    return LayerPlacement(hosts=tuple(hosts), slots=tuple(tuple(s) for s in slots), ep=ep)


def initial_phy2log(num_experts: int, redundant: int) -> tuple:
    """The placement before any load is measured: slot j holds expert j mod E, so the first R
    experts have a second copy (what a balancing policy makes of an even load, up to order). No
    rank holds two copies while (E + R) / EP <= E (the mesh check asks R <= E · (EP - 1))."""
    return tuple(j % num_experts for j in range(num_experts + redundant))


def position_share(rows: int, copies: int, copy: int, offset: int = 0) -> int:
    """How many of positions [offset, offset + rows) are ≡ ``copy`` (mod ``copies``): the rows
    copy ``copy`` takes under position dispatch (the first ``rows mod copies`` one more)."""
    first = (copy - offset) % copies  # the first position of the range that goes to this copy
    return max(0, (rows - first + copies - 1) // copies)


def _targets(lp: LayerPlacement, expert: int, source: int) -> tuple:
    return targets_of(lp.hosts[expert], source, lp.dispatch, lp.per_node)


def targets_of(hosts, source: int, dispatch: str, per_node: int = 0) -> tuple:
    """The EP ranks over which source rank ``source`` splits its rows of an expert held on
    ``hosts`` by position: ``position``, all the copies; ``source``, the one copy ``source mod
    copies``; ``nearest``, the source itself if it holds a copy, else the copies on its node
    (``per_node`` ranks a node; 0: one node), else all. The runtime's dispatch tables
    (``LayerPlacement.targets``) and the cost model (compiler/replication.py) both use it."""
    if len(hosts) == 1 or dispatch == "source":
        return (hosts[source % len(hosts)],)
    if dispatch == "nearest":
        if source in hosts:
            return (source,)
        if per_node:
            near = tuple(h for h in hosts if h // per_node == source // per_node)
            if near:
                return near
    return tuple(hosts)


@functools.lru_cache(maxsize=4096)
def _send_slots(lp: LayerPlacement, source: int) -> list:
    """Per global expert, the global slot ids of its ``targets`` for ``source``, padded to the EP
    size with -1 ([E, EP]: a shape that no placement of the layer changes), and their count [E]."""
    offsets = [0]
    for r in range(lp.ep):
        offsets.append(offsets[-1] + len(lp.slots[r]))
    where = {}
    for r, slots in enumerate(lp.slots):
        for i, e in enumerate(slots):
            where[(r, e)] = offsets[r] + i
    table, copies = [], []
    for e in range(len(lp.hosts)):
        t = [where[(r, e)] for r in lp.targets(e, source)]
        table.append(t + [-1] * (lp.ep - len(t)))
        copies.append(len(t))
    return table, copies


def placement_pass(low: Lowered, spec: S.Spec, mesh: MeshShape, rank: int, device, seed: int,
                   init: bool = True) -> dict:
    """Make each MoE layer's Experts module for ``rank``; returns {layer name: LayerPlacement}.
    (A graph-only lowering gets no modules.)"""
    ep_rank = rank % mesh.expert_parallel
    out = {}
    for info in low.moe:
        lp = place_layer(spec.placement, info.moe_index, info.config.experts.count, mesh.expert_parallel)
        out[info.name] = lp
        if not low.graph_only:
            low.modules[f"{info.name}.experts"] = make_experts(spec, info, lp.slots[ep_rank], device, seed, init)
        for node in low.graph.nodes:
            if node.meta.get("moe_layer") == info.name:
                node.meta["placement"] = lp
    return out
