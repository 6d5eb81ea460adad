"""The compiler: a validated Spec -> a ``torch.fx.GraphModule`` for one rank, plus its Plan.

    lower -> placement -> collective insertion -> overlap -> static shapes -> verification

and a built model's decode graph (``compile_decode``, ``moedsl.compiler.decode_graph``):

    lower(decode=True) -> placement -> collective insertion -> share token keys -> fuse decode MoE

Each pass is a function over the graph with one job (``moedsl.compiler.passes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from moedsl import spec as S
from moedsl.errors import MoedslError, SpecError
from moedsl.mesh import MeshShape, resolve_mesh
from moedsl.validate import check_batch

from .collectives import keep_tables_out_of_state
from .decode_graph import compile_decode
from .lower import Lowered, lower
from .passes.insert_collectives import insert_collectives
from .passes.overlap import overlap_pass
from .passes.placement import placement_pass
from .passes.static_shapes import StaticInfo, static_shapes_pass
from .passes.verify import collective_signature, verify

# the graphs of other ranks rebuilt to compare their collectives with this rank's (the runtime
# compares every rank's digest at start-up); larger meshes: a spread sample of ranks
MAX_RANKS_VERIFIED = 16


@dataclass
class Compiled:
    module: fx.GraphModule
    mesh: MeshShape
    rank: int
    placements: dict  # layer -> LayerPlacement
    comms: dict  # layer -> LayerComm
    static: StaticInfo
    layout: str = "static"  # static | grouped: how its capacity layers compute (resolve_layout)
    target: str = "cuda"  # the device type the layout was chosen for


LAYOUTS = ("auto", "static", "grouped")


def resolve_layout(layout: str, device) -> str:
    """``auto`` follows the device a run executes on: ``grouped`` (only the kept rows, packed) on a
    CPU, where nothing is captured; ``static`` (padded [E, C, d] buffers, CUDA-graph capturable)
    elsewhere."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be auto, static or grouped, not {layout!r}")
    if layout == "auto":
        return "grouped" if torch.device(device).type == "cpu" else "static"
    return layout


def _build(spec: S.Spec, mesh: MeshShape, rank: int, device, seed: int, init: bool, batch, graph_only=False,
           static: bool = True):
    low: Lowered = lower(spec, device=device, seed=seed, graph_only=graph_only, static=static)
    placements = placement_pass(low, spec, mesh, rank, device, seed, init)
    comms = insert_collectives(low, spec, mesh, rank, placements, rows=batch[0] if batch else None)
    overlap_pass(low, comms)
    static = None if graph_only else static_shapes_pass(low.graph, low, comms, placements, mesh, rank, batch)
    return low, placements, comms, static


def per_rank_batch(spec: S.Spec, mesh: MeshShape, batch: Optional[tuple] = None) -> tuple:
    B, T = batch or (spec.train.batch_size, spec.train.seq_len)
    return (max(B // mesh.world, 1), T)


def compile_graph(spec: S.Spec, rank: int = 0, world_size: Optional[int] = None, *, device="meta", seed: int = 0,
                  batch: Optional[tuple] = None, init: bool = True, verify_ranks: bool = True,
                  layout: str = "auto", target=None, batch_origin: str = "the batch") -> Compiled:
    """Compile ``spec`` for ``rank`` of ``world_size`` (default: the spec's mesh, else 1).

    ``device="meta"`` builds the module without allocating weights (any size compiles);
    ``batch`` = (global batch, sequence) for the static shapes (default: the spec's train);
    ``batch_origin`` names where it came from in the error if it does not fit (``--batch``).
    ``layout``: ``static`` (capacity layers as padded [E, C, d] buffers: CUDA-graph
    capturable), ``grouped`` (they compute only their kept rows: less work), or ``auto``:
    grouped on a CPU, where nothing is captured, static elsewhere. ``target``: the device the
    graph is for when it differs from ``device`` (a graph built on the meta device, shown as a CPU
    run would execute it: ``target="cpu"``); default ``device``."""
    target = torch.device(target if target is not None else device).type
    layout = resolve_layout(layout, target)
    static = layout == "static"
    if world_size is None:
        world_size = spec.placement.mesh.size if spec.placement.mesh else 1
    mesh = resolve_mesh(spec, world_size)
    if not 0 <= rank < world_size:
        raise MoedslError(f"rank {rank} is not in a world of {world_size}")
    if batch is not None:  # the spec's own batch was checked with the spec
        issues = check_batch(spec, batch[0], world_size, origin=batch_origin, seq=batch[1])
        if issues:
            raise SpecError(issues, spec.source)
    local_batch = per_rank_batch(spec, mesh, batch)
    low, placements, comms, shapes = _build(spec, mesh, rank, device, seed, init, local_batch, static=static)
    others = []
    if verify_ranks and world_size > 1:
        for r in _ranks_to_verify(mesh, rank):
            other = _build(spec, mesh, r, "meta", seed, False, local_batch, graph_only=True, static=static)[0]
            others.append((r, collective_signature(other.graph)))
    verify(low.graph, others)
    gm = fx.GraphModule(low.modules, low.graph, class_name=_class_name(spec.name))
    keep_tables_out_of_state(gm)
    gm.meta = {"spec": spec.name, "rank": rank, "world": world_size}
    return Compiled(module=gm, mesh=mesh, rank=rank, placements=placements, comms=comms, static=shapes,
                    layout=layout, target=target)


def _ranks_to_verify(mesh: MeshShape, rank: int) -> list:
    ranks = list(range(mesh.world))
    if mesh.world > MAX_RANKS_VERIFIED:
        step = max(mesh.devices_per_node, mesh.world // MAX_RANKS_VERIFIED)
        ranks = sorted({0, mesh.world - 1, *range(0, mesh.world, step)})[:MAX_RANKS_VERIFIED]
    return [r for r in ranks if r != rank]


def _class_name(name: str) -> str:
    parts = [p for p in "".join(c if c.isalnum() else " " for c in name).split() if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) or "MoEModel"


__all__ = ["compile_graph", "compile_decode", "resolve_layout", "LAYOUTS", "Compiled", "StaticInfo", "lower"]
