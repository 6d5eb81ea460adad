"""Verification: the graph is a DAG (networkx), every dispatch has its combine, every
collective has its return trip, and every rank issues the same collectives in the same
order. A mismatch there is a hang at run time; here it is an error at compile time."""
from __future__ import annotations

import hashlib

import networkx as nx
import torch.fx as fx

COLLECTIVE_ROLES = ("route_gather", "a2a_dispatch", "a2a_combine")


class GraphError(RuntimeError):
    """A compiled graph that would compute the wrong thing or hang: a compiler bug, never a user's."""


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    dg = nx.DiGraph()
    for node in graph.nodes:
        dg.add_node(node.name, op=node.op, role=node.meta.get("role"), layer=node.meta.get("moe_layer"))
        for inp in node.all_input_nodes:
            dg.add_edge(inp.name, node.name)
    return dg


def collective_signature(graph: fx.Graph) -> list:
    """The collectives in the order a rank issues them: (layer, role, layout)."""
    return [(n.meta["moe_layer"], n.meta["role"], n.meta["comm"].layout, n.meta["comm"].algorithm)
            for n in graph.nodes if n.meta.get("role") in COLLECTIVE_ROLES]


def signature_digest(graph: fx.Graph) -> str:
    return hashlib.sha256(repr(collective_signature(graph)).encode()).hexdigest()[:16]


def verify(graph: fx.Graph, other_signatures=()) -> None:
    dg = to_networkx(graph)
    if not nx.is_directed_acyclic_graph(dg):
        raise GraphError(f"the graph has a cycle: {nx.find_cycle(dg)}")
    layers: dict = {}
    for node in graph.nodes:
        if node.meta.get("moe_layer"):
            layers.setdefault(node.meta["moe_layer"], {})[node.meta.get("role")] = node.name
    for layer, roles in layers.items():
        for need in ("route", "dispatch", "experts", "combine"):
            if need not in roles:
                raise GraphError(f"MoE layer {layer} has no {need} node")
        if not nx.has_path(dg, roles["dispatch"], roles["combine"]):
            raise GraphError(f"MoE layer {layer}: its combine does not consume its dispatch")
        if ("a2a_dispatch" in roles) != ("a2a_combine" in roles):
            raise GraphError(f"MoE layer {layer}: an all-to-all without its return trip")
        if "a2a_dispatch" in roles and not (nx.has_path(dg, roles["dispatch"], roles["a2a_dispatch"]) and
                                            nx.has_path(dg, roles["a2a_dispatch"], roles["experts"]) and
                                            nx.has_path(dg, roles["experts"], roles["a2a_combine"]) and
                                            nx.has_path(dg, roles["a2a_combine"], roles["combine"])):
            raise GraphError(f"MoE layer {layer}: the all-to-alls are not between dispatch, experts and combine")
    mine = collective_signature(graph)
    for rank, sig in other_signatures:
        if sig != mine:
            raise GraphError(f"rank {rank} would issue collectives {sig}, this rank {mine}: a run would hang")
