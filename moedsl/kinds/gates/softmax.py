"""``softmax``: dense softmax gating, G(x) = softmax(x·W_g); every expert computes every token
(Shazeer et al. 2017, §2.1)."""
from __future__ import annotations

from . import GateType, register


class Softmax(GateType):
    name = "softmax"
    module = "SoftmaxGate"
    options = frozenset({"jitter"})
    losses = frozenset({"importance", "z_loss"})
    dense = True
    capacity_is_budget = False  # no capacity: every expert takes every token
    sub_gate_options = frozenset({"jitter"})

    def k(self, g, experts):
        return experts


register(Softmax())
