"""Share token keys: a decode graph's MoE layers each derive their tokens' routing keys (the keys
of GShard's random draws) from the step's positions, the same function of the same inputs; this
pass keeps the first such node and points every later layer at it (common subexpression
elimination, for one function).

    positions -> layers_2_keys -> layers_2_route          positions -> layers_2_keys -> layers_2_route
              -> layers_4_keys -> layers_4_route    =>                              -> layers_4_route
"""
from __future__ import annotations

import torch.fx as fx

from moedsl.kinds.moe import decode_token_keys


def share_token_keys(graph: fx.Graph) -> tuple[fx.Graph, bool]:
    """Every ``decode_token_keys`` node with the same arguments as an earlier one replaced by it;
    returns the graph and whether it changed."""
    first, changed = {}, False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is decode_token_keys and not node.kwargs:
            got = first.setdefault(node.args, node)
            if got is not node:
                node.replace_all_uses_with(got)
                graph.erase_node(node)
                changed = True
    return graph, changed
