"""The collectives a compiled graph calls, as modules the collective-insertion pass puts in.

Each holds what the compiler knows (the layer's placement, this rank's place in the
mesh) and, once the runtime binds it, the process groups (``Topology``). They are
autograd-aware: the backward of an all-to-all is the all-to-all of the reverse trip,
and the backward of the token gather sums the gradients of every rank's copy.

The two-stage ("hierarchical") all-to-all first exchanges inside each node, so that
every row bound for local rank l of any node sits on local rank l, then exchanges
between nodes among ranks of equal local index; it delivers exactly what the flat one
delivers, in the same order.

The overlap pass splits a layer's trips into chunks, each an issue node and a wait node
(``start_all_to_all`` / ``finish_all_to_all``: ``async_op=True`` all-to-alls).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moedsl.nn.moe_ops import Packed

from .chunks import chunk_range
from .passes.placement import LayerPlacement, position_share

# ``node.meta["role"]`` of every graph node that calls a collective module of this file, issued or
# waited for: the collective-insertion pass puts in ``route_gather`` (GatherTokens), ``a2a_dispatch``
# and ``a2a_combine`` (the all-to-all trips); the overlap pass splits the trips into each chunk's issue
# (``a2a_dispatch`` / ``a2a_combine``) and its ``a2a_wait``, and exchanges a packed layer's chunk counts
# (``a2a_counts``). The verify pass compares them across ranks; runtime/compile.py never moves
# computation across them.
COLLECTIVE_ROLES = frozenset({"route_gather", "a2a_dispatch", "a2a_combine", "a2a_counts", "a2a_wait"})


@dataclass
class Topology:
    """Process groups of one rank, made by the runtime from the mesh."""

    world_group: Any  # every rank: the routing scope of a batch routed as a whole
    ep_group: Any  # this rank's expert-parallel group
    ep_rank: int
    ep: int
    intra_group: Any = None  # ranks of this EP group on this node (hierarchical all-to-all)
    cross_group: Any = None  # ranks of this EP group with this local index, one per node
    nodes: int = 1  # nodes the EP group spans
    per_node: int = 1  # EP ranks per node

    @property
    def hierarchical(self) -> bool:
        return self.intra_group is not None and self.nodes > 1


class Traffic:
    """Bytes this process sent to other ranks in all-to-alls (payload, both trips), for benchmarks
    that hold measured traffic against the plan's prediction; and the seconds it spent blocked in
    collectives (a blocking call's whole time, or an asynchronous one's ``wait``), for benchmarks
    that measure how much communication a step hides behind compute."""

    sent = 0
    calls = 0
    wait_s = 0.0  # every kind
    wait_by: dict = {}  # kind -> seconds: all_to_all (the MoE layers' trips), gradients (sync, norm), other

    @classmethod
    def reset(cls) -> None:
        cls.sent = cls.calls = 0
        cls.wait_s = 0.0
        cls.wait_by = {}

    @classmethod
    @contextlib.contextmanager
    def waiting(cls, kind: str = "all_to_all"):
        """Count the time inside the block as time blocked on communication, of ``kind``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            cls.wait_s += dt
            cls.wait_by[kind] = cls.wait_by.get(kind, 0.0) + dt


def _flat(x: torch.Tensor, out_rows: list, in_rows: list, group) -> torch.Tensor:
    y = x.new_empty((sum(out_rows),) + tuple(x.shape[1:]))
    with Traffic.waiting():
        dist.all_to_all_single(y, x.contiguous(), out_rows, in_rows, group=group)
    return y


def _reorder(x: torch.Tensor, sizes: list, order: list) -> torch.Tensor:
    """Chunks of ``x`` (consecutive, of ``sizes``) re-concatenated in ``order``."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    parts = [x[starts[i]:starts[i] + sizes[i]] for i in order]
    return torch.cat(parts) if parts else x[:0]


def all_to_all_rows(x: torch.Tensor, counts: list, topo: Topology) -> torch.Tensor:
    """Rows of ``x`` in destination order -> rows received, in source order.

    ``counts[s][d]``: rows EP rank s sends to EP rank d (the whole matrix, known to all)."""
    me, P = topo.ep_rank, topo.ep
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    Traffic.sent += row * (sum(counts[me]) - counts[me][me])
    Traffic.calls += 1
    if not topo.hierarchical:
        return _flat(x, [counts[s][me] for s in range(P)], counts[me], topo.ep_group)
    n_nodes, per = topo.nodes, topo.per_node
    node, local = divmod(me, per)
    rank = lambda n, l: n * per + l  # noqa: E731
    # stage 1, inside the node: to local rank l2 go the rows for (every node n2, l2), n2-major
    order1 = [rank(n2, l2) for l2 in range(per) for n2 in range(n_nodes)]
    send1 = _reorder(x, counts[me], order1)
    in1 = [sum(counts[me][rank(n2, l2)] for n2 in range(n_nodes)) for l2 in range(per)]
    out1 = [sum(counts[rank(node, l)][rank(n2, local)] for n2 in range(n_nodes)) for l in range(per)]
    got1 = _flat(send1, out1, in1, topo.intra_group)  # (source l, dest node n2) order
    # stage 2, between nodes: to node n2 go the rows of every local source l for (n2, local), l-major
    sizes1 = [counts[rank(node, l)][rank(n2, local)] for l in range(per) for n2 in range(n_nodes)]
    order2 = [l * n_nodes + n2 for n2 in range(n_nodes) for l in range(per)]
    send2 = _reorder(got1, sizes1, order2)
    in2 = [sum(counts[rank(node, l)][rank(n2, local)] for l in range(per)) for n2 in range(n_nodes)]
    out2 = [sum(counts[rank(n, l)][me] for l in range(per)) for n in range(n_nodes)]
    return _flat(send2, out2, in2, topo.cross_group)  # (source node, source local) = source rank order


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, topo):
        ctx.counts, ctx.topo = counts, topo
        return all_to_all_rows(x, counts, topo)

    @staticmethod
    def backward(ctx, g):
        back = [list(col) for col in zip(*ctx.counts)]  # the reverse trip: transpose
        return all_to_all_rows(g.contiguous(), back, ctx.topo), None, None


def all_to_all(x: torch.Tensor, counts: list, topo: Topology) -> torch.Tensor:
    return _AllToAll.apply(x, counts, topo)


def by_position(lp: LayerPlacement) -> bool:
    """Whether a packed trip of ``lp`` splits a source's rows of an expert over its copies (needing
    each row's position), rather than sending them all to one."""
    return lp.dispatch != "source" and not lp.uniform


def _same_shape(old: LayerPlacement, new: LayerPlacement) -> None:
    """A placement the compiled graph can follow: the same ranks and slots per rank, and replicas
    where there were (the graph's layout of received rows depends on it)."""
    if [len(s) for s in old.slots] != [len(s) for s in new.slots] or old.uniform != new.uniform:
        raise ValueError(f"a new placement must keep the slots per rank ({[len(s) for s in old.slots]}) and "
                         f"{'no ' if old.uniform else ''}replicas")


class _Collective(nn.Module):
    """Base: holds the Topology once the runtime binds it."""

    def __init__(self):
        super().__init__()
        self.topo: Optional[Topology] = None

    def _need(self) -> Topology:
        if self.topo is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to process groups: run the model through "
                               "moedsl.runtime (or call moedsl.runtime.bind) in a torch.distributed job")
        return self.topo


class CapacityAllToAll(_Collective):
    """Dispatch of a capacity buffer [E, C, d] (global expert order) to the EP ranks hosting the
    experts; returns [E_local, P·C, d] (uniform placement) or rows grouped by local slot.
    ``back`` is the combine trip. Static shapes: the splits follow from C alone.

    With replicas, row i of a source's block of expert e goes to ``targets(e, source)[(o + i)
    mod copies]`` (o: the block's first slot; an overlap chunk's slots start past 0), so position
    dispatch splits every block over the copies, each taking ⌈C / copies⌉ or ⌊C / copies⌋ slots
    of it, and the kept rows, which fill a block from slot 0, ±1 per routing group."""

    def __init__(self, lp: LayerPlacement, ep_rank: int):
        super().__init__()
        self.lp, self.ep_rank = lp, ep_rank
        self.uniform = lp.uniform
        self._tables: dict = {}  # (C, offset) -> _RowTables
        self._cache: dict = {}

    def rebind(self, lp: LayerPlacement) -> None:
        """Follow a new placement of the same slot counts (experts moved between steps): the
        tables are made again at the next use."""
        _same_shape(self.lp, lp)
        self.lp, self._tables, self._cache = lp, {}, {}

    def _rows(self, C: int, offset: int) -> "_RowTables":
        """Send and receive tables of blocks of C rows starting at slot ``offset``, made on first use
        (a compile for inspection never needs them)."""
        key = (C, offset)
        if key not in self._tables:
            self._tables[key] = _RowTables(self.lp, self.ep_rank, C, offset)
        return self._tables[key]

    def _index(self, name: str, t: "_RowTables", device) -> torch.Tensor:
        """An index table as a device tensor, made once (no host-to-device copy in a captured step)."""
        key = (name, t.C, t.offset, str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(getattr(t, name), dtype=torch.int64, device=device)
        return self._cache[key]

    def forward(self, buf: torch.Tensor, offset: int = 0):
        topo = self._need()
        send, counts = self.send_rows(buf, offset)
        return self.received(all_to_all(send, counts, topo), buf.shape[1], offset)

    def send_rows(self, buf: torch.Tensor, offset: int = 0) -> tuple:
        """buf [E, C, d] -> (rows [E·C, d] in send order, the trip's count matrix)."""
        E, C, d = buf.shape
        t = self._rows(C, offset)
        send = buf.reshape(E * C, d).index_select(0, self._index("send", t, buf.device))
        return send, t.counts

    def received(self, got: torch.Tensor, C: int, offset: int = 0):
        """Rows received, by source -> the experts' input: [E_local, P·C, d] (uniform) or rows
        grouped by local slot."""
        d = got.shape[-1]
        if self.uniform:
            P, E_local = self.lp.ep, len(self.lp.slots[self.ep_rank])
            return got.view(P, E_local, C, d).transpose(0, 1).reshape(E_local, P * C, d)
        t = self._rows(C, offset)
        local = self._index("local", t, got.device)
        return Packed(rows=got.index_select(0, local), sizes=self._index("per_slot", t, got.device), index=local)

    def back(self, y, capacity: int, offset: int = 0) -> torch.Tensor:
        topo = self._need()
        got, back = self.back_rows(y, capacity, offset)
        return self.returned(all_to_all(got, back, topo), capacity, offset)

    def back_rows(self, y: torch.Tensor, C: int, offset: int = 0) -> tuple:
        """Expert outputs -> (rows in the order they were received, the return trip's count matrix)."""
        t = self._rows(C, offset)
        P, d = self.lp.ep, y.shape[-1]
        if self.uniform:
            E_local = y.shape[0]
            got = y.view(E_local, P, C, d).transpose(0, 1).reshape(-1, d)
        else:
            got = y.reshape(-1, d).index_select(0, self._index("inverse", t, y.device))
        return got, [list(col) for col in zip(*t.counts)]

    def returned(self, sent: torch.Tensor, C: int, offset: int = 0) -> torch.Tensor:
        """Rows back from the experts (send order) -> [E, C, d] in global expert order."""
        t = self._rows(C, offset)
        d = sent.shape[-1]
        E = len(self.lp.hosts)
        return sent.new_zeros(E * C, d).index_copy(0, self._index("send", t, sent.device), sent).view(E, C, d)


class _RowTables:
    """The row tables of one CapacityAllToAll for blocks of C rows from slot ``offset``.

    send: rows of the flat buffer [E·C] in send order (destination rank, its slot order, position);
    counts: rows each source sends each destination (the whole matrix); local: rows received (by
    source, then as sent) -> grouped by local slot; inverse: the reverse; per_slot: rows per local slot."""

    def __init__(self, lp: LayerPlacement, me: int, C: int, offset: int):
        self.C, self.offset = C, offset
        P = lp.ep
        self.counts = [lp.sends(s, C, offset) for s in range(P)]
        send = []
        for d in range(P):
            for e in lp.slots[d]:
                t = lp.targets(e, me)
                if d in t:  # the positions i with (offset + i) mod copies = its index
                    send.extend(e * C + i for i in range((t.index(d) - offset) % len(t), C, len(t)))
        self.send = send
        if lp.uniform:  # received rows are [P, E_local, C]: a view, no tables
            return
        local = lp.slots[me]
        slot_of_row = []
        for s in range(P):
            for j, e in enumerate(local):
                t = lp.targets(e, s)
                if me in t:
                    slot_of_row += [j] * position_share(C, len(t), t.index(me), offset)
        self.local = sorted(range(len(slot_of_row)), key=lambda i: (slot_of_row[i], i))
        self.inverse = [0] * len(self.local)
        for pos, i in enumerate(self.local):
            self.inverse[i] = pos
        self.per_slot = [slot_of_row.count(j) for j in range(len(local))]


class CapacityAllToAllBack(nn.Module):
    """The combine trip of a CapacityAllToAll (a separate node so the graph shows both)."""

    def __init__(self, forward_module: CapacityAllToAll):
        super().__init__()
        self.fwd = [forward_module]  # a plain list: not a submodule, no duplicate in state_dict

    def forward(self, y: torch.Tensor, routing) -> torch.Tensor:
        return self.fwd[0].back(y, routing.capacity)


@dataclass
class Received:
    """Rows received by the experts of this rank, grouped by local slot."""

    rows: torch.Tensor
    sizes: torch.Tensor  # [E_local]
    order: torch.Tensor  # received (source, slot) order -> local-slot order
    counts: list  # the count matrix of the trip


class PackedAllToAll(_Collective):
    """Dispatch of packed rows (sorted by global destination slot) to the hosting EP ranks; the
    counts are exchanged first (a small all-to-all), so the row exchange has data-dependent splits.

    Under ``source`` dispatch (or without replicas) ``send_slot`` [E] is each expert's slot for this
    source. Else ``send_slot`` [E, EP] holds the slots of the copies the source splits its rows
    over (-1 padded), ``send_copies`` [E] how many: the graph's ``replica_slots`` node gives the
    source's k-th row of expert e slot ``send_slot[e, k mod send_copies[e]]``."""

    def __init__(self, lp: LayerPlacement, ep_rank: int):
        super().__init__()
        self.lp, self.ep_rank = lp, ep_rank
        self.n_local = [len(s) for s in lp.slots]
        self.by_position = by_position(lp)
        table, copies = self._tables(lp)
        self.register_buffer("send_slot", table, persistent=False)
        if self.by_position:
            self.register_buffer("send_copies", copies, persistent=False)

    def _tables(self, lp: LayerPlacement) -> tuple:
        table, copies = lp.send_slots(self.ep_rank)
        if not self.by_position:
            return torch.tensor([t[0] for t in table], dtype=torch.int64), None
        return torch.tensor(table, dtype=torch.int64), torch.tensor(copies, dtype=torch.int64)

    def rebind(self, lp: LayerPlacement) -> None:
        """Follow a new placement of the same slot counts: the send tables are rewritten in place
        (the graph reads them as attributes)."""
        _same_shape(self.lp, lp)
        self.lp = lp
        table, copies = self._tables(lp)
        self.send_slot.copy_(table)
        if self.by_position:
            self.send_copies.copy_(copies)

    def forward(self, p: Packed) -> Received:
        topo = self._need()
        recv_sizes, counts = self.exchange_counts(p, topo)
        got = all_to_all(p.rows, counts, topo)  # (source, local slot) order
        return self.received(got, recv_sizes, counts)

    def exchange_counts(self, p: Packed, topo: Topology) -> tuple:
        """How many rows of each of my slots every source sends me [P, n_local], and the whole count
        matrix (every rank's sends per destination rank): two small blocking collectives."""
        P, me = self.lp.ep, self.ep_rank
        recv_sizes = p.sizes.new_empty(P * self.n_local[me])
        with Traffic.waiting():
            dist.all_to_all_single(recv_sizes, p.sizes.contiguous(), [self.n_local[me]] * P, self.n_local,
                                   group=topo.ep_group)
            mine = torch.stack([c.sum() for c in torch.split(p.sizes, self.n_local)])
            everyone = [torch.empty_like(mine) for _ in range(P)]
            dist.all_gather(everyone, mine, group=topo.ep_group)
        return recv_sizes.view(P, self.n_local[me]), torch.stack(everyone).tolist()

    def received(self, got: torch.Tensor, recv_sizes: torch.Tensor, counts: list) -> Received:
        """Rows received in (source, local slot) order -> grouped by local slot."""
        P, me = self.lp.ep, self.ep_rank
        slot_of_row = torch.repeat_interleave(
            torch.arange(self.n_local[me], device=got.device).repeat(P), recv_sizes.reshape(-1).to(got.device),
            output_size=got.shape[0])
        order = torch.sort(slot_of_row, stable=True).indices
        return Received(rows=got.index_select(0, order), sizes=recv_sizes.sum(0).to(got.device), order=order,
                        counts=counts)


def keep_tables_out_of_state(gm: nn.Module) -> None:
    """fx.GraphModule registers each tensor a get_attr node reads as a persistent buffer, on the
    trip's own module or, where the graph reads a table through its path alone (the overlap pass's
    chunked trips), on a plain module fx makes at that path: the send tables (a function of the
    placement, which a checkpoint never depends on) go back out of the state dict wherever they
    sit, so a checkpoint loads into any placement, mesh and dispatch."""
    for mod in gm.modules():
        mod._non_persistent_buffers_set.update(n for n in ("send_slot", "send_copies") if n in mod._buffers)


class PackedAllToAllBack(_Collective):
    def __init__(self, forward_module: PackedAllToAll):
        super().__init__()
        self.fwd = [forward_module]

    def forward(self, y: torch.Tensor, received: Received) -> torch.Tensor:
        topo = self.fwd[0]._need()
        unsorted = y.new_empty(y.shape).index_copy(0, received.order, y)
        back = [list(col) for col in zip(*received.counts)]
        return all_to_all(unsorted, back, topo)


# ----------------------------------------------------------------------------- asynchronous all-to-all
#
# The overlap pass (passes.overlap) splits a trip into a start node and a wait node, with the
# experts of another chunk between them. Forward: the start issues the all-to-all
# (``async_op=True``) and returns its receive buffer, unfilled; the wait blocks on it. Backward
# runs them in reverse: the wait's backward issues the reverse trip of the gradient, the start's
# backward blocks on it, so a chunk's gradient trip is in flight while autograd computes the
# backward of nodes made after the start (another chunk's experts).


@dataclass
class InFlight:
    """An all-to-all issued and not yet waited for (one per trip per forward)."""

    rows: torch.Tensor  # the receive buffer: filled once ``work`` completes
    counts: list  # the trip's count matrix
    topo: Topology
    work: Any = None  # None: already complete (a hierarchical trip runs blocking)
    sent: Any = None  # the send buffer, kept alive until the trip completes
    back_rows: Optional[torch.Tensor] = None  # backward: the gradient's reverse trip, in flight
    back_work: Any = None
    back_sent: Any = None
    extra: Any = None  # what the finishing module needs (capacity, receive sizes)


def _issue(x: torch.Tensor, counts: list, topo: Topology) -> tuple:
    """Issue the trip of ``x`` (rows in destination order): (receive buffer, Work or None).
    A hierarchical trip's second stage needs the first's rows: it runs blocking."""
    if topo.hierarchical:
        return all_to_all_rows(x, counts, topo), None
    me, P = topo.ep_rank, topo.ep
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    Traffic.sent += row * (sum(counts[me]) - counts[me][me])
    Traffic.calls += 1
    y = x.new_empty((sum(counts[s][me] for s in range(P)),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(y, x, [counts[s][me] for s in range(P)], counts[me], group=topo.ep_group,
                                  async_op=True)
    return y, work


def _wait(work) -> None:
    if work is not None:
        with Traffic.waiting():
            work.wait()


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight):
        flight.sent = x
        flight.rows, flight.work = _issue(x, flight.counts, flight.topo)
        ctx.flight = flight
        return flight.rows

    @staticmethod
    def backward(ctx, _g):  # the reverse trip was issued by the wait's backward
        f = ctx.flight
        _wait(f.back_work)
        g, f.back_rows, f.back_work, f.back_sent = f.back_rows, None, None, None
        return g, None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, flight):
        _wait(flight.work)
        flight.work = flight.sent = None
        ctx.flight = flight
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, g):
        f = ctx.flight
        back = [list(col) for col in zip(*f.counts)]  # the reverse trip: transpose
        f.back_sent = g.contiguous()
        f.back_rows, f.back_work = _issue(f.back_sent, back, f.topo)
        return g, None


def start_all_to_all(x: torch.Tensor, counts: list, topo: Topology, extra=None) -> InFlight:
    """Issue the trip of rows ``x`` (destination order); ``finish_all_to_all`` gives the rows
    received (source order). Autograd-aware, both halves."""
    flight = InFlight(rows=x[:0], counts=counts, topo=topo, extra=extra)
    flight.rows = _StartAllToAll.apply(x.contiguous(), flight)
    return flight


def finish_all_to_all(flight: InFlight) -> torch.Tensor:
    return _WaitAllToAll.apply(flight.rows, flight)


class _ChunkTrip(_Collective):
    """One half of one chunk's trip: holds the layer's all-to-all module (its tables) in a plain
    list (not a submodule: the graph no longer calls it)."""

    def __init__(self, trip: nn.Module, chunk: int, chunks: int = 1):
        super().__init__()
        self.trip, self.chunk, self.chunks = [trip], chunk, chunks

    def offset(self, routing) -> int:
        """The first slot of this chunk in the layer's capacity buffer (position dispatch counts
        a block's rows from there)."""
        return chunk_range(routing.capacity, self.chunk, self.chunks)[0]

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


class CapacityDispatchStart(_ChunkTrip):
    """Issue chunk ``chunk``'s dispatch trip: buf [E, C_j, d] (slots from ``offset(routing)``) -> InFlight."""

    def forward(self, buf: torch.Tensor, routing) -> InFlight:
        at = self.offset(routing)
        send, counts = self.trip[0].send_rows(buf, at)
        return start_all_to_all(send, counts, self._need(), extra=(buf.shape[1], at))


class CapacityDispatchWait(_ChunkTrip):
    """Wait for it: -> the experts' input, [E_local, P·C_j, d] or rows grouped by local slot."""

    def forward(self, flight: InFlight):
        return self.trip[0].received(finish_all_to_all(flight), *flight.extra)


class CapacityCombineStart(_ChunkTrip):
    """Issue the combine trip of chunk ``chunk``'s expert outputs (C_j read off its dispatch buffer)."""

    def forward(self, y: torch.Tensor, buf: torch.Tensor, routing) -> InFlight:
        at = self.offset(routing)
        got, back = self.trip[0].back_rows(y, buf.shape[1], at)
        return start_all_to_all(got, back, self._need(), extra=(buf.shape[1], at))


class CapacityCombineWait(_ChunkTrip):
    """Wait for it: -> [E, C_j, d] in global expert order."""

    def forward(self, flight: InFlight) -> torch.Tensor:
        return self.trip[0].returned(finish_all_to_all(flight), *flight.extra)


class PackedChunkCounts(_Collective):
    """Every chunk's counts in one exchange, before the first chunk's rows leave (the row trips'
    splits depend on them): two small blocking collectives per layer, not two per chunk."""

    def __init__(self, trip: "PackedAllToAll"):
        super().__init__()
        self.trip = [trip]

    def forward(self, packs: tuple) -> list:
        """Chunks' Packed (sizes [n_slots] each) -> per chunk (rows of each of my slots every source
        sends me [P, n_local], the chunk's count matrix [P][P])."""
        topo, lp, me = self._need(), self.trip[0].lp, self.trip[0].ep_rank
        n_local, P, D = self.trip[0].n_local, lp.ep, len(packs)
        sizes = torch.stack([p.sizes for p in packs])  # [D, n_slots], slots rank-major
        per_rank = torch.split(sizes, n_local, dim=1)  # P × [D, n_local[d]]
        send = torch.cat([s.reshape(-1) for s in per_rank])  # (destination, chunk, its slot)
        recv = sizes.new_empty(P * D * n_local[me])
        mine = torch.stack([s.sum(1) for s in per_rank], dim=1)  # [D, P]: my rows to each rank, per chunk
        everyone = [torch.empty_like(mine) for _ in range(P)]
        with Traffic.waiting():
            dist.all_to_all_single(recv, send, [D * n_local[me]] * P, [D * n for n in n_local], group=topo.ep_group)
            dist.all_gather(everyone, mine, group=topo.ep_group)
        recv = recv.view(P, D, n_local[me])
        counts = torch.stack(everyone)  # [source, chunk, destination]
        return [(recv[:, j], counts[:, j].tolist()) for j in range(D)]


class PackedDispatchStart(_ChunkTrip):
    """Issue chunk ``chunk``'s rows, with the counts its ``PackedChunkCounts`` exchanged."""

    def forward(self, p: Packed, exchanged: list) -> InFlight:
        recv_sizes, counts = exchanged[self.chunk]
        return start_all_to_all(p.rows, counts, self._need(), extra=recv_sizes)


class PackedDispatchWait(_ChunkTrip):
    def forward(self, flight: InFlight) -> Received:
        return self.trip[0].received(finish_all_to_all(flight), flight.extra, flight.counts)


class PackedCombineStart(_ChunkTrip):
    def forward(self, y: torch.Tensor, received: Received) -> InFlight:
        unsorted = y.new_empty(y.shape).index_copy(0, received.order, y)
        return start_all_to_all(unsorted, [list(col) for col in zip(*received.counts)], self._need())


class PackedCombineWait(_ChunkTrip):
    def forward(self, flight: InFlight) -> torch.Tensor:
        return finish_all_to_all(flight)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank, ctx.world, ctx.n = group, rank, world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = g.new_empty((ctx.n,) + tuple(g.shape[1:]))
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None, None, None
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


class GatherTokens(_Collective):
    """All-gather of every rank's tokens (and token ids), so a batch spread over ranks is routed
    as one: capacity, expert choice and batch-level losses see the global batch. The gradient
    of each rank's copy flows back to its owner."""

    def __init__(self, world: int, rank: int):
        super().__init__()
        self.world, self.rank = world, rank

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                padding: Optional[torch.Tensor] = None):
        """-> (every rank's x, ids, mask (the tokens that count) and padding (the tokens that are
        not padding): None where not given)."""
        topo = self._need()
        xs = _GatherRows.apply(x, topo.world_group, self.rank, self.world)
        return (xs,) + tuple(None if t is None else self._gather(t, topo) for t in (ids, mask, padding))

    def _gather(self, t: torch.Tensor, topo) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=topo.world_group)
        return torch.cat(parts)


def localize(routing, x_local: torch.Tensor, rank: int):
    """This rank's share of a routing computed over the gathered batch."""
    n = x_local.shape[0]
    return routing.localize(rank * n, n)


def bind(gm: nn.Module, topo: Topology) -> int:
    """Give every collective module of a compiled model its process groups; returns how many."""
    n = 0
    for mod in gm.modules():
        if isinstance(mod, _Collective):
            mod.topo = topo
            n += 1
    return n
