"""The typed spec: frozen dataclasses, one per section of the YAML.

A ``Spec`` is what the compiler consumes. Its ``layers`` are the expanded stack
(``repeat`` and ``cycle`` unrolled); each ``Layer`` keeps the path of the YAML
item it came from, so that later stages can still point at the user's line.
Defaults here equal the ``default`` annotations of the JSON Schema (a test
holds them together).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

GLU_ACTIVATIONS = ("swiglu", "geglu")


@dataclass(frozen=True)
class Model:
    d_model: int
    input: str = "tokens"  # tokens | vectors
    vocab_size: Optional[int] = None
    max_seq_len: int = 512
    dtype: str = "float32"
    router_dtype: str = "float32"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = False


@dataclass(frozen=True)
class Embedding:
    positions: str = "none"  # none | learned


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int  # resolved: defaults to heads
    positions: str = "rotary"
    rope_theta: float = 10000.0
    causal: bool = True
    dropout: float = 0.0
    bias: bool = False
    residual: bool = True
    prenorm: bool = True


@dataclass(frozen=True)
class LSTM:
    layers: int = 1
    dropout: float = 0.0
    residual: bool = True
    prenorm: bool = True


@dataclass(frozen=True)
class FFN:
    hidden: int
    activation: str = "relu"
    dropout: float = 0.0
    bias: bool = False
    residual: bool = True
    prenorm: bool = True

    @property
    def glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS


@dataclass(frozen=True)
class Norm:
    type: str  # resolved: defaults to model.norm
    eps: float  # resolved: defaults to model.norm_eps


@dataclass(frozen=True)
class Head:
    bias: bool = False


@dataclass(frozen=True)
class SharedExperts:
    count: int
    hidden: int  # resolved: defaults to experts.hidden


@dataclass(frozen=True)
class Experts:
    count: int
    hidden: int
    activation: str = "relu"
    bias: bool = False
    dropout: float = 0.0
    init_scale: float = 1.0
    shared: Optional[SharedExperts] = None

    @property
    def glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS


@dataclass(frozen=True)
class Gate:
    """The routing of one MoE layer.

    For a hierarchical MoE, ``type == "hierarchical"``, ``k`` is the total number of
    experts per token (primary k × secondary k) and the sub-gates live in ``Hierarchy``.
    ``capacity_factor is None`` means no capacity (dropless, or a dense softmax gate).
    """

    type: str
    k: int  # experts per token; expert_choice: 0 (experts pick tokens); softmax: experts.count
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 0
    drop_policy: str = "dropless"  # drop | dropless
    drop_priority: str = "position"  # position | score
    routing_groups: int = 1
    jitter: float = 0.0
    noise_epsilon: float = 0.0
    second_expert: str = "random"
    normalize: bool = True
    score: str = "softmax"
    bias_balancing_rate: Optional[float] = None
    max_experts_per_token: Optional[int] = None
    hash_seed: int = 0

    @property
    def has_capacity(self) -> bool:
        return self.capacity_factor is not None

    def capacity(self, tokens: int, experts: int, training: bool = True) -> int:
        """C = ceil(capacity_factor · k · tokens / experts), at least min_capacity.

        For expert choice k is 1 (each expert takes capacity_factor · tokens / E), and no
        expert can take more tokens than there are; without a capacity, every token fits.
        """
        if self.capacity_factor is None:
            return tokens
        factor = self.capacity_factor if training else (self.eval_capacity_factor or self.capacity_factor)
        k = self.k if self.k > 0 else 1
        c = max(math.ceil(factor * k * tokens / experts - 1e-9), self.min_capacity)
        if self.type == "expert_choice":
            c = min(c, tokens)
        return c


@dataclass(frozen=True)
class SubGate:
    """A gate of one hierarchy level."""

    type: str  # softmax | noisy_topk | topk
    k: int
    noise_epsilon: float = 0.0
    jitter: float = 0.0
    normalize: bool = True


@dataclass(frozen=True)
class Hierarchy:
    groups: int
    experts_per_group: int
    primary: SubGate
    secondary: SubGate


@dataclass(frozen=True)
class Losses:
    importance: float = 0.0
    load: float = 0.0
    balance: float = 0.0
    z_loss: float = 0.0

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass(frozen=True)
class MoE:
    experts: Experts
    gate: Gate
    hierarchy: Optional[Hierarchy] = None
    losses: Losses = field(default_factory=Losses)
    residual: bool = True
    prenorm: bool = True

    @property
    def experts_per_token(self) -> float:
        """Routed experts that compute one token on average (expert choice: the capacity factor)."""
        if self.gate.type == "expert_choice":
            return min(float(self.gate.capacity_factor), float(self.experts.count))
        return float(self.gate.k)


LayerConfig = Union[Embedding, Attention, LSTM, FFN, MoE, Norm, Head]


@dataclass(frozen=True)
class Layer:
    kind: str  # embedding | attention | lstm | ffn | moe | norm | head
    config: Any  # LayerConfig
    index: int  # position in the expanded stack
    path: tuple  # JSON path of the YAML item it came from
    moe_index: Optional[int] = None  # 0, 1, ... over the MoE layers of the stack

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"


@dataclass(frozen=True)
class Mesh:
    nodes: int
    devices_per_node: int

    @property
    def size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class Placement:
    mesh: Optional[Mesh] = None  # None: 1 node × the world size of the run
    expert_parallel: Optional[int] = None
    data_parallel: Optional[int] = None
    strategy: str = "contiguous"  # contiguous | round_robin | explicit
    map: Optional[tuple] = None  # explicit: per expert, a tuple of EP ranks
    layer_maps: tuple = ()  # explicit: ((moe_index, map), ...)
    replicas: tuple = ()  # ((expert, copies), ...)
    all_to_all: str = "flat"

    def map_for(self, moe_index: int) -> Optional[tuple]:
        return dict(self.layer_maps).get(moe_index, self.map)


@dataclass(frozen=True)
class Train:
    batch_size: int = 16
    seq_len: int = 64  # resolved: min(max_seq_len, 64) by default
    steps: int = 200
    lr: float = 0.001
    min_lr: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: str = "synthetic"
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: Optional[int] = None


@dataclass(frozen=True)
class Spec:
    version: int
    name: str
    model: Model
    layers: tuple  # tuple[Layer, ...], expanded
    placement: Placement = field(default_factory=Placement)
    train: Train = field(default_factory=Train)
    description: str = ""
    source: str = field(default="<spec>", compare=False)
    located: Any = field(default=None, compare=False, repr=False)  # yamlload.Located, for late errors
    data: Any = field(default=None, compare=False, repr=False)  # the plain data it was built from

    @property
    def moe_layers(self) -> tuple:
        return tuple(layer for layer in self.layers if layer.kind == "moe")

    def summary(self) -> str:
        from .params import count_parameters, human

        moes = self.moe_layers
        counts = sorted({m.config.experts.count for m in moes})
        experts = f", {'/'.join(str(c) for c in counts)} experts per MoE layer" if counts else ""
        total, active = count_parameters(self)
        return (f"{self.name}: {len(self.layers)} layers ({len(moes) or 'no'} MoE){experts}, "
                f"~{human(total)} parameters (~{human(active)} active per token)")
