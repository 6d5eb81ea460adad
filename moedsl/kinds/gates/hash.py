"""``hash``: hash layers (Roller et al. 2021, §3): expert = hash(token id) mod E, a fixed random
table over the vocabulary, weight 1; no router, so no router losses."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import CAPACITY_KEYS, Gate, GateType, register


@dataclass(frozen=True)
class Options(Gate):
    hash_seed: int = defaults("gate")["hash_seed"]  # another seed is another table


class Hash(GateType):
    name = "hash"
    module = "HashGate"
    Options = Options
    options = frozenset({"k", "hash_seed", *CAPACITY_KEYS})
    losses_note = "a hash gate has no router probabilities"
    needs_tokens = True

    def k(self, g, experts):
        return 1


register(Hash())
