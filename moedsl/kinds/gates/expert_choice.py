"""``expert_choice``: each expert picks its top capacity_factor·n/E tokens (Zhou et al. 2022,
§3.1, capacity factor 2 in their main results); an optional cap on the experts per token (§3.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import TRAINING_ONLY, Gate, GateType, register


@dataclass(frozen=True)
class Options(Gate):
    max_experts_per_token: Optional[int] = None  # §3.2's cap on the experts one token gets


class ExpertChoice(GateType):
    name = "expert_choice"
    module = "ExpertChoiceGate"
    Options = Options
    options = frozenset({"capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy", "routing_groups",
                         "capacity_rounding", "max_experts_per_token", "jitter"})
    losses = frozenset({"z_loss"})
    losses_note = "expert choice is balanced by construction"
    default_capacity = 2.0
    can_be_dropless = False
    experts_choose = True
    capacity_is_budget = False  # capacity_factor is its k: the average experts per token (§3.1)
    # the cap is a compute budget like a token-choice gate's capacity; capacity_factor is not
    training_only = (TRAINING_ONLY - {"capacity_factor"}) | {"max_experts_per_token"}
    cannot_decode = ("expert choice routing lets each expert pick among the tokens of a whole batch: "
                     "it cannot decode token by token")

    def k(self, g, experts):
        return 0  # experts pick tokens

    def experts_per_token(self, gate, experts):
        return min(float(gate.capacity_factor), float(experts))

    def check(self, g, path, experts, checks):
        cap = g.get("max_experts_per_token")
        if cap is not None and cap > experts:
            checks.error(path + ("max_experts_per_token",), f"max_experts_per_token {cap} exceeds the {experts} experts")


register(ExpertChoice())
