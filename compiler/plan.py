"""The Plan: what a compiled spec costs, from the spec and placement alone (no weights).

- parameters: total, per device, and active per token (shared + k experts' parameters);
- FLOPs per token: forward (2 per multiply-add of the active matmuls, plus attention
  scores), training (3 × forward), and with capacity padding (an expert computes all C
  slots of its buffer, filled or not);
- memory per device: weights for inference; for training the float32 master weights,
  gradients and AdamW moments, the 16-bit working copies and the activations kept for the
  backward, under the spec's (or the given) shard mode, recomputation and micro-batches
  (``moedsl.compiler.memory_plan``);
- bytes each rank sends and receives per step in the all-to-alls, and separately in the
  token gather of layers routed as one batch, split by link kind (intra-node, inter-node)
  over a networkx model of the mesh; exact for static (capacity) layers, and assuming
  balanced routing with nothing dropped for the data-dependent ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import networkx as nx

from moedsl import dtypes
from moedsl import spec as S
from moedsl.kinds import layer_kind
from moedsl.kinds.gates import gate_type
from moedsl.params import count_parameters, layer_counts
from moedsl.mesh import MeshShape

from .memory_plan import Settings, rank_memory


@dataclass
class LayerTraffic:
    layer: str
    scope: str
    layout: str
    capacity: int | None  # slots per expert on this rank's buffer (per step)
    send_bytes: dict = field(default_factory=dict)  # link kind -> all-to-all bytes this rank sends per step
    recv_bytes: dict = field(default_factory=dict)
    gather_bytes: dict = field(default_factory=dict)  # link kind -> token all-gather bytes sent per step
    messages: dict = field(default_factory=dict)  # link kind -> messages per step


@dataclass
class Plan:
    spec: str
    world: int
    nodes: int
    devices_per_node: int
    expert_parallel: int
    data_parallel: int
    rank: int
    batch: tuple  # (global batch, sequence)
    dtype: str
    params_total: int
    params_active_per_token: int
    params_on_device: int
    expert_params_on_device: int
    flops_per_token_forward: float
    flops_per_token_train: float
    flops_per_token_forward_padded: float
    memory_weights: int  # bytes on this device for inference (dtype weights)
    memory_train_states: int  # fp32 master + grads + AdamW m, v (this rank's shards)
    memory_activations: int  # training activations kept for the backward, estimate (one micro-batch)
    a2a_send_bytes: dict  # link kind -> all-to-all bytes per training step (forward + backward)
    a2a_recv_bytes: dict
    gather_send_bytes: dict  # link kind -> token all-gather bytes (layers routed as one batch)
    capturable: bool
    layout: str = "static"  # static (padded [E, C, d] buffers) | grouped (only the kept rows, packed)
    device: str = "cuda"  # the device type the layout is the one of
    layers: list = field(default_factory=list)  # [LayerTraffic]
    shard: str = "none"  # the settings the training memory is for
    recompute: str = "none"
    micro_batches: int = 1
    memory_params: int = 0  # float32 master weights held (this rank's shards)
    memory_grads: int = 0
    memory_optimizer: int = 0  # AdamW's moments
    memory_working: int = 0  # 16-bit casts of the weights, or under shard full the gathered layers
    memory_train_total: int = 0  # a training step: states + working copies + activations

    def to_dict(self) -> dict:
        return asdict(self)


def mesh_graph(mesh: MeshShape) -> nx.Graph:
    """Devices as nodes (rank, with its node index); every pair linked, 'intra' within a node
    (NVLink-class) and 'inter' across nodes (the network)."""
    g = nx.Graph()
    for r in range(mesh.world):
        g.add_node(r, node=r // mesh.devices_per_node)
    return g


def link(g: nx.Graph, a: int, b: int) -> str:
    return "intra" if g.nodes[a]["node"] == g.nodes[b]["node"] else "inter"


def make_plan(spec: S.Spec, compiled, settings: Settings | None = None) -> Plan:
    """The plan of ``compiled`` (one rank's graph of ``spec``); its training memory under ``settings``
    (default: the spec's placement.shard, train.recompute and train.micro_batches)."""
    mesh, rank = compiled.mesh, compiled.rank
    B_local, T = compiled.static.batch
    m = spec.model
    wb = dtypes.BYTES[m.dtype]
    total, active = count_parameters(spec)
    flops = padded = 0.0
    on_device = experts_here = 0
    ep_rank = rank % mesh.expert_parallel
    for layer, (n, _) in zip(spec.layers, layer_counts(spec)):
        cfg, kind = layer.config, layer_kind(layer.kind)
        f = kind.flops(cfg, m, T)
        flops += f
        if layer.kind != "moe":
            on_device += n
            padded += f
            continue
        name = f"layers.{layer.index}"
        e, g = cfg.experts, cfg.gate
        per = kind.parts(cfg, m).per_expert
        local = len(compiled.placements[name].slots[ep_rank])
        on_device += n - e.count * per + local * per
        experts_here += local * per
        if g.has_capacity or gate_type(g.type).dense:  # every slot of the buffer is computed
            n_tok = B_local * T // compiled.comms[name].groups
            C = n_tok if gate_type(g.type).dense else g.capacity(n_tok, e.count)
            padded += kind.fixed_flops(cfg, m) + 2 * per * C * e.count / n_tok
        else:
            padded += f
    layers, send, recv, gather = _traffic(spec, compiled, B_local, T, wb)
    mem = rank_memory(spec, compiled, settings or Settings.of(spec))
    return Plan(
        spec=spec.name, world=mesh.world, nodes=mesh.nodes, devices_per_node=mesh.devices_per_node,
        expert_parallel=mesh.expert_parallel, data_parallel=mesh.data_parallel, rank=rank,
        batch=(B_local * mesh.world, T), dtype=m.dtype, params_total=total, params_active_per_token=active,
        params_on_device=on_device, expert_params_on_device=experts_here,
        flops_per_token_forward=flops, flops_per_token_train=3 * flops, flops_per_token_forward_padded=padded,
        memory_weights=on_device * wb, memory_train_states=mem.states, memory_activations=mem.activations,
        a2a_send_bytes=send, a2a_recv_bytes=recv, gather_send_bytes=gather,
        capturable=compiled.static.capturable, layout=compiled.layout, device=compiled.target, layers=layers,
        shard=mem.settings.shard, recompute=mem.settings.recompute, micro_batches=mem.settings.micro_batches,
        memory_params=mem.params, memory_grads=mem.grads, memory_optimizer=mem.optimizer,
        memory_working=mem.working, memory_train_total=mem.total)


def _traffic(spec, compiled, B_local, T, wb):
    mesh, rank = compiled.mesh, compiled.rank
    g = mesh_graph(mesh)
    P = mesh.expert_parallel
    ep_rank, group0 = rank % P, rank - rank % P
    d = spec.model.d_model
    S_local = B_local * T
    layers, send, recv, gather = [], {"intra": 0, "inter": 0}, {"intra": 0, "inter": 0}, {"intra": 0, "inter": 0}
    for info in spec.moe_layers:
        name = f"layers.{info.index}"
        comm, lp, cfg = compiled.comms[name], compiled.placements[name], info.config
        t = LayerTraffic(layer=name, scope=comm.scope, layout=comm.layout, capacity=None,
                         send_bytes={"intra": 0, "inter": 0}, recv_bytes={"intra": 0, "inter": 0},
                         gather_bytes={"intra": 0, "inter": 0}, messages={"intra": 0, "inter": 0})
        if comm.scope == "global":  # all-gather of tokens, and its gradient
            for r in range(mesh.world):
                if r != rank:
                    kind = link(g, rank, r)
                    t.gather_bytes[kind] += 2 * S_local * d * wb
                    t.messages[kind] += 2
        if comm.expert_parallel:
            E = cfg.experts.count
            if comm.layout == "capacity":
                n_tok = S_local // comm.groups
                C = comm.groups * (n_tok if gate_type(cfg.gate.type).dense else cfg.gate.capacity(n_tok, E))
                t.capacity = C
                rows_to = lp.sends(ep_rank, C)  # position dispatch splits a block over its copies
                rows_from = lp.receives(ep_rank, C)
            else:  # balanced routing: k·S assignments spread over the experts' hosts
                k = cfg.experts_per_token
                slots = max(sum(len(s) for s in lp.slots), 1)
                share = [len(lp.slots[r]) / slots for r in range(P)]
                rows_to = [k * S_local * share[r] for r in range(P)]
                rows_from = [k * S_local * share[ep_rank]] * P
            # dispatch + combine, forward and backward: 4 trips of the same size each way, in each of
            # the layer's overlap chunks (the bytes split over them)
            chunks = cfg.overlap.chunks
            per_node = min(P, mesh.devices_per_node)
            if comm.algorithm == "hierarchical" and P > per_node and P % per_node == 0:
                node, local = divmod(ep_rank, per_node)
                for r in range(P):  # stage 1 to the right local rank, stage 2 to the right node
                    n2, l2 = divmod(r, per_node)
                    for kind, moves in (("intra", l2 != local), ("inter", n2 != node)):
                        if moves:
                            t.send_bytes[kind] += 4 * rows_to[r] * d * wb
                            t.recv_bytes[kind] += 4 * rows_from[r] * d * wb
                t.messages["intra"] += 4 * chunks * (per_node - 1)
                t.messages["inter"] += 4 * chunks * (P // per_node - 1)
            else:
                for r in range(P):
                    if r == ep_rank:
                        continue
                    kind = link(g, rank, group0 + r)
                    t.send_bytes[kind] += 4 * rows_to[r] * d * wb
                    t.recv_bytes[kind] += 4 * rows_from[r] * d * wb
                    t.messages[kind] += 4 * chunks
        for kind in ("intra", "inter"):
            send[kind] += int(t.send_bytes[kind])
            recv[kind] += int(t.recv_bytes[kind])
            gather[kind] += int(t.gather_bytes[kind])
            t.send_bytes[kind], t.recv_bytes[kind] = int(t.send_bytes[kind]), int(t.recv_bytes[kind])
        layers.append(t)
    return layers, send, recv, gather


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def human_flops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.0f} FLOP"


__all__ = ["Plan", "make_plan", "mesh_graph", "human_bytes", "human_flops"]
