"""The typed spec: frozen dataclasses, one per section of the YAML.

A ``Spec`` is what the compiler consumes. Its ``layers`` are the expanded stack
(``repeat`` and ``cycle`` unrolled); each ``Layer`` keeps the path of the YAML
item it came from, so that later stages can still point at the user's line.
Each layer kind's config (``LSTM``, ``MoE``, ...) is defined in its module of
``moedsl.kinds`` and importable from here. Defaults are the JSON Schema's
``default`` annotations, read from it (``moedsl.schema.defaults``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .kinds.attention import Attention  # noqa: F401 - the layer kinds' configs, importable from here
from .kinds.embedding import Embedding  # noqa: F401
from .kinds.ffn import FFN, GLU_ACTIVATIONS  # noqa: F401
from .kinds.head import Head  # noqa: F401
from .kinds.lstm import LSTM  # noqa: F401
from .kinds.gates import Gate  # noqa: F401 - the options every gate type has (each adds its own)
from .kinds.moe import Experts, Hierarchy, Losses, MoE, SharedExperts, SubGate  # noqa: F401
from .kinds.norm import Norm  # noqa: F401
from .schema import defaults, schema

_MODEL, _TRAIN, _PLACEMENT = defaults("model"), defaults("train"), defaults("placement")
_STRATEGY = schema()["$defs"]["placement"]["properties"]["experts"]["properties"]["strategy"]["default"]


_IMAGE = schema()["$defs"]["model"]["properties"]["image"]["properties"]


@dataclass(frozen=True)
class Image:
    """model.image (input: image): square images of size × size pixels with ``channels`` channels,
    cut into patch × patch patches (ViT, Dosovitskiy et al. 2021, §3.1)."""

    size: int
    patch: int
    channels: int = _IMAGE["channels"]["default"]

    @property
    def patches(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


@dataclass(frozen=True)
class Model:
    d_model: int
    input: str = _MODEL["input"]  # tokens | vectors | image
    vocab_size: Optional[int] = None
    tokenizer: Optional[str] = None  # a tokenizer.json path (input: tokens), relative to the spec file's folder
    max_seq_len: int = _MODEL["max_seq_len"]
    dtype: str = _MODEL["dtype"]
    router_dtype: str = _MODEL["router_dtype"]
    norm: str = _MODEL["norm"]
    norm_eps: float = _MODEL["norm_eps"]
    dropout: float = _MODEL["dropout"]
    init_std: float = _MODEL["init_std"]
    tie_embeddings: bool = _MODEL["tie_embeddings"]
    image: Optional[Image] = None  # input: image
    classes: Optional[int] = None  # input: image
    # an encoder-decoder's special ids (T5's pad 0, eos 1, decoder start = pad): its data pads
    # with pad_id, ends targets with eos_id, starts the decoder input with decoder_start_id
    pad_id: int = _MODEL["pad_id"]
    eos_id: int = _MODEL["eos_id"]
    decoder_start_id: int = _MODEL["decoder_start_id"]

    # what a resume may change (``runtime.checkpoint.training_only``): dropout (training only), the
    # initialisation (the checkpoint replaces it), the autocast precision (weights are kept in float32)
    training_only: ClassVar[frozenset] = frozenset({"dropout", "init_std", "dtype", "router_dtype"})


LayerConfig = Any  # the config dataclass of a registered layer kind (moedsl.kinds)


@dataclass(frozen=True)
class Layer:
    kind: str  # a registered layer kind (moedsl.kinds): embedding, attention, lstm, ffn, moe, norm, head
    config: Any  # LayerConfig
    index: int  # position in the expanded stack
    path: tuple  # JSON path of the YAML item it came from
    moe_index: Optional[int] = None  # 0, 1, ... over the MoE layers of the stack
    stack: str = ""  # "" (a spec's `layers`), or an encoder-decoder's "encoder" / "decoder"

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


_REPLICATION = schema()["$defs"]["placement"]["properties"]["replication"]["properties"]


@dataclass(frozen=True)
class Replication:
    """placement.replication: redundant expert slots that follow the measured load."""

    policy: str  # eplb | shadow
    redundant: int = _REPLICATION["redundant"]["default"]  # extra physical slots per MoE layer
    window: int = _REPLICATION["window"]["default"]  # steps of load the placement is computed from
    every: int = _REPLICATION["every"]["default"]  # steps between placements (migrations)
    dispatch: str = ""  # position | source | nearest; "" (not given): nearest for shadow, position for eplb

    def __post_init__(self):
        if not self.dispatch:  # FasterMoE's shadows serve their own rank's tokens; EPLB assumes equal shares
            object.__setattr__(self, "dispatch", "nearest" if self.policy == "shadow" else "position")


_HARDWARE = schema()["$defs"]["placement"]["properties"]["hardware"]["properties"]


@dataclass(frozen=True)
class Hardware:
    """placement.hardware: the figures the plan's cost model prices a step with
    (compiler/replication.py ``model_step``)."""

    device_flops: float = _HARDWARE["device_flops"]["default"]  # FLOP/s sustained in the expert GEMMs
    intra_node_bandwidth: float = _HARDWARE["intra_node_bandwidth"]["default"]  # bytes/s per device, in a node
    inter_node_bandwidth: float = _HARDWARE["inter_node_bandwidth"]["default"]  # bytes/s per device, across nodes


@dataclass(frozen=True)
class Placement:
    mesh: Optional[Mesh] = None  # None: 1 node × the world size of the run
    expert_parallel: Optional[int] = None
    data_parallel: Optional[int] = None
    strategy: str = _STRATEGY  # contiguous | round_robin | explicit
    map: Optional[tuple] = None  # explicit: per expert, a tuple of EP ranks
    layer_maps: tuple = ()  # explicit: ((moe_index, map), ...)
    replicas: tuple = ()  # ((expert, copies), ...)
    all_to_all: str = _PLACEMENT["all_to_all"]
    shard: str = _PLACEMENT["shard"]  # none | optimizer | full: training states split over data-parallel groups
    replication: Optional[Replication] = None  # None: the placement is fixed
    hardware: Hardware = field(default_factory=Hardware)  # the cost model's device and link figures

    def map_for(self, moe_index: int) -> Optional[tuple]:
        return dict(self.layer_maps).get(moe_index, self.map)


_DISTILL = schema()["$defs"]["train"]["properties"]["distill"]["properties"]


@dataclass(frozen=True)
class Distill:
    """train.distill: the student learns from a teacher's soft targets and the labels (runtime/distill.py)."""

    teacher: str  # anything runtime/resolve.py reads: a run folder, a checkpoint, an import folder
    alpha: float = _DISTILL["alpha"]["default"]
    temperature: float = _DISTILL["temperature"]["default"]


_SPAN = schema()["$defs"]["train"]["properties"]["span_corruption"]["properties"]


@dataclass(frozen=True)
class SpanCorruption:
    """train.span_corruption: T5's noise (runtime/span_corruption.py)."""

    noise_density: float = _SPAN["noise_density"]["default"]
    mean_span: float = _SPAN["mean_span"]["default"]


@dataclass(frozen=True)
class Train:
    batch_size: int = _TRAIN["batch_size"]
    seq_len: int = 64  # resolved: min(max_seq_len, 64) by default
    steps: int = _TRAIN["steps"]
    lr: float = _TRAIN["lr"]
    min_lr: float = _TRAIN["min_lr"]
    warmup: int = _TRAIN["warmup"]
    weight_decay: float = _TRAIN["weight_decay"]
    grad_clip: float = _TRAIN["grad_clip"]
    seed: int = _TRAIN["seed"]
    data: str = _TRAIN["data"]
    eval_every: int = _TRAIN["eval_every"]
    eval_batches: int = _TRAIN["eval_batches"]
    checkpoint_every: Optional[int] = None
    pack: str = _TRAIN["pack"]  # none | documents: rows pack several documents (runtime/train.py RunOptions.pack)
    recompute: str = _TRAIN["recompute"]  # none | experts | layers: activations recomputed in backward
    micro_batches: int = _TRAIN["micro_batches"]  # gradient accumulation: a step's batch in M pieces
    distill: Optional[Distill] = None  # knowledge distillation from a teacher (training only)
    objective: str = _TRAIN["objective"]  # lm | span_corruption | seq2seq (an encoder-decoder's default)
    span_corruption: SpanCorruption = field(default_factory=SpanCorruption)


@dataclass(frozen=True)
class Spec:
    version: int
    name: str
    model: Model
    layers: tuple  # tuple[Layer, ...], expanded (an encoder-decoder's: the encoder's, then the decoder's)
    placement: Placement = field(default_factory=Placement)
    train: Train = field(default_factory=Train)
    description: str = ""
    source: str = field(default="<spec>", compare=False)
    located: Any = field(default=None, compare=False, repr=False)  # yamlload.Located, for late errors
    data: Any = field(default=None, compare=False, repr=False)  # the plain data it was built from

    @property
    def moe_layers(self) -> tuple:
        return tuple(layer for layer in self.layers if layer.kind == "moe")

    @property
    def encoder_decoder(self) -> bool:
        """An encoder-decoder (the spec states ``encoder`` and ``decoder``): ``layers`` holds the
        encoder's layers, then the decoder's, numbered on (``Layer.stack`` says which)."""
        return bool(self.layers) and self.layers[0].stack == "encoder"

    def stack(self, name: str) -> tuple:
        """The layers of stack ``name`` ("" for a spec's ``layers``; "encoder" / "decoder")."""
        return tuple(layer for layer in self.layers if layer.stack == name)

    def summary(self) -> str:
        from .params import count_parameters, human

        moes = self.moe_layers
        counts = sorted({m.config.experts.count for m in moes})
        experts = f", {'/'.join(str(c) for c in counts)} experts per MoE layer" if counts else ""
        total, active = count_parameters(self)
        return (f"{self.name}: {len(self.layers)} layers ({len(moes) or 'no'} MoE){experts}, "
                f"~{human(total)} parameters (~{human(active)} active per token)")
