"""The options every gate type has (``Gate``); each gate type's module subclasses it with its own.

Not in the package's ``__init__``: a dataclass's generated ``__hash__`` calls ``hash`` from its
module's namespace, and the package's namespace holds the ``hash`` gate type's module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from moedsl.schema import defaults

_GATE = defaults("gate")


@dataclass(frozen=True)
class Gate:
    """The options every gate has: the routing of one MoE layer. A gate type's module subclasses
    it (``Options``) with the options of its own.

    For a hierarchical MoE, the ``hierarchical`` type, ``k`` is the total number of experts per
    token (primary k × secondary k) and the sub-gates live in the layer's ``Hierarchy``.
    ``capacity_factor is None`` means no capacity (dropless, or a dense softmax gate).
    ``jitter`` and ``bias_balancing_rate`` are read by every router (``moedsl.nn.gates.Gate``);
    they stay 0 / None for the types whose ``options`` do not take them.
    """

    type: str
    k: int  # experts per token; expert_choice: 0 (experts pick tokens); softmax: experts.count
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = _GATE["min_capacity"]
    drop_policy: str = "dropless"  # drop | dropless (resolved per type: see moedsl.kinds.moe)
    drop_priority: str = _GATE["drop_priority"]  # position | score
    capacity_rounding: str = _GATE["capacity_rounding"]  # ceil | round (V-MoE)
    routing_groups: int = _GATE["routing_groups"]
    jitter: float = 0.0  # resolved per type (switch: 0.01)
    bias_balancing_rate: Optional[float] = None  # 0: a fixed choice bias (loaded, never moved)

    @property
    def has_capacity(self) -> bool:
        return self.capacity_factor is not None

    def capacity(self, tokens: int, experts: int, training: bool = True) -> int:
        """C = ceil(capacity_factor · k · tokens / experts), at least min_capacity; with
        ``capacity_rounding: round``, C = round(k · tokens · capacity_factor / experts) (V-MoE,
        Riquelme et al. 2021, §2.2; Python's round, halves to the even neighbour).

        A lone token (a routing group of one: a decode graph routes each token alone) always
        fits: at least one slot in each expert, where round(capacity_factor · k / E) would be 0
        below a half (a Switch gate over 8 experts) and drop every token of every step. Its k
        choices are distinct experts, so one slot each drops nothing.

        For expert choice k is 1 (each expert takes capacity_factor · tokens / E), and no
        expert can take more tokens than there are; without a capacity, every token fits.
        """
        if self.capacity_factor is None:
            return tokens
        factor = self.capacity_factor if training else (self.eval_capacity_factor or self.capacity_factor)
        k = self.k if self.k > 0 else 1
        exact = factor * k * tokens / experts
        whole = round(exact) if self.capacity_rounding == "round" else math.ceil(exact - 1e-9)
        c = max(whole, self.min_capacity, 1 if tokens == 1 else 0)
        if self.k == 0:  # experts choose: an expert cannot take more tokens than there are
            c = min(c, tokens)
        return c
