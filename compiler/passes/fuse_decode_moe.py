"""Fuse decode MoE: on one process, each MoE layer of a decode graph becomes one call of a
``moedsl.nn.decode.DecodeMoE`` over the layer's own gate and experts modules, in place of its
route, dispatch, rows, sizes, experts, combine, aux-loss and statistics nodes. A decode step
routes a handful of tokens (B × k assignments); DecodeMoE computes them without the packed
path's sorting and slot bookkeeping (~30 small ops a layer), the same values.

A layer of specs/switch.yaml's decode graph (packed, one process), its nodes as fx prints them
(targets shortened):

    %layers_2_route : call_module[target=layers.2.gate](args = (%layers_2_tokens, None, 0, %layers_2_groups),
                                                        kwargs = {gidx: %layers_2_keys})
    %layers_2_dispatch : call_function[target=dispatch_packed](args = (%layers_2_tokens, %layers_2_route))
    %layers_2_rows : call_function[target=builtins.getattr](args = (%layers_2_dispatch, rows))
    %layers_2_sizes : call_function[target=builtins.getattr](args = (%layers_2_dispatch, sizes))
    %layers_2_experts : call_module[target=layers.2.experts](args = (%layers_2_rows, %layers_2_sizes))
    %layers_2_combine : call_function[target=combine_packed](args = (%layers_2_experts, %layers_2_dispatch,
                                                                     %layers_2_route))
    %layers_2_aux_loss : call_function[target=builtins.getattr](args = (%layers_2_route, aux_loss))
    %layers_2_router_stats : call_function[target=router_stats](args = (%layers_2_route, layers.2))

becomes (the combine's, aux loss's and statistics' users now read the three items)

    %layers_2_decode_moe : call_module[target=layers.2.decode_moe](args = (%layers_2_tokens, None, 0,
                                                                   %layers_2_groups), kwargs = {gidx: %layers_2_keys})
    %getitem : call_function[target=operator.getitem](args = (%layers_2_decode_moe, 0))    # y [S, d]
    %getitem_1 : call_function[target=operator.getitem](args = (%layers_2_decode_moe, 1))  # aux loss
    %getitem_2 : call_function[target=operator.getitem](args = (%layers_2_decode_moe, 2))  # RouterStats

A layer with a collective between the gate and the experts (experts split over processes), or
lowered with static buffers (``dispatch``/``combine`` over [E, C, d], for CUDA-graph capture),
is left as it is.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from moedsl.nn import moe_ops
from moedsl.nn.decode import DecodeMoE


def fuse_decode_moe(graph: fx.Graph, modules: dict) -> tuple[fx.Graph, bool]:
    """Fuse every MoE layer of ``graph`` whose tokens go from the gate to the experts and back on
    this process; its ``DecodeMoE`` is added to ``modules`` (qualified name -> module) as
    ``<layer>.decode_moe``. Returns the graph and whether it changed."""
    changed = False
    for route in [n for n in graph.nodes if n.op == "call_module" and n.meta.get("role") == "route"]:
        nodes = _local_layer(route)
        if nodes is None:
            continue
        disp, rows, sizes, experts, comb, aux, stats = nodes
        name = route.meta.get("moe_layer", route.target.rsplit(".", 1)[0])
        target = f"{name}.decode_moe"
        modules[target] = DecodeMoE(modules[route.target], modules[experts.target], stats.args[1])
        with graph.inserting_before(route):
            node = graph.call_module(target, route.args, dict(route.kwargs))
            node.meta.update(route.meta, role="decode_moe")
            outs = [graph.call_function(operator.getitem, (node, i)) for i in range(3)]
        for old, new in zip((comb, aux, stats), outs):
            new.meta.update(old.meta)
            old.replace_all_uses_with(new)
        for old in (stats, aux, comb, experts, rows, sizes, disp, route):
            graph.erase_node(old)
        changed = True
    return graph, changed


def _local_layer(route: fx.Node):
    """The (dispatch, rows, sizes, experts, combine, aux, stats) nodes of ``route``'s layer when
    they are the packed layout with nothing between them (no collective); None otherwise."""
    users = {u.meta.get("role"): u for u in route.users}
    disp, comb, aux, stats = (users.get(r) for r in ("dispatch", "combine", "aux", "stats"))
    if len(users) != 4 or None in (disp, comb, aux, stats) or disp.target is not moe_ops.dispatch_packed \
            or comb.target is not moe_ops.combine_packed or len(disp.args) != 2:
        return None
    parts = {u.meta.get("role"): u for u in disp.users}
    rows, sizes = parts.get("rows"), parts.get("sizes")
    if set(parts) != {"rows", "sizes", "combine"} or len(rows.users) != 1:
        return None
    experts = next(iter(rows.users))
    if experts.op != "call_module" or experts.args != (rows, sizes) or comb.args[0] is not experts:
        return None
    return disp, rows, sizes, experts, comb, aux, stats
