"""``switch``: the Switch Transformer's top-1 router (Fedus et al. 2022, §2.1-2.2): capacity
factor 1.25 (§2.2), router jitter 0.01 (§2.4), the balance loss of eq. 4."""
from __future__ import annotations

from . import CAPACITY_KEYS, GateType, register


class Switch(GateType):
    name = "switch"
    module = "SwitchGate"
    options = frozenset({"k", "jitter", "bias_balancing", *CAPACITY_KEYS})
    losses = frozenset({"importance", "balance", "z_loss"})
    default_capacity = 1.25
    option_defaults = {"jitter": 0.01}

    def k(self, g, experts):
        return 1


register(Switch())
