"""Static shapes: with a capacity every tensor of an MoE layer has a shape fixed by the batch
shape ([E_local, C, d]); such a graph can be captured as a CUDA graph and replayed. Dropless
layers, and layers routed over a batch spread across ranks, have data-dependent shapes and
are marked dynamic. The pass records, for a given batch shape, each MoE node's shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from moedsl.kinds.gates import gate_type

from ..chunks import chunk_range


@dataclass(frozen=True)
class StaticInfo:
    capturable: bool  # every MoE layer static
    dynamic_layers: tuple  # names of the data-dependent layers
    batch: tuple  # (B, T) per rank the shapes below were worked out for
    shapes: dict  # node name -> shape (tuple) or "dynamic"


def static_shapes_pass(graph: fx.Graph, low, comms: dict, placements: dict, mesh, rank: int,
                       batch: tuple) -> StaticInfo:
    B, T = batch
    d = low.d_model
    dynamic, shapes = [], {}
    ep_rank = rank % mesh.expert_parallel
    for info in low.moe:
        comm = comms[info.name]
        gate = info.config.gate
        static = comm.layout == "capacity"
        S = B * T
        if static:
            n = S // comm.groups
            c = n if gate_type(gate.type).dense else gate.capacity(n, info.config.experts.count)
            C = comm.groups * c
            E = info.config.experts.count
            E_local = len(placements[info.name].slots[ep_rank])
            P = mesh.expert_parallel if comm.expert_parallel else 1

            def shapes_for(c):  # the whole layer's (c = C), or a chunk's of the overlap pass (its slots of C)
                return {"dispatch": (E, c, d), "experts": (E_local, P * c, d), "a2a_dispatch": (E_local, P * c, d),
                        "a2a_combine": (E, c, d), "combine": (S, d), "join": (S, d)}
            want = shapes_for(C)
        else:
            dynamic.append(info.name)
        for node in graph.nodes:
            if node.meta.get("moe_layer") != info.name:
                continue
            role = node.meta.get("role")
            node.meta["static"] = static
            if static and role in want:
                if role in ("experts", "a2a_dispatch") and not placements[info.name].uniform and comm.expert_parallel:
                    shape = "rows"
                elif node.meta.get("chunk") is not None:
                    lo, hi = chunk_range(C, node.meta["chunk"], info.config.overlap.chunks)
                    shape = shapes_for(hi - lo)[role]
                else:
                    shape = want[role]
                node.meta["shape"] = shape
                shapes[node.name] = shape
            elif not static and role in ("dispatch", "experts", "combine", "a2a_dispatch", "a2a_combine", "join"):
                node.meta["shape"] = "dynamic"
                shapes[node.name] = "dynamic"
    info = StaticInfo(capturable=not dynamic, dynamic_layers=tuple(dynamic), batch=(B, T), shapes=shapes)
    graph._moedsl_static = info  # noqa: SLF001 - kept with the graph for the runtime
    return info
