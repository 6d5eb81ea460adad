"""Overlap: pipeline an MoE layer's dispatch all-to-all, experts and combine all-to-all over
``overlap.chunks`` = D chunks (Tutel's adaptive pipelining, Hwang et al. 2023; FasterMoE's
smart scheduling, He et al. 2022), so that communication hides behind expert compute.

The routing stays one node over all tokens (so the results are those of D = 1); what follows
it is rewritten per chunk j (``moedsl.compiler.chunks``: slot ranges of a capacity buffer,
token ranges of a packed layer):

    layers_i_dispatch_cj -> layers_i_a2a_dispatch_cj (issue) -> layers_i_a2a_dispatch_wait_cj
      -> layers_i_experts_cj -> layers_i_a2a_combine_cj (issue) -> layers_i_a2a_combine_wait_cj
      -> layers_i_combine_cj -> layers_i_combine (the chunks joined)

and the nodes are ordered so that each trip is in flight while another chunk's experts compute:

    dispatch 0, issue d0           (packed: every chunk dispatched, their counts exchanged at once)
    for i in 0..D-1:  wait d_i;  dispatch i+1, issue d_{i+1};  experts i;  issue c_i;
                      wait c_{i-1}, combine i-1
    wait c_{D-1}, combine D-1;  join

Every rank runs the same graph, so every rank issues the same trips in the same order (the
verify pass compares them, chunk by chunk). Without all-to-alls (one process, or every expert
on every rank) the layer is still computed chunk by chunk, with nothing to overlap.
"""
from __future__ import annotations

import torch.fx as fx

from moedsl.nn import moe_ops

from .. import chunks as K
from .. import collectives as C
from ..lower import Lowered
from .insert_collectives import layer_nodes, new_node

# the nodes of one layer the pass replaces, in an order that erases users first (the combine is kept,
# as the join)
_REPLACED = ("combine", "a2a_combine", "experts", "sizes", "rows", "a2a_dispatch", "dispatch")

_TRIPS = {  # layout -> the modules of a chunk's (dispatch start, dispatch wait, combine start, combine wait)
    "capacity": (C.CapacityDispatchStart, C.CapacityDispatchWait, C.CapacityCombineStart, C.CapacityCombineWait),
    "packed": (C.PackedDispatchStart, C.PackedDispatchWait, C.PackedCombineStart, C.PackedCombineWait),
}


def overlap_pass(low: Lowered, comms: dict) -> dict:
    """Chunk every MoE layer whose ``overlap.chunks`` > 1; returns layer -> chunks (1 if unchanged).
    A decode graph (each token its own routing group) is left whole."""
    out = {}
    for info in low.moe:
        D = info.config.overlap.chunks
        out[info.name] = 1 if info.per_token else D
        if D > 1 and not info.per_token:
            _chunk_layer(low, info.name, comms[info.name], D)
    low.graph.lint()
    return out


def _chunk_layer(low: Lowered, name: str, comm, D: int) -> None:
    g, base = low.graph, name.replace(".", "_")
    nodes = layer_nodes(g, name)
    disp, experts, combine = nodes["dispatch"], nodes["experts"], nodes["combine"]
    flat, route, extra_args = disp.args[0], disp.args[1], tuple(disp.args[2:])  # extra: a packed trip's send slots
    capacity = comm.layout == "capacity"
    trips = "a2a_dispatch" in nodes
    grouped_input = not capacity or "rows" in nodes  # the experts take (rows, sizes), not a buffer
    if trips and not low.graph_only:
        fwd = low.modules[f"{name}.a2a_dispatch"]
        if not capacity:
            low.modules[f"{name}.a2a_counts"] = C.PackedChunkCounts(fwd)
        for j in range(D):
            for what, cls in zip(("a2a_dispatch", "a2a_dispatch_wait", "a2a_combine", "a2a_combine_wait"),
                                 _TRIPS[comm.layout]):
                low.modules[f"{name}.{what}_c{j}"] = cls(fwd, j, D)

    made: dict = {}  # (what, j) -> node

    def new(op, target, args, what: str, j, role: str) -> fx.Node:
        node = new_node(g, op, target, args, f"{base}_{what}_c{j}", name, role)
        node.meta.update(chunk=j, comm=comm)
        made[what, j] = node
        return node

    def prepare(j):  # this chunk's share of the routed tokens, dispatched
        if capacity:
            return new("call_function", K.dispatch_chunk, (flat, route, j, D), "dispatch", j, "dispatch")
        r = new("call_function", K.routing_chunk, (route, j, D), "route", j, "route_chunk")
        x = new("call_function", K.tokens_chunk, (flat, j, D), "tokens", j, "tokens_chunk")
        extra = extra_args
        if len(extra) == 3:  # position dispatch: the chunk's share of each assignment's slot over all tokens
            extra = extra[:2] + (new("call_function", K.assignments_chunk, (extra[2], route, j, D), "replica_slots", j,
                                     "replica_slots_chunk"),)
        return new("call_function", moe_ops.dispatch_packed, (x, r) + extra, "dispatch", j, "dispatch")

    def issue(what: str, j, args):
        return new("call_module", f"{name}.{what}_c{j}", args, what, j, what)

    def wait(what: str, j):
        return new("call_module", f"{name}.{what}_wait_c{j}", (made[what, j],), f"{what}_wait", j, "a2a_wait")

    def compute(j):
        src = made["a2a_dispatch_wait", j] if trips else made["dispatch", j]
        if grouped_input:
            rows = new("call_function", getattr, (src, "rows"), "rows", j, "rows")
            sizes = new("call_function", getattr, (src, "sizes"), "sizes", j, "sizes")
            return new("call_module", experts.target, (rows, sizes), "experts", j, "experts")
        return new("call_module", experts.target, (src,), "experts", j, "experts")

    def finish(j):  # this chunk's expert outputs back to its tokens
        y = made["a2a_combine_wait", j] if trips else made["experts", j]
        if capacity:
            return new("call_function", K.combine_chunk, (y, route, j, D), "combine", j, "combine")
        return new("call_function", moe_ops.combine_packed, (y, made["dispatch", j], made["route", j]),
                   "combine", j, "combine")

    with g.inserting_before(combine):
        if not trips:
            for j in range(D):
                prepare(j), compute(j), finish(j)
        elif capacity:  # static splits: each chunk dispatched just before its trip
            issue("a2a_dispatch", 0, (prepare(0), route))
        else:  # the row trips' splits: every chunk's counts in one exchange, before the first trip
            packs = tuple(prepare(j) for j in range(D))
            exchanged = new_node(g, "call_module", f"{name}.a2a_counts", (packs,), f"{base}_a2a_counts", name,
                             "a2a_counts")
            exchanged.meta["comm"] = comm
            issue("a2a_dispatch", 0, (packs[0], exchanged))
        if trips:
            for i in range(D):
                wait("a2a_dispatch", i)
                if i + 1 < D:
                    nxt = (prepare(i + 1), route) if capacity else (made["dispatch", i + 1], exchanged)
                    issue("a2a_dispatch", i + 1, nxt)
                compute(i)
                # the combine trip reads C_j off the chunk's dispatch buffer (capacity) or the rows'
                # order and counts off what its dispatch trip received (packed)
                issue("a2a_combine", i, (made["experts", i], made["dispatch", i], route) if capacity
                      else (made["experts", i], made["a2a_dispatch_wait", i]))
                if i >= 1:
                    wait("a2a_combine", i - 1), finish(i - 1)
            wait("a2a_combine", D - 1), finish(D - 1)
    # the layer's combine node becomes the join of the chunks (keeping its name and its users)
    combine.target = K.sum_chunks if capacity else K.cat_chunks
    combine.args = (tuple(made["combine", j] for j in range(D)),)
    combine.meta["role"] = "join"
    for role in _REPLACED[1:]:
        if role in nodes:
            g.erase_node(nodes[role])
    if trips and not low.graph_only:  # the whole-layer trips are no longer called
        del low.modules[f"{name}.a2a_dispatch"], low.modules[f"{name}.a2a_combine"]
