"""Verification: the graph is a DAG (networkx), every dispatch has its combine, every
collective has its return trip, and every rank issues the same collectives in the same
order. A mismatch there is a hang at run time; here it is an error at compile time."""
from __future__ import annotations

import hashlib

import networkx as nx
import torch.fx as fx

from ..collectives import COLLECTIVE_ROLES


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
    """The collectives in the order a rank issues and waits for them: (layer, role, layout,
    algorithm), and the chunk of a layer the overlap pass split."""
    return [(n.meta["moe_layer"], n.meta["role"], n.meta["comm"].layout, n.meta["comm"].algorithm)
            + ((n.meta["chunk"],) if n.meta.get("chunk") is not None else ())
            for n in graph.nodes if n.meta.get("role") in COLLECTIVE_ROLES]


def signature_digest(graph: fx.Graph) -> str:
    return hashlib.sha256(repr(collective_signature(graph)).encode()).hexdigest()[:16]


def _path(dg: nx.DiGraph, *names) -> bool:
    return all(nx.has_path(dg, a, b) for a, b in zip(names, names[1:]))


def _check_chain(dg: nx.DiGraph, layer: str, roles: dict, what: str) -> None:
    """One dispatch -> [all-to-all -> ] experts -> [all-to-all -> ] combine chain (a layer, or one chunk
    of it: ``what`` says which)."""
    for need in ("dispatch", "experts", "combine"):
        if need not in roles:
            raise GraphError(f"MoE layer {layer}{what} has no {need} node")
    if not nx.has_path(dg, roles["dispatch"], roles["combine"]):
        raise GraphError(f"MoE layer {layer}{what}: its combine does not consume its dispatch")
    if ("a2a_dispatch" in roles) != ("a2a_combine" in roles):
        raise GraphError(f"MoE layer {layer}{what}: an all-to-all without its return trip")
    if "a2a_dispatch" in roles and not _path(dg, roles["dispatch"], roles["a2a_dispatch"], roles["experts"],
                                             roles["a2a_combine"], roles["combine"]):
        raise GraphError(f"MoE layer {layer}{what}: the all-to-alls are not between dispatch, experts and combine")


def verify(graph: fx.Graph, other_signatures=()) -> None:
    dg = to_networkx(graph)
    if not nx.is_directed_acyclic_graph(dg):
        raise GraphError(f"the graph has a cycle: {nx.find_cycle(dg)}")
    layers: dict = {}  # layer -> chunk (None: the whole layer) -> role -> node name
    for node in graph.nodes:
        if node.meta.get("moe_layer"):
            chunks = layers.setdefault(node.meta["moe_layer"], {})
            chunks.setdefault(node.meta.get("chunk"), {})[node.meta.get("role")] = node.name
    for layer, chunks in layers.items():
        whole = chunks.get(None, {})
        if "route" not in whole:
            raise GraphError(f"MoE layer {layer} has no route node")
        if len(chunks) == 1:
            _check_chain(dg, layer, whole, "")
            continue
        # split by the overlap pass: every chunk its own chain, from the one routing to the join
        if "join" not in whole:
            raise GraphError(f"MoE layer {layer} is split into chunks that are never joined")
        for j, roles in chunks.items():
            if j is None:
                continue
            _check_chain(dg, layer, roles, f" chunk {j}")
            if not _path(dg, whole["route"], roles["dispatch"]) or not _path(dg, roles["combine"], whole["join"]):
                raise GraphError(f"MoE layer {layer} chunk {j} does not run from the routing to the join")
            if ("a2a_dispatch" in roles) != ("a2a_wait" in roles):
                raise GraphError(f"MoE layer {layer} chunk {j}: an all-to-all issued and never waited for")
    mine = collective_signature(graph)
    for rank, sig in other_signatures:
        if sig != mine:
            raise GraphError(f"rank {rank} would issue collectives {sig}, this rank {mine}: a run would hang")
