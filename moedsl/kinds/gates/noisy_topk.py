"""``noisy_topk``: Shazeer et al. 2017, §2.1: H = x·W_g + N(0, 1)·softplus(x·W_noise) while
training, G = softmax(KeepTopK(H, k)); the importance and load losses of its Appendix A."""
from __future__ import annotations

from . import CAPACITY_KEYS, GateType, check_k, register


class NoisyTopK(GateType):
    name = "noisy_topk"
    module = "NoisyTopKGate"
    options = frozenset({"k", "noise_epsilon", "jitter", "bias_balancing", *CAPACITY_KEYS})
    losses = frozenset({"importance", "load", "balance", "z_loss"})
    sub_gate_options = frozenset({"k", "noise_epsilon", "jitter"})

    def check(self, g, path, experts, checks):
        check_k(g, path, experts, checks)


register(NoisyTopK())
