"""``topk``: top-k gating with the selected weights renormalised (Mixtral, Jiang et al. 2024,
§2.1), or sigmoid scores (DeepSeek-V3, Liu et al. 2024, §2.1.2)."""
from __future__ import annotations

from . import CAPACITY_KEYS, GateType, check_k, register


class TopK(GateType):
    name = "topk"
    module = "TopKGate"
    options = frozenset({"k", "normalize", "score", "jitter", "bias_balancing", *CAPACITY_KEYS})
    losses = frozenset({"importance", "balance", "z_loss"})
    sub_gate_options = frozenset({"k", "normalize", "jitter"})

    def check(self, g, path, experts, checks):
        check_k(g, path, experts, checks)


register(TopK())
