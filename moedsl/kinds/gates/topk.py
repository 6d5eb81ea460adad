"""``topk``: top-k gating with the selected weights renormalised (Mixtral, Jiang et al. 2024,
§2.1), or sigmoid scores (DeepSeek-V3, Liu et al. 2024, §2.1.2); optionally group-limited
(``groups``: transformers' DeepseekV3TopkRouter) and scaled (``scale``: its
routed_scaling_factor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moedsl.schema import defaults

from . import CAPACITY_KEYS, Gate, GateType, check_k, register

_GATE = defaults("gate")


@dataclass(frozen=True)
class ExpertGroups:
    """Group-limited routing (DeepSeek-V3; transformers' DeepseekV3TopkRouter): ``count`` groups
    of consecutive expert ids, a token chooses among the ``top`` best groups only."""

    count: int
    top: int


@dataclass(frozen=True)
class Options(Gate):
    normalize: bool = _GATE["normalize"]  # the k selected weights renormalised to sum to 1
    score: str = _GATE["score"]  # softmax | sigmoid
    scale: float = _GATE["scale"]  # routed_scaling_factor
    groups: Optional[ExpertGroups] = None


class TopK(GateType):
    name = "topk"
    module = "TopKGate"
    Options = Options
    options = frozenset({"k", "normalize", "score", "scale", "groups", "jitter", "bias_balancing", *CAPACITY_KEYS})
    losses = frozenset({"importance", "balance", "z_loss"})
    sub_gate_options = frozenset({"k", "normalize", "jitter"})

    def check(self, g, path, experts, checks):
        check_k(g, path, experts, checks)
        if "groups" in g:
            check_groups(g, path, experts, checks)

    def build(self, g, **resolved):
        if "groups" in g:
            resolved["groups"] = ExpertGroups(count=g["groups"]["count"], top=g["groups"]["top"])
        return super().build(g, **resolved)


def check_groups(g: dict, path: tuple, experts: int, checks) -> None:
    """Group-limited routing: ``groups.count`` equal groups of at least 2 experts (a group's score
    is the sum of its two highest scores: ``topk(2)`` over each group in transformers'
    DeepseekV3TopkRouter), ``groups.top`` of them eligible, holding at least k experts."""
    count, top, k = g["groups"]["count"], g["groups"]["top"], g.get("k", 1)
    p = path + ("groups",)
    if experts % count:
        checks.error(p + ("count",), f"groups.count = {count} does not divide the {experts} experts",
                     "the experts split into groups of equal size: use a divisor of experts.count")
        return
    per = experts // count
    if per < 2:
        checks.error(p + ("count",), f"groups.count = {count} leaves {per} expert per group: a group's score is "
                     "the sum of its two highest scores, so each group needs at least 2 experts",
                     f"use at most {experts // 2} groups")
    if top > count:
        checks.error(p + ("top",), f"groups.top = {top} exceeds the {count} groups", "top must be at most groups.count")
    elif k > top * per:
        checks.error(path + ("k",), f"k = {k} exceeds the {top * per} experts of the {top} eligible groups "
                     f"(groups.top {top} × {per} experts per group)",
                     "lower k, or raise groups.top")


register(TopK())
