"""Gate types: one module each, registered by its ``gate.type`` name.

A gate type's module says which options of ``gate:`` mean something for it and its options
dataclass (``Options``: ``Gate``'s fields, which every gate has, plus its own), the experts
per token it fixes, the paper's capacity factor (a gate with one drops by default), the
auxiliary losses it defines, its semantic checks, which options a resume may change, what
decoding and inspection need to know of it, and its ``nn.Module`` class in
``moedsl.nn.gates`` (where the routing itself is computed). Its schema entry is its name in
the ``gate_types`` enum and the descriptions of its options in ``moedsl.schema.json``.
Nothing outside a gate type's module asks for it by name: code that needs to know something
of a gate asks its type (``gate_type(gate.type)``) through the attributes below.
"""
from __future__ import annotations

from typing import Optional

from .. import take
from .common import Gate

# capacity and dropping: options of every gate with a router that drops (and of `hierarchy`)
CAPACITY_KEYS = frozenset({"capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy",
                           "drop_priority", "routing_groups", "capacity_rounding", "expert_capacity",
                           "eval_capacity_fraction", "dropped_tokens", "route_padding"})

# the options a resume may change (``runtime.checkpoint.training_only``): the capacity is a compute
# budget that drops overflow tokens, each token's experts stay the same (Switch Transformer, Fedus
# et al. 2022, §2.2); jitter is applied in training only (§2.4); the aux-loss-free bias's rate
# moves the bias, but turning it on or off adds or removes buffers (``resume_may_change``)
TRAINING_ONLY = CAPACITY_KEYS | {"capacity_factor", "jitter", "bias_balancing_rate"}

_GATES: dict[str, "GateType"] = {}


class GateType:
    """One gate type. A module subclasses this, sets the attributes, and ``register``s an instance."""

    name: str  # gate.type
    module: str  # its nn.Module class in moedsl.nn.gates
    Options: type = Gate  # its options dataclass: Gate, or a subclass adding the type's own
    options: frozenset = frozenset()  # the keys of `gate:` it takes, besides `type`
    losses: frozenset = frozenset()  # the auxiliary losses it defines
    losses_note: Optional[str] = None  # why a loss it does not define does not apply
    default_capacity: Optional[float] = None  # the paper's capacity factor: drops by default
    can_be_dropless: bool = True
    dense: bool = False  # every expert computes every token (no capacity, nothing dropped)
    needs_tokens: bool = False  # routes by token id: model.input must be tokens
    option_defaults: dict = {}  # defaults of this type that differ from the schema's
    sub_gate_options: Optional[frozenset] = None  # the options it takes as a hierarchy level (None: not one)
    in_schema: bool = True  # a `gate.type` value (False: made from another part of the spec)
    training_only: frozenset = TRAINING_ONLY  # the fields of its Options a resume may change
    experts_choose: bool = False  # each expert picks its tokens: no per-token top-k, k = 0
    capacity_is_budget: bool = True  # capacity_factor is a budget an evaluation may change (not the k)
    cannot_decode: Optional[str] = None  # why a decode graph cannot route it token by token (None: it can)
    noise: bool = False  # a learned noise std per expert, W_noise (Shazeer et al. 2017, eq. 4)

    def build(self, g: dict, **resolved):
        """Its ``Options`` from the schema-valid, checked ``gate:`` mapping ``g`` and the values
        resolved from the layer (``type``, ``k``, the capacity), its ``option_defaults`` filled in."""
        values = {**self.option_defaults, **g, **resolved}
        bias = values.pop("bias_balancing", None)
        if bias is not None:
            values["bias_balancing_rate"] = bias["rate"]
        return take(self.Options, values)

    def resume_may_change(self, names: tuple, old, new) -> bool:
        """Whether a resume may change the option at ``names`` (keys below ``gate:``) from ``old``
        to ``new`` and keep the checkpoint's weights meaning the same: one of ``training_only``;
        the aux-loss-free bias's rate, but not turning it on or off (that adds or removes the
        ``expert_bias`` / ``load_acc`` buffers)."""
        if names in (("bias_balancing_rate",), ("bias_balancing", "rate")):  # typed / as written
            return "bias_balancing_rate" in self.training_only and old is not None and new is not None
        return len(names) == 1 and names[0] in self.training_only

    def k(self, g: dict, experts: int) -> int:
        """Experts per token (0: the experts choose their tokens)."""
        return g.get("k", 1)

    def experts_per_token(self, gate, experts: int) -> float:
        """Routed experts that compute one token on average."""
        return float(gate.k)

    def check(self, g: dict, path: tuple, experts: int, checks) -> None:
        """Semantic checks of the `gate:` mapping ``g`` of a layer of ``experts`` experts."""

    def module_class(self):
        """Its ``nn.Module`` class: ``module`` of ``moedsl.nn.gates`` (a gate type defined outside
        this package may return one of its own). Imported when called: keeps torch out of
        ``import moedsl``."""
        from moedsl.nn import gates

        return getattr(gates, self.module)


def register(gate: GateType) -> GateType:
    _GATES[gate.name] = gate
    return gate


def gate_type(name: str) -> GateType:
    return _GATES[name]


def gate_types() -> dict[str, GateType]:
    return dict(_GATES)


def check_k(g: dict, path: tuple, experts: int, checks) -> None:
    """A top-k gate picks k of the layer's experts."""
    k = g.get("k", 1)
    if k > experts:
        checks.error(path + ("k",), f"k = {k} exceeds the {experts} experts", "k must be at most experts.count")


def _import_all() -> None:
    from moedsl.kinds import import_all

    import_all(__name__, __path__)


_import_all()
