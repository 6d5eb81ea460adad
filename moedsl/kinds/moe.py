"""``moe``: a Mixture-of-Experts sublayer (Shazeer et al. 2017): a gate (a type of
``moedsl.kinds.gates``) or a two-level ``hierarchy`` of gates routes each token to experts;
optional shared experts see every token (DeepSeekMoE, Dai et al. 2024, §3.2), their output
optionally scaled by sigmoid(x·w) (``shared.gate``: transformers' modeling_qwen2_moe.py,
Qwen2MoeSparseMoeBlock's shared_expert_gate).

In the graph it is explicit nodes,

    layers_i_tokens -> layers_i_route (gate) -> layers_i_dispatch -> layers_i_experts -> layers_i_combine

plus the shared experts, the aux loss and the router statistics. Its experts module is not
made here at lowering: the placement pass makes it (``make_experts``), holding only the
experts its rank hosts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from moedsl.checks import a as _a
from moedsl.schema import defaults, schema

from . import LayerKind, register, take, wider
from .ffn import GLU_ACTIVATIONS, hidden_kept
from .gates import Gate, gate_type, gate_types

_EXPERTS, _SUB = defaults("experts"), defaults("sub_gate")
_LOSSES, _MOE, _OVERLAP = defaults("losses"), defaults("moe"), defaults("overlap")
_SHARED_GATE = schema()["$defs"]["experts"]["properties"]["shared"]["properties"]["gate"]["default"]


@dataclass(frozen=True)
class SharedExperts:
    count: int
    hidden: int  # resolved: defaults to experts.hidden
    gate: bool = _SHARED_GATE  # output × sigmoid(x·w), w [1, d] (Qwen2-MoE's shared_expert_gate)


@dataclass(frozen=True)
class Experts:
    count: int
    hidden: int
    activation: str = _EXPERTS["activation"]
    bias: bool = _EXPERTS["bias"]
    dropout: float = _EXPERTS["dropout"]
    init_scale: float = _EXPERTS["init_scale"]
    shared: Optional[SharedExperts] = None
    token_dropout: float = _EXPERTS["token_dropout"]  # NLLB-MoE's moe_token_dropout on each routed output row

    # what a resume may change: the dropouts (training only; token_dropout's evaluation scale moves
    # with it), the initialisation (the checkpoint replaces it)
    training_only = frozenset({"dropout", "token_dropout", "init_scale"})

    @property
    def glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS


@dataclass(frozen=True)
class SubGate:
    """A gate of one hierarchy level."""

    type: str  # softmax | noisy_topk | topk
    k: int
    noise_epsilon: float = _SUB["noise_epsilon"]
    jitter: float = 0.0
    normalize: bool = _SUB["normalize"]


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
class Overlap:
    """The layer's dispatch all-to-all, experts and combine all-to-all pipelined over ``chunks``
    (Tutel's adaptive pipelining, Hwang et al. 2023; FasterMoE's smart scheduling, He et al. 2022):
    the compiler's overlap pass (``moedsl.compiler.passes.overlap``). 1: not pipelined."""

    chunks: int = _OVERLAP["chunks"]


@dataclass(frozen=True)
class MoE:
    experts: Experts
    gate: Gate
    hierarchy: Optional[Hierarchy] = None
    losses: Losses = field(default_factory=Losses)
    overlap: Overlap = field(default_factory=Overlap)
    residual: bool = _MOE["residual"]
    prenorm: bool = _MOE["prenorm"]

    @property
    def experts_per_token(self) -> float:
        """Routed experts that compute one token on average (expert choice: the capacity factor)."""
        return gate_type(self.gate.type).experts_per_token(self.gate, self.experts.count)


@dataclass(frozen=True)
class MoEParams:
    """The parameters of one MoE layer by part, counted from its modules on the meta device."""

    per_expert: int  # one routed expert
    router: int  # the gate's weights
    router_active: int  # those one token uses (hierarchical: the primary and its groups' secondaries)
    shared: int  # the shared experts


# ----------------------------------------------------------------------------- the spec

def _capacity(g: dict, p, t: str, c) -> dict:
    """Resolve capacity_factor / drop_policy with the papers' defaults, and refuse contradictions."""
    gt = gate_type(t)
    policy = g.get("drop_policy")
    factor = g.get("capacity_factor")
    absolute = g.get("expert_capacity")
    if absolute is not None and factor is not None:
        c.error(p + ("expert_capacity",), "expert_capacity and capacity_factor both set the capacity",
                "keep one: expert_capacity (slots per expert) or capacity_factor (relative to the tokens)", key=True)
    if g.get("dropped_tokens") == "never":  # the capacity is not enforced: dropless routing
        if policy == "drop":
            c.error(p + ("dropped_tokens",), "dropped_tokens: never conflicts with drop_policy: drop",
                    "remove one of them", key=True)
        policy = "dropless"
    if gt.dense:
        policy = "dropless"
    elif policy is None:
        has = factor is not None or absolute is not None or gt.default_capacity is not None
        policy = "drop" if has else "dropless"
    if policy == "dropless":
        if not gt.can_be_dropless:
            c.error(p + ("drop_policy",), f"{_a(t)} gate is defined by its capacity: it cannot be dropless")
        for key in ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_priority",
                    "capacity_rounding", "expert_capacity", "eval_capacity_fraction"):
            if key in g:
                c.error(p + (key,), f"{key} conflicts with dropless routing (no capacity, nothing dropped)",
                        "remove it, or set drop_policy: drop", key=True)
        if g.get("dropped_tokens") == "scaled_input":
            c.error(p + ("dropped_tokens",), "dropped_tokens: scaled_input needs a capacity: dropless routing "
                    "drops nothing", "add capacity_factor or expert_capacity, or remove dropped_tokens", key=True)
        factor = absolute = None
    elif factor is None and absolute is None:
        factor = gt.default_capacity
        if factor is None:
            c.error(p + ("drop_policy",), "drop_policy: drop needs a capacity_factor or an expert_capacity",
                    "add capacity_factor (e.g. 1.25), or use drop_policy: dropless")
    return dict(capacity_factor=factor, expert_capacity=absolute, drop_policy=policy)


def _gate(g: dict, p, experts: Experts, c) -> Gate:
    t = g["type"]
    gt = gate_type(t)
    for key in g:
        if key != "type" and key not in gt.options:
            homes = sorted(name for name, other in gate_types().items() if key in other.options)
            c.error(p + (key,), f"{key!r} does not apply to {_a(t)} gate",
                    f"it is an option of: {', '.join(homes)}" if homes else None, key=True)
    gt.check(g, p, experts.count, c)
    return gt.build(g, type=t, k=gt.k(g, experts.count), **_capacity(g, p, t, c))


def _sub_gate(g: dict, p, n: int, what: str, c) -> SubGate:
    t = g["type"]
    options = gate_type(t).sub_gate_options
    for key in g:
        if key != "type" and key not in options:
            c.error(p + (key,), f"{key!r} does not apply to {_a(t)} gate", key=True)
    k = n if gate_type(t).dense else g["k"]
    if k > n:
        c.error(p + ("k",), f"k = {k} exceeds the {n} {what.replace('_', ' ')}")
    return take(SubGate, g, k=k)


def _losses(d: dict, p, gate: Gate, hierarchy: Optional[Hierarchy], c) -> Losses:
    for name, weight in (d.get("losses") or {}).items():
        gt = gate_type(gate.type)
        if weight and name not in gt.losses:
            kinds = ", ".join(sorted(n for n, other in gate_types().items() if name in other.losses))
            c.error(p + ("losses", name), f"the {name} loss does not apply to {_a(gate.type)} gate",
                    gt.losses_note or f"it is defined for: {kinds}")
        elif weight and name == "load" and hierarchy and not all(
                gate_type(level.type).noise for level in (hierarchy.primary, hierarchy.secondary)):
            c.error(p + ("losses", name), "the load loss's estimator uses the gate noise: "
                    "both hierarchy levels must be noisy_topk")
    return take(Losses, d.get("losses"))


class MoEKind(LayerKind):
    name = "moe"
    config = MoE
    sublayer = True

    def build(self, data, path, model, checks) -> MoE:
        e = data["experts"]
        shared = None
        if "shared" in e:
            shared = take(SharedExperts, e["shared"], hidden=e["shared"].get("hidden", e["hidden"]))
        experts = take(Experts, e, shared=shared)
        hierarchy = None
        if "hierarchy" in data:
            h = data["hierarchy"]
            hp = path + ("hierarchy",)
            primary = _sub_gate(h["primary"], hp + ("primary",), h["groups"], "groups", checks)
            secondary = _sub_gate(h["secondary"], hp + ("secondary",), h["experts_per_group"], "experts_per_group",
                                  checks)
            hierarchy = Hierarchy(groups=h["groups"], experts_per_group=h["experts_per_group"],
                                  primary=primary, secondary=secondary)
            if h["groups"] * h["experts_per_group"] != experts.count:
                checks.error(path + ("experts", "count"),
                             f"experts.count {experts.count} != hierarchy groups {h['groups']} × experts_per_group "
                             f"{h['experts_per_group']} = {h['groups'] * h['experts_per_group']}")
            capacity = _capacity(h, hp, "hierarchical", checks)
            gate = gate_type("hierarchical").build(h, type="hierarchical", k=primary.k * secondary.k, **capacity)
        else:
            gate = _gate(data["gate"], path + ("gate",), experts, checks)
        losses = _losses(data, path, gate, hierarchy, checks)
        overlap = take(Overlap, data.get("overlap"))
        return take(MoE, data, experts=experts, gate=gate, hierarchy=hierarchy, losses=losses, overlap=overlap)

    def resume_may_change(self, names, old, new, gate=None) -> bool:
        """The aux losses' weights (they add to the objective only), what ``Experts.training_only``
        names, and what the gate type (or, under ``hierarchy:``, the hierarchical gate) allows."""
        if len(names) < 2:
            return False
        if names[0] == "losses":
            return True
        if names[0] == "experts":
            return len(names) == 2 and names[1] in Experts.training_only
        if names[0] == "gate" and gate is not None:
            return gate_type(gate).resume_may_change(names[1:], old, new)
        if names[0] == "hierarchy":
            return gate_type("hierarchical").resume_may_change(names[1:], old, new)
        return False

    def check_stack(self, layer, model, once) -> None:
        if gate_type(layer.config.gate.type).needs_tokens and model.input != "tokens":
            once(layer.path + ("moe", "gate", "type"),
                 f"a {layer.config.gate.type} gate routes by token id: it needs model.input: tokens")

    # -- modules ---------------------------------------------------------------------------------
    def gate_module(self, cfg: MoE, model, seed: int = 0, layer: int = 0):
        from moedsl.nn.gates import make_gate

        return make_gate(cfg, model.d_model, model.router_dtype, seed, layer, model.init_std, model.vocab_size)

    def shared_module(self, cfg: MoE, model):
        from moedsl.nn.experts import DenseFFN, GatedFFN

        e = cfg.experts
        cls = GatedFFN if e.shared.gate else DenseFFN
        return cls(model.d_model, e.shared.count * e.shared.hidden, e.activation, e.bias, e.dropout, model.init_std)

    def experts_module(self, cfg: MoE, model, expert_ids, seed: int = 0, layer: int = 0, init: bool = True):
        from moedsl.nn.experts import Experts as Module

        e = cfg.experts
        return Module(model.d_model, e.hidden, e.activation, expert_ids, bias=e.bias, dropout=e.dropout,
                      init_scale=e.init_scale, seed=seed, layer=layer, init=init, token_dropout=e.token_dropout)

    def parts(self, cfg: MoE, model) -> MoEParams:
        return _parts(self, cfg, model)

    def parameters(self, cfg: MoE, model) -> tuple[int, int]:
        n = self.parts(cfg, model)
        return (n.shared + n.router + cfg.experts.count * n.per_expert,
                n.shared + n.router_active + round(cfg.experts_per_token * n.per_expert))

    def flops(self, cfg: MoE, model, seq: int) -> float:
        """The router and shared experts on every token, plus experts_per_token routed experts."""
        return self.fixed_flops(cfg, model) + 2 * cfg.experts_per_token * self.parts(cfg, model).per_expert

    def fixed_flops(self, cfg: MoE, model) -> float:
        n = self.parts(cfg, model)
        return 2.0 * (n.router_active + n.shared)

    def activations(self, cfg: MoE, model) -> float:
        """Per token: its pre-norm's input and output (float32, d_model each), the router's input
        and its scores and probabilities (two per expert; in ``model.router_dtype``), ``expert_row``
        per routed expert the token goes to, and the shared experts' hidden rows (their input is
        the router's)."""
        e, d = cfg.experts, model.d_model
        shared = 0.0 if e.shared is None else hidden_kept(e.activation) * e.shared.count * e.shared.hidden \
            + (1 if e.shared.gate else 0)
        router = (d + 2.0 * e.count) * wider(model, model.router_dtype)
        return 2.0 * d * wider(model) + router + cfg.experts_per_token * self.expert_row(cfg, model) + shared

    def expert_row(self, cfg: MoE, model) -> float:
        """What one routed row keeps for the backward: its dispatched input, ``expert_hidden``, and
        its output, which the combine weighs by the router's probability (so in the router's dtype)."""
        return model.d_model * (1.0 + wider(model, model.router_dtype)) + self.expert_hidden(cfg, model)

    def expert_hidden(self, cfg: MoE, model) -> float:
        """The hidden rows of one routed row: what ``train.recompute: experts`` recomputes in the
        backward instead of keeping."""
        return float(hidden_kept(cfg.experts.activation) * cfg.experts.hidden)

    # -- the graph -------------------------------------------------------------------------------
    def target(self, layer) -> str:
        return f"layers.{layer.index}.experts"

    def lower(self, ctx, layer, x):
        import operator

        import torch

        from moedsl.nn import moe_ops

        m, cfg = ctx.model, layer.config
        name = f"layers.{layer.index}"
        meta = dict(moe_layer=name)
        gt = gate_type(cfg.gate.type)
        if ctx.decode and gt.cannot_decode:
            ctx.cannot_decode(layer, gt.cannot_decode)
        # a dense gate is uniform (every expert takes every token): always the batched buffer
        dense = gt.dense
        layout = "capacity" if (dense or (cfg.gate.has_capacity and ctx.static)) else "packed"
        # decoding routes each token as its own routing group (GShard's local groups at their smallest):
        # a token's experts depend neither on the other rows, their padding, nor how the sequence is
        # split into steps, and a lone token is never past a capacity of at least one slot
        # routing_groups: sequence routes each sequence as a group of its own: as many groups as
        # the batch has rows, counted when it runs (so always this rank's own rows)
        per_sequence = cfg.gate.per_sequence and not ctx.decode
        groups = 1 if (ctx.decode or per_sequence) else cfg.gate.routing_groups
        ctx.add_moe(name=name, index=layer.index, moe_index=layer.moe_index, config=cfg, layout=layout,
                    groups=1 if cfg.gate.per_sequence else cfg.gate.routing_groups, per_token=ctx.decode,
                    per_sequence=per_sequence)
        ctx.module(f"{name}.gate", lambda: self.gate_module(cfg, m, ctx.seed, layer.index))
        owner = "hierarchy" if cfg.hierarchy is not None else "gate"
        flat = ctx.call_function(routing_tokens, (x, f"{name}.moe.{owner}", groups, 1),
                                 ctx.node_name(layer, "tokens"), **meta, role="tokens")
        if per_sequence:
            groups = ctx.call_function(sequence_count, (x,), ctx.node_name(layer, "groups"), **meta, role="groups")
        token_ids = ctx.token_ids() if gt.needs_tokens else None
        kwargs = {}
        mask = ctx.token_mask(x)
        if mask is not None:  # the tokens that count (images that only fill a batch do not)
            kwargs["mask"] = mask
        padding = None if cfg.gate.route_padding else ctx.padding_mask(layer)
        if padding is not None:  # route_padding: false: the padding (an encoder's source padding) is not routed
            kwargs["padding"] = padding
        if ctx.decode:
            groups = ctx.call_function(token_count, (flat,), ctx.node_name(layer, "groups"), **meta, role="groups")
            kwargs["gidx"] = ctx.call_function(decode_token_keys, (ctx.positions, m.max_seq_len),
                                               ctx.node_name(layer, "keys"), **meta, role="keys")
        route = ctx.call_module(f"{name}.gate", (flat, token_ids, 0, groups),
                                ctx.node_name(layer, "route"), **meta, role="route")
        route.kwargs = kwargs
        if layout == "capacity":
            disp = ctx.call_function(moe_ops.dispatch, (flat, route), ctx.node_name(layer, "dispatch"), **meta,
                                     role="dispatch")
            ye = ctx.call_module(f"{name}.experts", (disp,), ctx.node_name(layer, "experts"), **meta, role="experts")
            y = ctx.call_function(moe_ops.combine, (ye, route), ctx.node_name(layer, "combine"), **meta,
                                  role="combine")
        else:
            disp = ctx.call_function(moe_ops.dispatch_packed, (flat, route), ctx.node_name(layer, "dispatch"),
                                     **meta, role="dispatch")
            rows = ctx.call_function(getattr, (disp, "rows"), ctx.node_name(layer, "rows"), **meta, role="rows")
            sizes = ctx.call_function(getattr, (disp, "sizes"), ctx.node_name(layer, "sizes"), **meta, role="sizes")
            ye = ctx.call_module(f"{name}.experts", (rows, sizes), ctx.node_name(layer, "experts"), **meta,
                                 role="experts")
            y = ctx.call_function(moe_ops.combine_packed, (ye, disp, route), ctx.node_name(layer, "combine"),
                                  **meta, role="combine")
        if cfg.gate.dropped_tokens == "scaled_input":  # a dropped token passes as p·x
            y = ctx.call_function(moe_ops.pass_dropped, (y, flat, route), ctx.node_name(layer, "pass_dropped"),
                                  **meta, role="pass_dropped")
        if cfg.experts.shared is not None:  # shared experts: one FFN of count × hidden (the sum of count FFNs)
            ctx.module(f"{name}.shared", lambda: self.shared_module(cfg, m))
            sh = ctx.call_module(f"{name}.shared", (flat,), ctx.node_name(layer, "shared"), **meta, role="shared")
            y = ctx.call_function(operator.add, (y, sh), ctx.node_name(layer, "moe_out"), **meta, role="moe_out")
        y = ctx.call_function(torch.Tensor.view_as, (y, x), ctx.node_name(layer, "unflatten"), **meta,
                              role="unflatten")
        ctx.aux.append(ctx.call_function(getattr, (route, "aux_loss"), ctx.node_name(layer, "aux_loss"), **meta,
                                         role="aux"))
        ctx.stats.append(ctx.call_function(moe_ops.router_stats, (route, name), ctx.node_name(layer, "router_stats"),
                                           **meta, role="stats"))
        return y


def overlap_issue(cfg: MoE, batch: int, seq: int, world: int = 1) -> Optional[str]:
    """What is wrong with splitting a batch of ``batch`` sequences × ``seq`` tokens on ``world``
    processes into ``overlap.chunks`` (None: nothing). A chunk is a range of the tokens of one
    rank's routing group (packed), or of the slots of its buffer (capacity): more chunks than
    tokens would leave chunks empty, all-to-alls with nothing to carry."""
    D = cfg.overlap.chunks
    groups = cfg.gate.group_count(batch)
    per = seq if cfg.gate.per_sequence else batch * seq // max(groups, world)
    if D <= per:
        return None
    split = f"{groups} routing groups" if groups >= world else f"{world} processes"
    tokens = f"{per} token" + ("s" if per != 1 else "")
    return (f"{D} chunks exceed the {tokens} of a routing group ({batch} sequences × {seq} tokens "
            f"over {split})")


def routing_tokens(x, gate: str, groups: int, world: int):
    """x [B, T, d] -> the tokens [B·T, d] the gate routes. The tokens of the global batch (B·T on
    each of ``world`` ranks) split into ``groups`` equal routing groups: refuse a batch whose do not,
    naming the gate, before the gate's reshape fails on it."""
    B, T = x.shape[0], x.shape[1]
    if (B * T * world) % groups:
        from moedsl.validate import BatchError

        ranks = f"{world} ranks × " if world > 1 else ""
        raise BatchError(f"{gate}.routing_groups = {groups} does not divide the batch of {ranks}{B} sequences "
                         f"× {T} tokens ({B * T * world} tokens)")
    return x.flatten(0, 1)


def sequence_count(x) -> int:
    """x [B, T, d] -> B: the routing groups of ``routing_groups: sequence``, one per row."""
    return x.shape[0]


def token_count(flat) -> int:
    """Tokens [S, d] -> S: a decode graph's routing groups, one per token."""
    return flat.shape[0]


def decode_token_keys(positions, max_seq_len: int):
    """Positions [B, t] -> [B·t] keys of the tokens' random routing draws (GShard's random second
    expert): row · max_seq_len + position, whichever step decodes the token."""
    import torch

    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    return (rows * max_seq_len + positions.clamp(min=0)).reshape(-1)


@functools.lru_cache(maxsize=None)
def _parts(kind: MoEKind, cfg: MoE, model) -> MoEParams:
    """Counted once per config (the repeated layers of a stack share theirs)."""
    import torch

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        per_expert = numel(kind.experts_module(cfg, model, [0], init=False))
        shared = numel(kind.shared_module(cfg, model)) if cfg.experts.shared is not None else 0
        gate = kind.gate_module(cfg, model)
    router = numel(gate)
    h = cfg.hierarchy
    if h is None:
        return MoEParams(per_expert=per_expert, router=router, router_active=router, shared=shared)
    # a token uses the primary gate and the secondary gates of the primary.k groups it is sent to
    secondary = sum(p.numel() for name, p in gate.named_parameters() if name.startswith("secondary"))
    active = router - secondary + secondary // h.groups * h.primary.k
    return MoEParams(per_expert=per_expert, router=router, router_active=active, shared=shared)


MOE = register(MoEKind())
