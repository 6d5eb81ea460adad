"""Gate types: one module each, registered by its ``gate.type`` name.

A gate type's module says which options of ``gate:`` mean something for it, the experts
per token it fixes, the paper's capacity factor (a gate with one drops by default), the
auxiliary losses it defines, its semantic checks, and its ``nn.Module`` class in
``moedsl.nn.gates`` (where the routing itself is computed). Its schema entry is its name in
the ``gate_types`` enum and the descriptions of its options in ``moedsl.schema.json``.
"""
from __future__ import annotations

from typing import Optional

# capacity and dropping: options of every gate with a router that drops (and of `hierarchy`)
CAPACITY_KEYS = frozenset({"capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy",
                           "drop_priority", "routing_groups", "capacity_rounding"})

_GATES: dict[str, "GateType"] = {}


class GateType:
    """One gate type. A module subclasses this, sets the attributes, and ``register``s an instance."""

    name: str  # gate.type
    module: str  # its nn.Module class in moedsl.nn.gates
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

    def k(self, g: dict, experts: int) -> int:
        """Experts per token (0: the experts choose their tokens)."""
        return g.get("k", 1)

    def experts_per_token(self, gate, experts: int) -> float:
        """Routed experts that compute one token on average."""
        return float(gate.k)

    def check(self, g: dict, path: tuple, experts: int, checks) -> None:
        """Semantic checks of the `gate:` mapping ``g`` of a layer of ``experts`` experts."""

    def module_class(self):
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
