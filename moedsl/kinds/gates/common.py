"""The options every gate type has (``Gate``); each gate type's module subclasses it with its own.

Not in the package's ``__init__``: a dataclass's generated ``__hash__`` calls ``hash`` from its
module's namespace, and the package's namespace holds the ``hash`` gate type's module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

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
    capacity_rounding: str = _GATE["capacity_rounding"]  # ceil | round (V-MoE) | ceil_per_choice (fairseq)
    routing_groups: Union[int, str] = _GATE["routing_groups"]  # a count, or "sequence": one per sequence
    jitter: float = 0.0  # resolved per type (switch: 0.01)
    bias_balancing_rate: Optional[float] = None  # 0: a fixed choice bias (loaded, never moved)
    expert_capacity: Optional[int] = None  # an absolute C per routing group, instead of capacity_factor
    eval_capacity_fraction: Optional[float] = None  # not training: C = ceil(fraction · tokens)
    dropped_tokens: str = _GATE["dropped_tokens"]  # residual | scaled_input | never (resolved: dropless)
    route_padding: bool = _GATE["route_padding"]  # false: padding takes no expert, the capacity counts it

    @property
    def has_capacity(self) -> bool:
        return self.capacity_factor is not None or self.expert_capacity is not None

    @property
    def per_sequence(self) -> bool:
        """Each sequence is a routing group of its own (``routing_groups: sequence``)."""
        return self.routing_groups == "sequence"

    def group_count(self, sequences: int) -> int:
        """The routing groups of a batch of ``sequences`` sequences."""
        return sequences if self.per_sequence else self.routing_groups

    def capacity(self, tokens: int, experts: int, training: bool = True) -> int:
        """C = ceil(capacity_factor · k · tokens / experts), at least min_capacity; with
        ``capacity_rounding: round``, C = round(k · tokens · capacity_factor / experts) (V-MoE,
        Riquelme et al. 2021, §2.2; Python's round, halves to the even neighbour); with
        ``ceil_per_choice``, C = k · ceil(capacity_factor · tokens / experts) (fairseq's
        top2gating: 2 · ceil(S / E)). ``expert_capacity`` gives C whatever the group's size
        (transformers' SwitchTransformers and NLLB-MoE), and when not training
        ``eval_capacity_fraction`` gives C = ceil(fraction · tokens) (fairseq's
        moe_eval_capacity_token_fraction) in place of either; an ``eval_capacity_factor`` is the
        factor of an evaluation's capacity with either (a capacity sweep's).

        A lone token (a routing group of one: a decode graph routes each token alone) always
        fits: at least one slot in each expert, where round(capacity_factor · k / E) would be 0
        below a half (a Switch gate over 8 experts) and drop every token of every step. Its k
        choices are distinct experts, so one slot each drops nothing.

        For expert choice k is 1 (each expert takes capacity_factor · tokens / E), and no
        expert can take more tokens than there are; without a capacity, every token fits.
        """
        if not self.has_capacity:
            return tokens
        k = self.k if self.k > 0 else 1
        if not training and self.eval_capacity_fraction is not None:  # fairseq: ceil(fraction · tokens)
            whole = math.ceil(self.eval_capacity_fraction * tokens - 1e-9)
        elif self.expert_capacity is not None and (training or self.eval_capacity_factor is None):
            whole = self.expert_capacity
        else:
            factor = self.capacity_factor if training else (self.eval_capacity_factor or self.capacity_factor)
            if self.capacity_rounding == "ceil_per_choice":
                whole = k * math.ceil(factor * tokens / experts - 1e-9)
            else:
                exact = factor * k * tokens / experts
                whole = round(exact) if self.capacity_rounding == "round" else math.ceil(exact - 1e-9)
        c = max(whole, self.min_capacity, 1 if tokens == 1 else 0)
        if self.k == 0:  # experts choose: an expert cannot take more tokens than there are
            c = min(c, tokens)
        return c
