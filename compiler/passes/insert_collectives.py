"""Collective insertion: make the single-process graph the graph of one rank.

Per MoE layer it decides
- the routing scope: ``local`` (each rank routes its own tokens; exact when the spec's
  routing groups split evenly over the ranks, or when routing is per token: no capacity
  and no batch-level loss) or ``global`` (the batch is routed as a whole: a token gather
  before the gate and a ``localize`` after it);
- the layout: a capacity layer routed locally keeps its static [E, C, d] buffer; one
  routed globally becomes packed (its per-rank share is data-dependent);
and puts ``all_to_all`` nodes between dispatch and experts and between experts and
combine wherever the experts are spread over more than one rank. With one rank it
changes nothing.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from moedsl.nn import moe_ops
from moedsl.mesh import MeshShape

from .. import collectives as C
from ..lower import Lowered


@dataclass(frozen=True)
class LayerComm:
    """How one MoE layer runs on this rank."""

    scope: str  # local | global
    layout: str  # capacity | packed
    groups: int  # routing groups in the batch this rank's gate sees
    expert_parallel: bool  # all-to-alls present
    algorithm: str  # flat | hierarchical
    per_sequence: bool = False  # routing_groups: sequence: ``groups`` is this rank's rows of the compiled batch


def routing_scope(info, world: int) -> tuple[str, int]:
    g = info.config.gate
    lw = info.config.losses
    per_token = not g.has_capacity and not (lw.importance or lw.load or lw.balance)  # (expert choice: a capacity)
    if g.per_sequence:  # a rank's rows are whole sequences: each routes its own
        return "local", 1
    if world == 1:
        return "local", g.routing_groups
    if g.routing_groups % world == 0:
        return "local", g.routing_groups // world
    if per_token:
        return "local", 1
    return "global", g.routing_groups


def layer_nodes(graph: fx.Graph, name: str) -> dict:
    """The nodes of MoE layer ``name`` by their role (``tokens``, ``route``, ``dispatch``, ...)."""
    return {n.meta["role"]: n for n in graph.nodes if n.meta.get("moe_layer") == name and "role" in n.meta}


def new_node(graph: fx.Graph, op: str, target, args, name: str, layer: str, role: str) -> fx.Node:
    """A node of MoE layer ``layer`` with role ``role`` (the passes find a layer's nodes by them)."""
    node = graph.create_node(op, target, args, {}, name=name)
    node.meta.update(moe_layer=layer, role=role)
    return node


def insert_collectives(low: Lowered, spec, mesh: MeshShape, rank: int, placements: dict,
                       rows: Optional[int] = None) -> dict:
    """The collectives of every MoE layer on this rank; ``rows``: the sequences of this rank's
    batch (the groups of a layer routing each sequence alone; default 1)."""
    g = low.graph
    out = {}
    ep, world = mesh.expert_parallel, mesh.world
    ep_rank = rank % ep
    for info in low.moe:
        name, base = info.name, info.name.replace(".", "_")
        nodes = layer_nodes(g, name)
        scope, groups = routing_scope(info, world)
        if info.per_token or info.per_sequence:  # each token / row its own group, counted when it runs
            scope, groups = "local", nodes["route"].args[3]
        layout = info.layout if scope == "local" else "packed"
        tokens = nodes["tokens"]  # the batch check counts the sequences of every rank
        tokens.args = tokens.args[:3] + (world,)
        route = nodes["route"]
        flat, ids = route.args[0], route.args[1]
        local_route = route
        if scope == "local":
            route.args = (flat, ids, rank, groups)
        else:  # gather every rank's tokens, route them as one batch, keep this rank's share
            if not low.graph_only:
                low.modules[f"{name}.route_gather"] = C.GatherTokens(world, rank)
            mask = route.kwargs.get("mask")  # the tokens that count, gathered with them
            padding = route.kwargs.get("padding")  # the tokens that are not padding, too
            with g.inserting_before(route):
                gathered = new_node(g, "call_module", f"{name}.route_gather", (flat, ids, mask, padding),
                                    f"{base}_route_gather", name, "route_gather")
                gx = new_node(g, "call_function", operator.getitem, (gathered, 0), f"{base}_gathered_tokens",
                          name, "gathered")
                gids = new_node(g, "call_function", operator.getitem, (gathered, 1), f"{base}_gathered_ids",
                            name, "gathered_ids") if ids is not None else None
                if mask is not None:
                    route.kwargs = {**route.kwargs, "mask": new_node(g, "call_function", operator.getitem, (gathered, 2),
                                                                 f"{base}_gathered_mask", name, "gathered_mask")}
                if padding is not None:
                    route.kwargs = {**route.kwargs, "padding": new_node(
                        g, "call_function", operator.getitem, (gathered, 3), f"{base}_gathered_padding", name,
                        "gathered_padding")}
            route.args = (gx, gids, 0, groups)
            with g.inserting_after(route):
                local_route = new_node(g, "call_function", C.localize, (route, flat, rank), f"{base}_route_local",
                                   name, "route_local")
            route.replace_all_uses_with(local_route, delete_user_cb=lambda u: u is not local_route)
        if layout != info.layout:  # capacity -> packed: rebuild dispatch / experts / combine
            _to_packed(g, nodes, local_route, name, base)
            nodes = layer_nodes(g, name)
        spread = ep > 1
        algorithm = "flat"
        if spread:
            lp = placements[name]
            algorithm = spec.placement.all_to_all
            if layout == "capacity":
                _insert_capacity_a2a(g, low, nodes, local_route, lp, ep_rank, name, base)
            else:
                _insert_packed_a2a(g, low, nodes, lp, ep_rank, name, base)
        comm = LayerComm(scope=scope, layout=layout, groups=(rows or 1) if info.per_sequence else groups,
                         expert_parallel=spread, algorithm=algorithm, per_sequence=info.per_sequence)
        out[name] = comm
        for node in g.nodes:
            if node.meta.get("moe_layer") == name:
                node.meta["comm"] = comm
    g.lint()
    return out


def _to_packed(g: fx.Graph, nodes: dict, route: fx.Node, name: str, base: str) -> None:
    disp, experts, combine = nodes["dispatch"], nodes["experts"], nodes["combine"]
    flat = disp.args[0]
    with g.inserting_before(disp):
        packed = new_node(g, "call_function", moe_ops.dispatch_packed, (flat, route), f"{base}_dispatch_packed",
                      name, "dispatch")
        rows = new_node(g, "call_function", getattr, (packed, "rows"), f"{base}_rows", name, "rows")
        sizes = new_node(g, "call_function", getattr, (packed, "sizes"), f"{base}_sizes", name, "sizes")
    experts.args = (rows, sizes)
    with g.inserting_before(combine):
        comb = new_node(g, "call_function", moe_ops.combine_packed, (experts, packed, route), f"{base}_combine_packed",
                    name, "combine")
    combine.replace_all_uses_with(comb)
    g.erase_node(combine)
    g.erase_node(disp)


def _insert_capacity_a2a(g, low, nodes, route, lp, ep_rank, name, base) -> None:
    if not low.graph_only:
        fwd = C.CapacityAllToAll(lp, ep_rank)
        low.modules[f"{name}.a2a_dispatch"] = fwd
        low.modules[f"{name}.a2a_combine"] = C.CapacityAllToAllBack(fwd)
    disp, experts, combine = nodes["dispatch"], nodes["experts"], nodes["combine"]
    with g.inserting_after(disp):
        a2a = new_node(g, "call_module", f"{name}.a2a_dispatch", (disp,), f"{base}_a2a_dispatch", name, "a2a_dispatch")
    if lp.uniform:
        experts.args = (a2a,)
    else:  # uneven slots (replicas): rows grouped by local slot
        with g.inserting_after(a2a):
            rows = new_node(g, "call_function", getattr, (a2a, "rows"), f"{base}_recv_rows", name, "rows")
        with g.inserting_after(rows):
            sizes = new_node(g, "call_function", getattr, (a2a, "sizes"), f"{base}_recv_sizes", name, "sizes")
        experts.args = (rows, sizes)
    with g.inserting_after(experts):
        back = new_node(g, "call_module", f"{name}.a2a_combine", (experts, route), f"{base}_a2a_combine", name,
                    "a2a_combine")
    combine.args = (back,) + tuple(combine.args[1:])


def _insert_packed_a2a(g, low, nodes, lp, ep_rank, name, base) -> None:
    if not low.graph_only:
        fwd = C.PackedAllToAll(lp, ep_rank)
        low.modules[f"{name}.a2a_dispatch"] = fwd
        low.modules[f"{name}.a2a_combine"] = C.PackedAllToAllBack(fwd)
        low.modules[f"{name}.a2a_dispatch.send_slot"] = fwd.send_slot  # get_attr targets must be in the root
        if C.by_position(lp):
            low.modules[f"{name}.a2a_dispatch.send_copies"] = fwd.send_copies
    disp, experts, combine = nodes["dispatch"], nodes["experts"], nodes["combine"]
    route, n_slots = disp.args[1], sum(len(s) for s in lp.slots)
    with g.inserting_before(disp):
        slots = g.get_attr(f"{name}.a2a_dispatch.send_slot")
        slots.meta.update(moe_layer=name, role="send_slots")
        if C.by_position(lp):  # each assignment's copy by its position among the source's rows of its expert
            copies = g.get_attr(f"{name}.a2a_dispatch.send_copies")
            copies.meta.update(moe_layer=name, role="send_copies")
            dest = new_node(g, "call_function", moe_ops.replica_slots, (route, slots, copies), f"{base}_replica_slots",
                            name, "replica_slots")
    if C.by_position(lp):
        disp.args = (disp.args[0], route, None, n_slots, dest)
    else:
        disp.args = (disp.args[0], route, slots, n_slots)
    rows_node, sizes_node = nodes["rows"], nodes["sizes"]
    with g.inserting_after(disp):
        a2a = new_node(g, "call_module", f"{name}.a2a_dispatch", (disp,),
                   f"{base}_a2a_dispatch", name, "a2a_dispatch")
    rows_node.args = (a2a, "rows")
    sizes_node.args = (a2a, "sizes")
    # rows/sizes must come after the a2a node
    a2a.append(rows_node)
    rows_node.append(sizes_node)
    with g.inserting_after(experts):
        back = new_node(g, "call_module", f"{name}.a2a_combine", (experts, a2a), f"{base}_a2a_combine", name,
                    "a2a_combine")
    combine.args = (back,) + tuple(combine.args[1:])
