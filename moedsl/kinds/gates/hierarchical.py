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
    # what a resume may change in a level (``hierarchy.primary`` / ``secondary``): its training noise
    level_training_only = frozenset({"jitter", "noise_epsilon"})

    def resume_may_change(self, names, old, new):
        """``names`` below ``hierarchy:``: a level's option, or the layer's capacity."""
        if len(names) == 2 and names[0] in ("primary", "secondary"):
            return names[1] in self.level_training_only
        return super().resume_may_change(names, old, new)


register(Hierarchical())
