"""Process groups for a compiled spec's mesh.

Ranks: rank = dp_index · EP + ep_rank. An expert-parallel (EP) group is a run of EP
consecutive ranks and holds one copy of every expert; the ranks with the same ep_rank
across the EP groups hold the same experts (expert data parallelism) and average those
experts' gradients. Every rank holds every non-expert parameter (data parallelism).
For the hierarchical all-to-all, an EP group that spans several nodes is split into its
per-node groups and its per-local-index (cross-node) groups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.distributed as dist

from moedsl.compiler.collectives import Topology, bind
from moedsl.mesh import MeshShape


@dataclass
class Groups:
    topo: Topology
    expert_dp_group: object  # ranks holding the same experts (None when data_parallel == 1)
    expert_dp_ranks: tuple


@functools.lru_cache(maxsize=8)
def make_groups(mesh: MeshShape, rank: int, hierarchical: bool = True) -> Groups:
    """Create every process group of the mesh (all ranks call this in the same order)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: start the job with torchrun "
                           "(or `moedsl run --nproc N`)")
    if dist.get_world_size() != mesh.world:
        raise RuntimeError(f"the mesh has {mesh.world} ranks but the job has {dist.get_world_size()}")
    P, D = mesh.expert_parallel, mesh.data_parallel
    ep_group = ep_dp_group = None
    ep_dp_ranks: tuple = ()
    for i in range(D):
        ranks = [i * P + j for j in range(P)]
        grp = dist.new_group(ranks) if P < mesh.world else dist.group.WORLD
        if rank in ranks:
            ep_group = grp
    if D > 1:
        for j in range(P):
            ranks = tuple(j + i * P for i in range(D))
            grp = dist.new_group(list(ranks))
            if rank in ranks:
                ep_dp_group, ep_dp_ranks = grp, ranks
    per_node = min(P, mesh.devices_per_node)
    nodes = P // per_node if P % per_node == 0 else 1
    intra = cross = None
    if hierarchical and nodes > 1:
        for i in range(D):
            base = i * P
            for n in range(nodes):
                ranks = [base + n * per_node + l for l in range(per_node)]
                grp = dist.new_group(ranks)
                if rank in ranks:
                    intra = grp
            for l in range(per_node):
                ranks = [base + n * per_node + l for n in range(nodes)]
                grp = dist.new_group(ranks)
                if rank in ranks:
                    cross = grp
    topo = Topology(world_group=dist.group.WORLD, ep_group=ep_group, ep_rank=rank % P, ep=P,
                    intra_group=intra, cross_group=cross, nodes=nodes if intra is not None else 1, per_node=per_node)
    return Groups(topo=topo, expert_dp_group=ep_dp_group, expert_dp_ranks=ep_dp_ranks)


def bind_model(gm, mesh: MeshShape, rank: int) -> Groups:
    """Bind a compiled model's collectives to the mesh's process groups."""
    spec_algorithms = {m.meta["comm"].algorithm for m in gm.graph.nodes if "comm" in m.meta}
    groups = make_groups(mesh, rank, hierarchical="hierarchical" in spec_algorithms)
    bind(gm, groups.topo)
    gm.groups = groups
    return groups
