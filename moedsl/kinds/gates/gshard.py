"""``gshard``: GShard's top-2 gating (Lepikhin et al. 2021, Algorithm 1): g1, g2 normalised, the
second expert kept with probability min(1, 2·g2), capacity factor 1. With its options, fairseq's
top2gating as NLLB-MoE trains it (NLLB Team 2022; transformers' NllbMoeTop2Router): a second
expert sampled by Gumbel noise, g1, g2 normalised after the drops."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import CAPACITY_KEYS, Gate, GateType, register

_GATE = defaults("gate")


@dataclass(frozen=True)
class Options(Gate):
    second_expert: str = _GATE["second_expert"]  # random (Algorithm 1) | always | sampling (fairseq)
    normalize: bool = _GATE["normalize"]  # g1, g2 normalised to sum to 1
    normalize_after_drops: bool = _GATE["normalize_after_drops"]  # over the kept ones (fairseq's default)


class GShard(GateType):
    name = "gshard"
    module = "GShardGate"
    Options = Options
    options = frozenset({"k", "second_expert", "normalize", "normalize_after_drops", "jitter", "bias_balancing",
                         *CAPACITY_KEYS})
    losses = frozenset({"importance", "balance", "z_loss"})
    default_capacity = 1.0

    def k(self, g, experts):
        return 2

    def check(self, g, path, experts, checks):
        if experts < 2:
            checks.error(path + ("type",), f"gshard routes to 2 experts but the layer has {experts}")
        if g.get("normalize_after_drops") and not g.get("normalize", _GATE["normalize"]):
            checks.error(path + ("normalize_after_drops",), "normalize_after_drops needs normalize: true",
                         "remove normalize: false, or normalize_after_drops")


register(GShard())
