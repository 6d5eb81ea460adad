"""Replication policies: which logical expert each physical slot of an MoE layer holds.

A layer with E logical experts and R redundant slots has E + R physical slots, spread evenly
over its P expert-parallel ranks, rank-major: slot j sits on rank j // ((E + R) / P). A
placement is ``phy2log``, the logical expert of every slot. Two policies compute one from a
measured load (tokens per logical expert):

- ``eplb``: DeepSeek's expert-parallel load balancer (deepseek-ai/EPLB, ``eplb.py``, MIT),
  ported function by function: ``replicate_experts`` gives one more replica to the expert
  with the highest load per replica until the slots are used; ``balanced_packing`` puts the
  heaviest item on the lightest pack that has room; ``rebalance_experts_hierarchical`` packs
  expert groups onto nodes, replicates within each node and packs the replicas onto the
  node's devices (where the nodes divide the groups; else one group on one node, "global").
  DeepSeek's README example is reproduced exactly (tests/test_replication.py).
- ``shadow``: FasterMoE's rule (He et al. 2022, "FasterMoE", PPoPP '22, §4; laekov/fastmoe
  ``fmoe/fastermoe/shadow_policy.py``): copy the hottest expert to every rank while the
  modelled step time falls, the model being ``model_step`` with the plan's figures.

**Where our port differs from EPLB's code**, and only where EPLB's output would put two copies
of one expert on one device (which the runtime cannot hold: a rank has one slot per expert it
serves, and a second copy there takes no tokens):

1. ``replicate_experts`` never gives an expert more replicas than there are devices to hold
   them (the node's devices, hierarchical; all of them, global): EPLB's code would, when one
   expert carries more than 1/devices of the load.
2. ``balanced_packing`` puts an item on the lightest pack with room *that does not hold the
   same expert yet*; EPLB takes the lightest pack with room, whatever it holds (two replicas
   of a hot expert both land on a device left light by the heavy items before them).
3. Where the greedy order leaves only packs that hold the expert (the last item, say),
   ``_separate`` swaps items between packs until no pack holds an expert twice: each swap
   moves a duplicate into a pack without that expert, in exchange for an item the first pack
   lacks or the second holds twice, so duplicates strictly fall and the loop ends (a swap
   always exists while an expert has no more replicas than packs); of the possible swaps the
   one leaving the heavier of the two packs lightest is taken.
4. Hierarchical packing is used only where a node's devices can hold its replicas without
   duplicates (E + R ≤ E × devices per node); else global, as EPLB itself falls back to
   global where the nodes do not divide the groups.

Where EPLB's output has no duplicate, none of these changes anything: each only acts where
EPLB's own choice would have made one, so its output is ours, bit for bit.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .passes.placement import LayerPlacement, place_layer, position_share, targets_of

# ----------------------------------------------------------------------------- EPLB, ported
# Shapes: X = rows (layers, or layers × nodes), n = items, m = packs.


def _f32(x: float) -> float:
    """x rounded to float32: EPLB sums pack weights as float32 tensors; a sum of two float32
    values computed in float64 and rounded once is the float32 sum (53 ≥ 2·24 + 2 bits)."""
    return float(np.float32(x))


def balanced_packing(weight: torch.Tensor, num_packs: int,
                     labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n weighted items [X, n] onto ``num_packs`` packs of n / num_packs items each, as
    balanced as possible: heaviest first, each onto the lightest pack with room (EPLB's
    ``balanced_packing``). ``labels`` [X, n]: the expert each item is a replica of; an item
    goes to the lightest pack with room that holds no replica of its expert (rules 2 and 3 of
    the module docstring). Returns pack_index [X, n] and rank_in_pack [X, n]."""
    num_layers, num_groups = weight.shape
    if num_groups % num_packs:
        raise ValueError(f"balanced_packing: {num_groups} items do not divide into {num_packs} equal packs")
    groups_per_pack = num_groups // num_packs

    if groups_per_pack == 1:
        pack_index = torch.arange(weight.size(-1), dtype=torch.int64, device=weight.device).expand(weight.shape)
        rank_in_pack = torch.zeros_like(weight, dtype=torch.int64)
        return pack_index, rank_in_pack

    indices = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    w32 = weight.float().cpu().tolist()
    for i in range(num_layers):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        held = [set() for _ in range(num_packs)] if labels is not None else None
        row_labels = labels[i].tolist() if labels is not None else None
        for group in indices[i].tolist():
            open_packs = [p for p in range(num_packs) if pack_items[p] < groups_per_pack]
            if held is not None:  # rule 2: not onto a pack that holds this expert already
                free = [p for p in open_packs if row_labels[group] not in held[p]]
                open_packs = free or open_packs  # none: rule 3 below separates them
            pack = min(open_packs, key=pack_weights.__getitem__)
            if held is not None:
                held[pack].add(row_labels[group])
            pack_index[i, group] = pack
            rank_in_pack[i, group] = pack_items[pack]
            pack_weights[pack] = _f32(pack_weights[pack] + w32[i][group])
            pack_items[pack] += 1
        if labels is not None:
            _separate(pack_index[i], rank_in_pack[i], w32[i], row_labels, num_packs)
    return pack_index, rank_in_pack


def _separate(pack_index: torch.Tensor, rank_in_pack: torch.Tensor, weight: list, labels: list,
              num_packs: int) -> None:
    """Rule 3: swap items between packs (in place, one row) until no pack holds two replicas
    of one expert. Needs every expert to have at most ``num_packs`` replicas."""
    packs = [[] for _ in range(num_packs)]
    for item, p in enumerate(pack_index.tolist()):
        packs[p].append(item)
    load = [sum(weight[i] for i in items) for items in packs]

    def dup(p: int):
        seen = set()
        for item in packs[p]:
            if labels[item] in seen:
                return item
            seen.add(labels[item])
        return None

    for p in range(num_packs):
        while (x := dup(p)) is not None:
            in_p = {labels[i] for i in packs[p] if i != x}
            best = None
            for q in range(num_packs):
                in_q = [labels[i] for i in packs[q]]
                if q == p or labels[x] in in_q:
                    continue
                for y in packs[q]:
                    # duplicates must fall: y is new to p, or y is itself a duplicate in q
                    if labels[y] in in_p and in_q.count(labels[y]) < 2:
                        continue
                    heavier = max(load[p] - weight[x] + weight[y], load[q] - weight[y] + weight[x])
                    if best is None or heavier < best[0]:
                        best = (heavier, q, y)
            if best is None:  # an expert with more replicas than packs: replicate_experts caps that
                raise ValueError(f"expert {labels[x]} has more replicas than there are devices ({num_packs})")
            _, q, y = best
            packs[p][packs[p].index(x)], packs[q][packs[q].index(y)] = y, x
            load[p], load[q] = load[p] - weight[x] + weight[y], load[q] - weight[y] + weight[x]
            px, rx = int(pack_index[x]), int(rank_in_pack[x])
            pack_index[x], rank_in_pack[x] = pack_index[y], rank_in_pack[y]
            pack_index[y], rank_in_pack[y] = px, rx


def replicate_experts(weight: torch.Tensor, num_phy: int,
                      max_copies: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate num_log experts [X, num_log] to ``num_phy`` replicas so that the largest load
    per replica is smallest: each redundant slot goes to the expert with the highest
    load / replicas (EPLB's ``replicate_experts``), among those with fewer than
    ``max_copies`` replicas (rule 1). Returns phy2log [X, num_phy], the replica rank of each
    slot [X, num_phy] and logcnt [X, num_log]."""
    n, num_log = weight.shape
    num_redundant = num_phy - num_log
    if num_redundant < 0:
        raise ValueError(f"replicate_experts: {num_phy} slots cannot hold {num_log} experts")
    if max_copies is not None and num_phy > num_log * max_copies:
        raise ValueError(f"{num_phy} slots need more than {max_copies} replicas of some of the {num_log} "
                         f"experts, so a device would hold two copies of one")
    device = weight.device
    phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64, device=device)
    logcnt = torch.ones(n, num_log, dtype=torch.int64, device=device)
    arangen = torch.arange(n, dtype=torch.int64, device=device)
    for i in range(num_log, num_phy):
        score = weight / logcnt
        if max_copies is not None:
            score = score.masked_fill(logcnt >= max_copies, float("-inf"))
        redundant_indices = score.max(dim=-1).indices
        phy2log[:, i] = redundant_indices
        rank[:, i] = logcnt[arangen, redundant_indices]
        logcnt[arangen, redundant_indices] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64, device=perm.device).expand(perm.shape))
    return inv


def rebalance_experts_hierarchical(weight: torch.Tensor, num_physical_experts: int, num_groups: int,
                                   num_nodes: int, num_gpus: int):
    """EPLB's hierarchical policy on weight [layers, E]: groups to nodes, replicas within each
    node, replicas to the node's devices. Returns phy2log [layers, E + R], the replica rank of
    each slot and logcnt [layers, E]."""
    num_layers, num_logical_experts = weight.shape
    if num_logical_experts % num_groups or num_groups % num_nodes or num_gpus % num_nodes \
            or num_physical_experts % num_gpus:
        raise ValueError(f"eplb: {num_logical_experts} experts in {num_groups} groups on {num_nodes} nodes of "
                         f"{num_gpus} devices with {num_physical_experts} slots: the groups must divide the "
                         f"experts, the nodes the groups and the devices, the devices the slots")
    group_size = num_logical_experts // num_groups
    groups_per_node = num_groups // num_nodes
    phy_experts_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups to nodes
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1) +
                torch.arange(group_size, dtype=torch.int64, device=group_pack_index.device)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: construct redundant experts within nodes, at most one per device of the node
    # [num_layers * num_nodes, num_logical_experts // num_nodes]
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical_experts // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes,
                                                   max_copies=num_gpus // num_nodes)

    # Step 3: pack physical experts to GPUs, no device holding one expert twice
    # [num_layers * num_nodes, num_physical_experts // num_nodes]
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes, labels=phy2mlog)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [num_layers * num_nodes, num_log_per_nodes]
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) +
                 torch.arange(0, num_logical_experts, num_logical_experts // num_nodes,
                              device=group_pack_index.device).view(1, -1, 1)).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def eplb(weight, num_replicas: int, num_groups: int, num_nodes: int,
         num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's ``rebalance_experts``: weight [layers, E] (a tensor or nested lists) →
    phy2log [layers, num_replicas], log2phy [layers, E, max replicas] (-1 padded) and
    logcnt [layers, E]. Hierarchical where the nodes divide the groups and a node's devices
    can hold its replicas without duplicates (rule 4), else global."""
    weight = torch.as_tensor(weight).float().cpu()
    num_layers, num_logical_experts = weight.shape
    if num_replicas > num_logical_experts * num_gpus:
        raise ValueError(f"eplb: {num_replicas} slots on {num_gpus} devices hold some of the "
                         f"{num_logical_experts} experts twice on one device")
    per_node = num_gpus // num_nodes if num_nodes and num_gpus % num_nodes == 0 else 0
    if num_groups % num_nodes == 0 and num_replicas <= num_logical_experts * per_node:
        # use hierarchical load-balance policy
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                                  num_gpus)
    else:
        # use global load-balance policy
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = logcnt.max().item()
    log2phy = torch.full((num_layers, num_logical_experts, maxlogcnt), -1, dtype=torch.int64, device=logcnt.device)
    log2phy.view(num_layers, -1).scatter_(-1, phy2log * maxlogcnt + phyrank,
                                          torch.arange(num_replicas, dtype=torch.int64,
                                                       device=log2phy.device).expand(num_layers, -1))
    return phy2log, log2phy, logcnt


# ----------------------------------------------------------------------------- the cost model
# P = expert-parallel ranks, E = logical experts, S = physical slots (E + R).


@dataclass(frozen=True)
class LayerCost:
    """The figures that price one training step of one MoE layer: from the spec's layer and
    ``placement.hardware`` (``layer_cost``), or written out (the benchmark's simulated meshes)."""

    flops_per_assignment: float  # training FLOPs of one token through one expert (3 × forward)
    row_bytes: float  # one token's activation row on the wire (d_model × dtype bytes)
    grad_bytes: float  # one expert's gradient, summed over its replicas (float32)
    device_flops: float  # FLOP/s a device sustains in the expert GEMMs
    intra_node_bandwidth: float  # bytes/s a device sends (and receives) inside its node
    inter_node_bandwidth: float  # bytes/s a device sends (and receives) to other nodes
    devices_per_node: int = 8  # which peers are across the (slower) inter-node links
    latency_s: float = 0.0  # seconds a collective takes however small (measured: gloo's; not a spec field)


def layer_cost(spec, layer, devices_per_node: Optional[int] = None) -> LayerCost:
    """The cost figures of MoE ``layer`` of ``spec``: its experts' parameters and the dtype
    from the spec, the device and link figures from ``placement.hardware``."""
    from moedsl import dtypes
    from moedsl.kinds import layer_kind

    m, hw = spec.model, spec.placement.hardware
    per = layer_kind("moe").parts(layer.config, m).per_expert
    mesh = spec.placement.mesh
    return LayerCost(flops_per_assignment=3 * 2 * per, row_bytes=m.d_model * dtypes.BYTES[m.dtype],
                     grad_bytes=4 * per, device_flops=hw.device_flops,
                     intra_node_bandwidth=hw.intra_node_bandwidth, inter_node_bandwidth=hw.inter_node_bandwidth,
                     devices_per_node=devices_per_node or (mesh.devices_per_node if mesh else 8))


@dataclass
class Modelled:
    """One MoE layer's modelled training step under a placement (seconds; tokens per step)."""

    rank_tokens: list  # [P] assignments each rank's experts compute
    sent_bytes: list  # [P] all-to-all bytes each rank sends (4 trips: dispatch, combine, their gradients)
    compute_s: float  # the busiest rank's expert GEMMs, forward and backward
    all_to_all_s: float  # 4 trips, each as long as its slowest rank
    sync_s: float  # the busiest rank's all-reduces of replicated experts' gradients

    @property
    def total_s(self) -> float:
        return self.compute_s + self.all_to_all_s + self.sync_s

    @property
    def balancedness(self) -> float:
        return balancedness(self.rank_tokens)


def balancedness(rank_tokens: Sequence[float]) -> float:
    """Mean over max of the tokens per rank: 1 is even, 1/P is everything on one rank, and the
    experts' share of a step takes about 1/balancedness times as long as it would evenly."""
    top = max(rank_tokens)
    return sum(rank_tokens) / len(rank_tokens) / top if top > 0 else 1.0


def split(n, copies: int) -> list:
    """A source's ``n`` tokens of an expert over ``copies`` copies by position: a count (an
    integer: a step's rows, as a run measures them) as position dispatch splits it, the first
    n mod copies copies one more; a float (a mean, a load split evenly over sources) evenly."""
    if isinstance(n, numbers.Integral):
        return [float(position_share(int(n), copies, c)) for c in range(copies)]
    return [n / copies] * copies


def _per_source(load, ep: int) -> list:
    """[P][E] tokens from each source rank: as given, or a [E] total split evenly over sources."""
    load = [[x if isinstance(x, numbers.Integral) else float(x) for x in row] for row in load] \
        if load and isinstance(load[0], (list, tuple)) else [[float(x) / ep for x in load]] * ep
    if len(load) != ep:
        raise ValueError(f"the load has {len(load)} source ranks, not the {ep} expert-parallel ranks")
    return load


def rank_tokens(phy2log: Sequence[int], load, ep: int, dispatch: str = "position",
                devices_per_node: int = 8) -> list:
    """[P] assignments each rank's experts compute under ``phy2log``. ``load``: [E] tokens per
    expert (split evenly over the source ranks) or [P][E] per source rank (whole numbers: each
    source's tokens split over the copies exactly as position dispatch splits them)."""
    src = _per_source(load, ep)
    hosts = LayerPlacement.of(phy2log, ep, experts=len(src[0])).hosts
    out = [0.0] * ep
    for s in range(ep):
        for e, n in enumerate(src[s]):
            to = targets_of(hosts[e], s, dispatch, devices_per_node)
            for d, part in zip(to, split(n, len(to))):
                out[d] += part
    return out


def model_step(phy2log: Sequence[int], load, ep: int, cost: LayerCost, dispatch: str = "position",
               hosts: Optional[list] = None) -> Modelled:
    """The modelled training step of one MoE layer: the busiest rank's expert compute (3 × the
    forward GEMMs), 4 all-to-all trips (dispatch and combine, forward and backward; a trip
    lasts as long as the rank with the most bytes to send or receive, each byte at its link's
    bandwidth) and the sum of each replicated expert's gradient over its copies (a ring
    all-reduce, 2 (c − 1) / c of the gradient per rank, serial on each rank). FasterMoE's
    model (§4, ``global_policy``) has the same three terms with one expert per rank: 3 ×
    compute and 4 × feature transfers of the busiest expert, plus the shadowed experts'
    parameter transfers. No overlap is modelled. ``load`` as for ``rank_tokens``, per step;
    ``hosts`` (per expert, its ranks; then ``phy2log`` is unused): a placement whose ranks
    hold unequal slot counts, as a static spec's may."""
    dpn = max(cost.devices_per_node, 1)
    flat = not (load and isinstance(load[0], (list, tuple)))
    E = len(load) if flat else len(load[0])
    hosts = hosts if hosts is not None else LayerPlacement.of(phy2log, ep, experts=E).hosts
    if flat and dispatch in ("source", "position"):  # the even split over sources: O(copies · (E + P))
        routed = _routed_evenly if dispatch == "source" else _routed_by_position
        tokens, send, recv = routed(hosts, [float(x) for x in load], ep, dpn)
    else:
        src = _per_source(load, ep)
        tokens = [0.0] * ep
        send = [[0.0, 0.0] for _ in range(ep)]  # [intra, inter] rows
        recv = [[0.0, 0.0] for _ in range(ep)]
        for s in range(ep):
            for e, n in enumerate(src[s]):
                to = targets_of(hosts[e], s, dispatch, dpn)
                for d, part in zip(to, split(n, len(to))):
                    tokens[d] += part
                    if d != s:
                        kind = 0 if d // dpn == s // dpn else 1
                        send[s][kind] += part
                        recv[d][kind] += part
    bw = (cost.intra_node_bandwidth, cost.inter_node_bandwidth)

    def seconds(rows):
        return sum(r * cost.row_bytes / b for r, b in zip(rows, bw))

    trip = cost.latency_s + max(max(seconds(send[r]), seconds(recv[r])) for r in range(ep))
    sync = [0.0] * ep
    for hs in hosts:
        c = len(hs)
        if c > 1:
            spans = len({h // dpn for h in hs}) > 1
            t = cost.latency_s + 2 * (c - 1) / c * cost.grad_bytes / bw[1 if spans else 0]
            for h in hs:
                sync[h] += t
    # a rank sends its tokens out (dispatch; the combine's gradient) and the rows it computed back
    # (combine; the dispatch's gradient): compiler/collectives.py counts the same in Traffic.sent
    return Modelled(rank_tokens=tokens, sent_bytes=[2 * (sum(send[r]) + sum(recv[r])) * cost.row_bytes
                                                    for r in range(ep)],
                    compute_s=max(tokens) * cost.flops_per_assignment / cost.device_flops,
                    all_to_all_s=4 * trip, sync_s=max(sync))


@dataclass
class LayerReplan:
    """One MoE layer's step before replication (the spec's placement) and after (a policy's)."""

    layer: str
    policy: str
    redundant: int
    phy2log: tuple
    before: Modelled
    after: Modelled


def replan(spec, compiled, loads: dict, policy_spec) -> list:
    """``moedsl plan --load``: per MoE layer of ``compiled``, the modelled step under the spec's
    placement and under the one ``policy_spec`` computes from ``loads`` (layer name → load per
    expert, any scale: shares or counts), scaled to the assignments of one step of the
    expert-parallel group (the plan's batch × its experts per token)."""
    mesh = compiled.mesh
    ep = mesh.expert_parallel
    B_local, T = compiled.static.batch
    fixed = dataclasses.replace(spec.placement, replication=None)
    nodes = max(1, ep // mesh.devices_per_node) if ep % mesh.devices_per_node == 0 else 1
    out = []
    for layer in spec.moe_layers:
        name = f"layers.{layer.index}"
        cfg = layer.config
        E = cfg.experts.count
        raw = [float(x) for x in loads[name]]
        if len(raw) != E:
            raise ValueError(f"{name}: the load lists {len(raw)} experts, the layer has {E}")
        total = sum(raw) or 1.0
        per_step = [x / total * B_local * T * ep * cfg.experts_per_token for x in raw]
        cost = layer_cost(spec, layer, devices_per_node=min(ep, mesh.devices_per_node))
        # before: the spec's placement without replicas (a replicated spec's compiled placement is
        # already its initial E + R slots), dispatched as it is (static replicas: source)
        lp = place_layer(fixed, layer.moe_index, E, ep)
        before = model_step((), per_step, ep, cost, lp.dispatch, hosts=[list(h) for h in lp.hosts])
        groups = getattr(cfg.gate, "groups", None)
        phy2log = place(policy_spec, [x * policy_spec.window for x in per_step], ep, nodes,
                        groups.count if groups is not None else None, cost)
        after = model_step(phy2log, per_step, ep, cost, policy_spec.dispatch)
        out.append(LayerReplan(layer=name, policy=policy_spec.policy, redundant=policy_spec.redundant,
                               phy2log=phy2log, before=before, after=after))
    return out


def _routed_by_position(hosts: list, load: list, ep: int, dpn: int) -> tuple:
    """``model_step``'s routing, for a load split evenly over the sources and position dispatch,
    without the P × E loop: every source sends each copy of expert e load_e / (P · c). Returns
    tokens [P], send and recv [P][intra, inter] rows, as the loop computes them."""
    node = np.arange(ep) // dpn
    nodes = int(node[-1]) + 1
    on_node = np.bincount(node, minlength=nodes)  # ranks per node
    tokens, send, recv = np.zeros(ep), np.zeros((ep, 2)), np.zeros((ep, 2))
    H = np.array([h for hs in hosts for h in hs], dtype=np.int64)  # every copy's rank
    L = np.array([load[e] / len(hs) for e, hs in enumerate(hosts) for _ in hs])  # its tokens, from all sources
    per = L / ep  # from each source
    np.add.at(tokens, H, L)
    np.add.at(recv[:, 0], H, (on_node[node[H]] - 1) * per)
    np.add.at(recv[:, 1], H, (ep - on_node[node[H]]) * per)
    node_sum = np.bincount(node[H], weights=per, minlength=nodes)  # per source, to the copies on each node
    own = np.bincount(H, weights=per, minlength=ep)
    send[:, 0] = node_sum[node] - own
    send[:, 1] = per.sum() - node_sum[node]
    return tokens.tolist(), send.tolist(), recv.tolist()


def _routed_evenly(hosts: list, load: list, ep: int, dpn: int) -> tuple:
    """``model_step``'s routing, for a load split evenly over the sources and source dispatch,
    without the P × E loop (2,048 ranks × 8,192 experts): the sources s ≡ j (mod c) of an
    expert with c copies all send to its copy j. Returns tokens [P], send and recv [P][intra,
    inter] rows, as the loop computes them."""
    node = np.arange(ep) // dpn
    nodes = int(node[-1]) + 1
    tokens, send, recv = np.zeros(ep), np.zeros((ep, 2)), np.zeros((ep, 2))
    by_copies: dict = {}
    for e, h in enumerate(hosts):
        by_copies.setdefault(len(h), []).append(e)
    for c, es in by_copies.items():
        H = np.array([hosts[e] for e in es], dtype=np.int64)  # [n, c]
        L = np.array([load[e] for e in es]) / ep  # each source's tokens of each expert
        for j in range(c):
            S = np.arange(j, ep, c)  # the sources sending to copy j
            h = H[:, j]
            per_node = np.bincount(node[S], minlength=nodes)  # sources of S on each node
            local = (h % c) == j  # the copy's own rank is one of the sources
            np.add.at(tokens, h, len(S) * L)
            np.add.at(recv[:, 0], h, (per_node[node[h]] - local) * L)
            np.add.at(recv[:, 1], h, (len(S) - per_node[node[h]]) * L)
            node_sum = np.bincount(node[h], weights=L, minlength=nodes)
            own = np.bincount(h, weights=L, minlength=ep)
            send[S, 0] += node_sum[node[S]] - own[S]
            send[S, 1] += L.sum() - node_sum[node[S]]
    return tokens.tolist(), send.tolist(), recv.tolist()


# ----------------------------------------------------------------------------- the policies


def shadow(load: Sequence[float], redundant: int, ep: int, cost: LayerCost, dispatch: str = "position") -> tuple:
    """FasterMoE's rule (§4; ``shadow_policy.global_policy``): sort the experts by load, then
    shadow (copy to every rank) the hottest, the next, ... while the modelled step time falls;
    stop at the first that does not lower it. Shadowing s experts takes s slots on every rank
    (s (P − 1) redundant slots, so s ≤ R / (P − 1)); the slots left over hold the other experts
    and their replicas, placed by EPLB's global policy over the P ranks. Returns phy2log
    (rank-major; each rank's shadow copies after its own slots). ``load``: tokens per step."""
    E = len(load)
    S = E + redundant
    if S % ep:
        raise ValueError(f"shadow: {E} experts + {redundant} redundant slots do not divide over {ep} ranks")
    order = torch.as_tensor([float(x) for x in load]).sort(0, descending=True).indices.tolist()
    most = min(redundant // (ep - 1), E) if ep > 1 else 0

    def placement(s: int) -> tuple:
        hot, rest = order[:s], sorted(order[s:])
        per = S // ep - s
        if rest:
            sub = eplb([[float(load[e]) for e in rest]], per * ep, 1, 1, ep)[0][0].tolist()
            sub = [rest[i] for i in sub]
        else:
            sub = []
        return tuple(x for r in range(ep) for x in sub[r * per:(r + 1) * per] + hot)

    best = placement(0)
    best_t = model_step(best, load, ep, cost, dispatch).total_s
    for s in range(1, most + 1):
        cand = placement(s)
        t = model_step(cand, load, ep, cost, dispatch).total_s
        if t < best_t:
            best, best_t = cand, t
        else:
            break
    return best


def place(policy_spec, load: Sequence[float], ep: int, nodes: int = 1, groups: Optional[int] = None,
          cost: Optional[LayerCost] = None) -> tuple:
    """The placement of one MoE layer: phy2log of its E + R physical slots, rank-major (slot j
    on rank j // ((E + R) / ep)).

    ``policy_spec``: a ``moedsl.spec.Replication``; ``load``: tokens per logical expert summed
    over the last ``window`` steps; ``nodes``: nodes the expert-parallel group spans;
    ``groups``: the gate's expert groups (group-limited routing), None for one; ``cost``: the
    figures ``shadow`` models the step with (``layer_cost``; eplb does not use them)."""
    E, R = len(load), policy_spec.redundant
    if (E + R) % ep:
        raise ValueError(f"{E} experts + {R} redundant slots do not divide over {ep} expert-parallel ranks")
    if E + R > E * ep:
        raise ValueError(f"{E + R} slots on {ep} ranks would put two copies of an expert on one rank "
                         f"(at most {E * (ep - 1)} redundant slots)")
    if policy_spec.policy == "eplb":
        g = groups if groups and E % groups == 0 else 1
        nodes = nodes if ep % nodes == 0 else 1
        return tuple(eplb([list(map(float, load))], E + R, g, nodes, ep)[0][0].tolist())
    if policy_spec.policy == "shadow":
        if cost is None:
            raise ValueError("the shadow policy needs the cost figures (layer_cost) to model the step")
        per_step = [float(x) / policy_spec.window for x in load]
        if ep % nodes == 0:
            cost = LayerCost(**{**cost.__dict__, "devices_per_node": ep // nodes})
        return shadow(per_step, R, ep, cost, policy_spec.dispatch)
    raise ValueError(f"unknown replication policy {policy_spec.policy!r} (eplb or shadow)")


__all__ = ["LayerCost", "LayerReplan", "Modelled", "balanced_packing", "balancedness", "eplb", "layer_cost",
           "model_step", "place", "rank_tokens", "rebalance_experts_hierarchical", "replan", "replicate_experts",
           "shadow"]
