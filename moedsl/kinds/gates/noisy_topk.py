"""``noisy_topk``: Shazeer et al. 2017, §2.1: H = x·W_g + N(0, 1)·softplus(x·W_noise) while
training, G = softmax(KeepTopK(H, k)); the importance and load losses of its Appendix A."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import CAPACITY_KEYS, TRAINING_ONLY, Gate, GateType, check_k, register


@dataclass(frozen=True)
class Options(Gate):
    noise_epsilon: float = defaults("gate")["noise_epsilon"]  # added to softplus(x·W_noise)


class NoisyTopK(GateType):
    name = "noisy_topk"
    module = "NoisyTopKGate"
    Options = Options
    noise = True
    training_only = TRAINING_ONLY | {"noise_epsilon"}  # the noise is drawn in training only (eq. 4)
    options = frozenset({"k", "noise_epsilon", "jitter", "bias_balancing", *CAPACITY_KEYS})
    losses = frozenset({"importance", "load", "balance", "z_loss"})
    sub_gate_options = frozenset({"k", "noise_epsilon", "jitter"})

    def check(self, g, path, experts, checks):
        check_k(g, path, experts, checks)


register(NoisyTopK())
