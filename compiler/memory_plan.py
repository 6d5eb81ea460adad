"""What one rank holds during a training step, by part, under the scale settings
(``placement.shard``, ``train.recompute``, ``train.micro_batches``), and the search for the
cheapest settings under which a step fits a device.

Counted from the rank's compiled module on the meta device (its parameters' shapes: only the
experts it hosts) and the layer kinds' activation estimates (``LayerKind.activations``):

- master weights, gradients: float32, 4 bytes a parameter each; AdamW's two moments, 8;
- ``shard``: each parameter split over its data-parallel group, all ranks for a replicated
  parameter, the ranks holding the same experts (expert data parallel) for an expert's, as
  FSDP2 splits it (``fully_shard``: dim 0 in ``ceil(rows / N)`` pieces, the piece of rank 0
  counted; dim 1 where dim 0 has fewer rows than the group has ranks, as torchtitan shards
  experts). ``optimizer`` splits the moments (ZeRO-1, Rajbhandari et al. 2020, §5.1: P_os);
  ``full`` the master weights and the gradients too (P_os+g+p);
- working copies: with a 16-bit ``model.dtype`` autocast casts every weight a matmul reads and
  keeps the casts until the forward ends (its cache) or the backward (saved): 2 bytes a
  parameter. Under ``full`` FSDP2 instead gathers a layer's weights just in time, in the
  compute dtype (its MixedPrecisionPolicy, as torchtitan sets it): two layers at a time (the
  one computing and the next, prefetched), plus one layer's unsharded float32 gradient before
  its reduce-scatter;
- activations: what the forward keeps for the backward, for one micro-batch (the step's
  sequences on this rank ÷ ``micro_batches``), in the model's dtype (float32 where a 16-bit
  autocast keeps float32: ``moedsl.kinds.wider``). ``recompute: experts`` keeps each MoE
  layer's routed rows but not their hidden activations, recomputed in the backward one layer
  at a time (Shazeer et al. 2017, §3.1, "Increasing Batch Size for a Recurrent MoE");
  ``recompute: layers`` keeps each sublayer's input only and recomputes the sublayer in its
  backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). The layer
  being recomputed is added back at its largest.

Not counted: buffers, the gradients of activations in flight during the backward, the
all-to-all and gradient-sync buffers, the allocator's fragmentation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moedsl import dtypes
from moedsl import spec as S
from moedsl.kinds import layer_kind
from moedsl.kinds.gates import gate_type

SHARDS = ("none", "optimizer", "full")  # placement.shard, cheapest first
RECOMPUTES = ("none", "experts", "layers")  # train.recompute


@dataclass(frozen=True)
class Settings:
    shard: str = "none"
    recompute: str = "none"
    micro_batches: int = 1

    @classmethod
    def of(cls, spec: S.Spec) -> "Settings":
        return cls(spec.placement.shard, spec.train.recompute, spec.train.micro_batches)

    def __str__(self) -> str:
        return f"shard {self.shard}, recompute {self.recompute}, micro_batches {self.micro_batches}"


@dataclass
class RankMemory:
    """Bytes one rank holds in a training step under ``settings``."""

    settings: Settings
    params: int  # float32 master weights
    grads: int  # float32 gradients
    optimizer: int  # AdamW's moments
    working: int  # 16-bit casts of the weights (autocast), or under full the gathered layers
    activations: int  # kept for the backward at its peak (one micro-batch)
    extra_flops: float  # recomputation's share of a step's FLOPs (0 without)
    alone: int = 0  # states of the parameters no other rank holds: no shard mode splits them

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.working + self.activations

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        d["total"] = self.total
        return d


def shard_numel(shape: tuple, n: int) -> int:
    """Elements of rank 0's piece of a parameter of ``shape`` split over ``n`` ranks (FSDP2's
    ``Shard(0)``, torch.chunk's pieces; dim 1 when dim 0 has fewer rows than ranks)."""
    numel = math.prod(shape)
    if n == 1 or not shape:
        return numel
    dim = 1 if shape[0] < n and len(shape) > 1 else 0
    return numel // shape[dim] * -(-shape[dim] // n)


def is_expert(name: str) -> bool:
    """A routed expert's stacked parameter (``layers.<i>.experts.w_in``); the shared experts and
    everything else are replicated on every rank."""
    return ".experts." in name


def rank_memory(spec: S.Spec, compiled, settings: Settings) -> RankMemory:
    """What the rank ``compiled`` is for holds in a training step of ``spec`` under ``settings``
    (rank 0's piece where a shard splits unevenly: the largest)."""
    mesh = compiled.mesh
    wb = dtypes.BYTES[spec.model.dtype]
    per_layer: dict = {}  # layer index -> parameters on this rank (the unit FSDP2 gathers)
    full = held = alone = 0  # elements: on this rank unsharded; rank 0's shards; held by this rank alone
    for name, p in compiled.module.named_parameters():
        group = mesh.data_parallel if is_expert(name) else mesh.world
        numel = p.numel()
        full += numel
        alone += numel if group == 1 else 0
        held += shard_numel(tuple(p.shape), group)
        parts = name.split(".")
        key = parts[1] if parts[0] == "layers" else parts[0]
        per_layer[key] = per_layer.get(key, 0) + numel
    sharded_states = settings.shard != "none"
    weights = held if settings.shard == "full" else full
    if settings.shard == "full":
        unit = max(per_layer.values(), default=0)
        working = 2 * unit * wb + unit * 4
    else:
        working = full * wb if wb < 4 else 0
    activations, extra = _activations(spec, compiled, settings, wb)
    return RankMemory(settings=settings, params=4 * weights, grads=4 * weights,
                      optimizer=8 * (held if sharded_states else full), working=working,
                      activations=activations, extra_flops=extra, alone=16 * alone)


def _activations(spec: S.Spec, compiled, settings: Settings, wb: int) -> tuple[int, float]:
    """(bytes kept for the backward at the peak, recomputation's share of the step's FLOPs)."""
    m = spec.model
    B_local, T = compiled.static.batch
    M = settings.micro_batches
    tokens = B_local * T // M
    kept = peak_extra = recomputed = total_flops = 0.0
    for layer in spec.layers:
        cfg, kind = layer.config, layer_kind(layer.kind)
        per_token = kind.activations(cfg, m)
        flops = kind.flops(cfg, m, T)
        total_flops += flops
        if layer.kind == "moe":
            slots = _routed_rows(spec, compiled, layer, tokens)  # per token: routed rows computed
            per_token += (slots - cfg.experts_per_token) * kind.expert_row(cfg, m)
            if settings.recompute == "experts":
                hidden = slots * kind.expert_hidden(cfg, m)
                per_token -= hidden
                peak_extra = max(peak_extra, hidden)
                recomputed += flops - kind.fixed_flops(cfg, m)
        if settings.recompute == "layers" and kind.sublayer:
            peak_extra = max(peak_extra, per_token)
            per_token = float(m.d_model)  # the checkpoint's input
            recomputed += flops
        kept += per_token
    extra = recomputed / (3 * total_flops) if total_flops else 0.0
    return int((kept + peak_extra) * tokens * wb), extra


def _routed_rows(spec: S.Spec, compiled, layer, tokens: int) -> float:
    """Rows per token the experts compute: experts_per_token, or with a static capacity layout every
    slot of the padded [E, C, d] buffers (a dense gate: every expert takes every token)."""
    cfg, name = layer.config, f"layers.{layer.index}"
    comm, g, E = compiled.comms[name], cfg.gate, cfg.experts.count
    if comm.layout != "capacity":
        return cfg.experts_per_token
    n_tok = max(tokens // comm.groups, 1)
    C = n_tok if gate_type(g.type).dense else g.capacity(n_tok, E)
    return C * E / n_tok


def micro_batch_choices(spec: S.Spec, compiled) -> list:
    """The micro-batch counts a step of this rank's batch splits into: each micro-batch whole
    sequences, its tokens divisible by every layer's routing groups."""
    B_local, T = compiled.static.batch
    out = []
    for M in range(1, B_local + 1):
        if B_local % M:
            continue
        tokens = B_local // M * T
        comms = [compiled.comms[f"layers.{info.index}"] for info in spec.moe_layers]
        if all(c.per_sequence or tokens % c.groups == 0 for c in comms):
            out.append(M)
    return out


@dataclass
class Fit:
    """The answer of ``fit``: the settings under which a step fits ``budget`` bytes, cheapest first,
    each at its fewest micro-batches and each holding less than those before it; or none, and the
    best of all."""

    budget: int
    fitting: list  # [RankMemory], cheapest first
    best: RankMemory  # the smallest total of all (what misses by the least when nothing fits)

    @property
    def fits(self) -> bool:
        return bool(self.fitting)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "fits": self.fits, "fitting": [r.to_dict() for r in self.fitting],
                "best": self.best.to_dict()}


def cost(r: RankMemory) -> tuple:
    """Cheapest first: recomputation costs FLOPs (its share, first); then sharding (``optimizer``
    moves the bytes an all-reduce moves, in a reduce-scatter and an all-gather; ``full`` adds an
    all-gather of each layer's weights in the backward); then micro-batches (the same FLOPs in
    smaller matmuls, and each micro-batch's all-to-alls)."""
    return (round(r.extra_flops, 4), SHARDS.index(r.settings.shard), r.settings.micro_batches)


def fit(spec: S.Spec, compiled, budget: int) -> Fit:
    """Every shard mode × recompute choice at the fewest micro-batches that fit ``budget`` bytes."""
    choices = micro_batch_choices(spec, compiled)
    fitting, best = [], None
    for shard in SHARDS:
        for recompute in RECOMPUTES:
            for M in choices:
                r = rank_memory(spec, compiled, Settings(shard, recompute, M))
                if best is None or r.total < best.total:
                    best = r
                if r.total <= budget:
                    fitting.append(r)
                    break
    # a costlier setting is listed only when it holds less than every cheaper one (the others buy nothing)
    listed = []
    for r in sorted(fitting, key=cost):
        if all(r.total < kept.total for kept in listed):
            listed.append(r)
    return Fit(budget=budget, fitting=listed, best=best)


__all__ = ["SHARDS", "RECOMPUTES", "Settings", "RankMemory", "Fit", "rank_memory", "fit", "shard_numel",
           "micro_batch_choices", "is_expert"]
