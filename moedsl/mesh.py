"""The device mesh of a run: how ``world`` processes split into nodes, expert-parallel and
data-parallel ranks, checked against a spec's placement. Pure data (no torch.distributed):
the compiler lays out its graph over it, the runtime makes process groups from it."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import Checks
from .errors import format_path


@dataclass(frozen=True)
class MeshShape:
    """The device mesh of a run: world = nodes × devices_per_node = expert_parallel × data_parallel."""

    world: int
    nodes: int
    devices_per_node: int
    expert_parallel: int
    data_parallel: int


def resolve_mesh(spec, world_size: int) -> MeshShape:
    """The mesh a run of ``world_size`` processes uses, checked against the spec's placement
    (a ``SpecError`` names what does not fit). One process can always run a spec: it hosts
    every expert."""
    if world_size == 1:
        return MeshShape(world=1, nodes=1, devices_per_node=1, expert_parallel=1, data_parallel=1)
    c = Checks.of(spec)
    shape = check_mesh(spec, world_size, c)
    c.raise_if_any()
    return shape


def check_mesh(spec, world: int, c: Checks) -> MeshShape | None:
    """ep × dp = world; experts fit the strategy; explicit ranks exist. Reports into ``c``."""
    pl = spec.placement
    p = ("placement",)
    before = len(c.issues)
    if pl.mesh is not None and pl.mesh.size != world:
        c.error(p + ("mesh",), f"the mesh is {pl.mesh.nodes} × {pl.mesh.devices_per_node} = {pl.mesh.size} "
                f"devices, but the run has {world} processes")
        return None
    nodes, per_node = (pl.mesh.nodes, pl.mesh.devices_per_node) if pl.mesh else (1, world)
    ep, dp = pl.expert_parallel, pl.data_parallel
    if ep is None and dp is None:
        ep, dp = world, 1
    elif ep is None:
        ep = world // dp if world % dp == 0 else None
    elif dp is None:
        dp = world // ep if world % ep == 0 else None
    if ep is None or dp is None or ep * dp != world:
        given = " × ".join(f"{n} {v}" for n, v in (("expert_parallel", pl.expert_parallel),
                                                      ("data_parallel", pl.data_parallel)) if v is not None)
        where = p + ("expert_parallel" if pl.expert_parallel is not None else "data_parallel",)
        c.error(where, f"{given} does not make the mesh of {world} devices",
                "expert_parallel × data_parallel must equal nodes × devices_per_node")
        return None
    ex = p + ("experts",)
    for layer in spec.moe_layers:
        E = layer.config.experts.count
        at = format_path(layer.path)
        if pl.strategy == "contiguous" and E % ep:
            c.error(ex, f"contiguous placement splits experts evenly, but the {E} experts of the MoE layer at "
                    f"{at} do not divide over {ep} expert-parallel ranks",
                    "use round_robin or explicit, or a count divisible by expert_parallel")
        elif pl.strategy == "round_robin" and E < ep:
            c.error(ex, f"round_robin leaves ranks {E}..{ep - 1} without experts: the MoE layer at {at} has "
                    f"only {E} experts for {ep} expert-parallel ranks")
        m = pl.map_for(layer.moe_index)
        if pl.strategy == "explicit" and m is not None:
            where = ex + (("layers", str(layer.moe_index)) if layer.moe_index in dict(pl.layer_maps) else ("map",))
            for e, ranks in enumerate(m):
                bad = [r for r in ranks if r >= ep]
                if bad:
                    c.error(where + (e,), f"expert {e} is placed on rank {bad[0]}, which does not exist "
                            f"(expert-parallel ranks are 0..{ep - 1})")
    for e, n in pl.replicas:
        if n > ep:
            c.error(ex + ("replicas", str(e)), f"{n} copies of expert {e} need {n} distinct ranks; "
                    f"there are {ep} expert-parallel ranks")
    _check_replication(spec, ep, c)
    if len(c.issues) > before:
        return None
    return MeshShape(world=world, nodes=nodes, devices_per_node=per_node, expert_parallel=ep, data_parallel=dp)


def _check_replication(spec, ep: int, c: Checks) -> None:
    """placement.replication on ``ep`` expert-parallel ranks: E + R slots split evenly, no rank
    holding two copies of one expert (R <= E · (EP - 1)), and no static replicas beside it. On
    one rank it does nothing (that rank holds every expert once)."""
    pl, rep = spec.placement, spec.placement.replication
    if rep is None or ep == 1:
        return
    where = ("placement", "replication")
    if pl.replicas or pl.strategy == "explicit":
        c.error(where, "replication places the experts itself; it cannot be combined with "
                f"{'placement.experts.replicas' if pl.replicas else 'an explicit expert map'}",
                "remove one of the two")
        return
    R = rep.redundant
    for layer in spec.moe_layers:
        E, at = layer.config.experts.count, format_path(layer.path)
        if (E + R) % ep:
            c.error(where + ("redundant",), f"{E} experts + {R} redundant slots of the MoE layer at {at} do not "
                    f"divide over {ep} expert-parallel ranks", f"choose redundant so that {E} + redundant is a "
                    f"multiple of {ep}")
        elif R > E * (ep - 1):
            c.error(where + ("redundant",), f"{E + R} slots on {ep} ranks put {(E + R) // ep} slots on each, more "
                    f"than the {E} experts of the MoE layer at {at}: a rank would hold two copies of one expert",
                    f"at most {E * (ep - 1)} redundant slots")
