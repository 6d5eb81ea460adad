"""Graphviz DOT of a compiled graph: nodes named after what they mean, MoE roles coloured
(collectives red), so a placement can be read at a glance."""
from __future__ import annotations

import torch.fx as fx

COLOURS = {"route": "#fde68a", "dispatch": "#bfdbfe", "experts": "#bbf7d0", "combine": "#bfdbfe",
           "a2a_dispatch": "#fca5a5", "a2a_combine": "#fca5a5", "route_gather": "#fca5a5", "shared": "#d9f99d",
           "a2a_wait": "#fecaca", "join": "#bfdbfe"}


def _label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    shape = node.meta.get("shape")
    extra = f"\\n{list(shape) if isinstance(shape, tuple) else shape}" if shape else ""
    return f"{node.name}\\n{node.op}: {target}{extra}".replace('"', "'")


def to_dot(graph: fx.Graph, title: str = "moedsl") -> str:
    lines = [f'digraph "{title}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
             'fillcolor="#f3f4f6", fontname="Helvetica", fontsize=10];']
    for node in graph.nodes:
        colour = COLOURS.get(node.meta.get("role"), "#f3f4f6")
        lines.append(f'  "{node.name}" [label="{_label(node)}", fillcolor="{colour}"];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
