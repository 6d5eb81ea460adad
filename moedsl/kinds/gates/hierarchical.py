"""``hierarchical``: Shazeer et al. 2017's hierarchical MoE (Appendix B): a primary gate over
groups, a secondary gate per group. Made from a layer's ``hierarchy:`` (not a ``gate.type``);
its levels are gate types with ``sub_gate_options``."""
from __future__ import annotations

from . import GateType, register


class Hierarchical(GateType):
    name = "hierarchical"
    module = "HierarchicalGate"
    losses = frozenset({"importance", "load", "z_loss"})
    in_schema = False


register(Hierarchical())
