"""From schema-valid data to a typed ``Spec``, with the checks a schema cannot express.

Every check reports through ``_Checks.error`` with the JSON path of the value at
fault, so the user sees the line to fix; all problems are collected and raised
together as one ``SpecError``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .checks import Checks as _Checks
from .checks import NoLocation
from .checks import a as _a
from .errors import Issue, MoedslError, SpecError, format_path
from .mesh import MeshShape, check_mesh, resolve_mesh  # noqa: F401 - their home is moedsl.mesh; kept importable here
from .spec import (FFN, LSTM, Attention, Embedding, Experts, Gate, Head, Hierarchy, Layer, Losses, Mesh, Model,
                   MoE, Norm, Placement, SharedExperts, Spec, SubGate, Train)

MAX_LAYERS = 10_000  # after repeat expansion

CAPACITY_KEYS = ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy", "drop_priority", "routing_groups")
# which options mean something for which gate type (beyond `type`)
GATE_OPTIONS = {
    "softmax": {"jitter"},
    "noisy_topk": {"k", "noise_epsilon", "jitter", "bias_balancing", *CAPACITY_KEYS},
    "topk": {"k", "normalize", "score", "jitter", "bias_balancing", *CAPACITY_KEYS},
    "switch": {"k", "jitter", "bias_balancing", *CAPACITY_KEYS},
    "gshard": {"k", "second_expert", "normalize", "jitter", "bias_balancing", *CAPACITY_KEYS},
    "expert_choice": {"capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy", "routing_groups",
                      "max_experts_per_token", "jitter"},
    "hash": {"k", "hash_seed", *CAPACITY_KEYS},
}
SUB_GATE_OPTIONS = {"softmax": {"jitter"}, "noisy_topk": {"k", "noise_epsilon", "jitter"},
                    "topk": {"k", "normalize", "jitter"}}
# the papers' capacity factors: gate types that drop by default
DEFAULT_CAPACITY = {"switch": 1.25, "gshard": 1.0, "expert_choice": 2.0}
# which auxiliary losses each gate type defines
LOSSES_FOR = {
    "importance": {"softmax", "noisy_topk", "topk", "switch", "gshard", "hierarchical"},
    "load": {"noisy_topk", "hierarchical"},
    "balance": {"noisy_topk", "topk", "switch", "gshard"},
    "z_loss": {"softmax", "noisy_topk", "topk", "switch", "gshard", "expert_choice", "hierarchical"},
}


def _take(cls, data: dict | None, **resolved):
    """Build dataclass ``cls`` from the keys of ``data`` it has, plus resolved values."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in (data or {}).items() if k in names}
    kwargs.update(resolved)
    return cls(**kwargs)


def build_spec(data: dict, located, schema_issues=()) -> Spec:
    """Check semantics and build the Spec.

    With ``schema_issues`` (the data breaks the schema), the layers that the schema found
    sound are still checked, so that one run reports every mistake it can; then all
    issues are raised together.
    """
    c = _Checks(located)
    c.issues.extend(schema_issues)
    bad = [i.path for i in schema_issues]
    # the layer checks read these model fields; other model mistakes do not stop them
    needed = ("d_model", "input", "vocab_size", "max_seq_len", "norm", "norm_eps", "tie_embeddings")
    if any(p in ((), ("model",)) or (p[0] == "model" and p[1] in needed) or _structural(p) for p in bad):
        c.raise_if_any()
    model = _model(data["model"], c)
    layers = _layers(data, model, c, skip=bad)
    if schema_issues:
        c.raise_if_any()  # what follows needs the whole spec sound
    train = _train(data.get("train") or {}, model, c)
    placement = _placement(data.get("placement") or {}, layers, c)
    spec = Spec(version=data["moedsl"], name=data["name"], description=data.get("description", ""),
                model=model, layers=layers, placement=placement, train=train,
                source=located.source, located=located, data=data)
    c.issues.extend(i for i in check_batch(spec, train.batch_size, origin="train.batch_size") if i not in c.issues)
    if placement.mesh is not None:
        check_mesh(spec, placement.mesh.size, c)
    c.raise_if_any()
    return spec


class BatchError(MoedslError, ValueError):
    """A batch the model cannot route: its sequences do not split into a layer's routing groups."""


def routing_groups_issue(layer, batch: int) -> str | None:
    """What is wrong with routing ``batch`` sequences through MoE ``layer`` (None: nothing). The
    batch splits into routing_groups groups of whole sequences (GShard's local groups)."""
    groups = layer.config.gate.routing_groups
    if batch % groups == 0:
        return None
    return f"routing_groups = {groups} does not divide the batch of {batch} sequences"


def check_batch(spec: Spec, batch: int, world: int = 1, origin: str = "the batch") -> list[Issue]:
    """Every reason a global batch of ``batch`` sequences on ``world`` processes cannot run
    ``spec``, as located issues (empty: it can). ``origin`` says where the batch came from
    (``--batch``, ``train.batch_size``) in the hints."""
    located = spec.located or NoLocation(spec.source)
    issues: list[Issue] = []
    for layer in spec.moe_layers:
        problem = routing_groups_issue(layer, batch)
        if problem is None:
            continue
        owner = "hierarchy" if layer.config.hierarchy else "gate"
        groups = layer.config.gate.routing_groups
        issue = located.issue(layer.path + ("moe", owner, "routing_groups"), problem,
                              f"{origin} is {batch}: use a multiple of {groups}, or other routing_groups")
        if issue not in issues:  # a repeated layer is reported once
            issues.append(issue)
    if world > 1 and batch % world:
        issues.append(located.issue(("train", "batch_size"), f"the batch of {batch} sequences does not split "
                                    f"over {world} processes", f"{origin} is {batch}: use a multiple of {world}"))
    return issues


# ----------------------------------------------------------------------------- model

def _model(d: dict, c: _Checks) -> Model:
    m = _take(Model, d)
    if m.input == "tokens" and m.vocab_size is None:
        c.error(("model",), "missing required key 'vocab_size'", "input: tokens embeds integer ids", key=True)
    if m.input == "vectors":
        for key in ("vocab_size", "tie_embeddings"):
            if key in d:
                c.error(("model", key), f"{key!r} does not apply to input: vectors (there are no token ids)",
                        key=True)
    return m


# ----------------------------------------------------------------------------- layers

def _count_expanded(items: list) -> int:
    n = 0
    for item in items:
        if "repeat" in item:
            n += item["repeat"] * _count_expanded(item["block"])
        elif "cycle" in item:
            n += max(_count_expanded([choice]) for choice in item["cycle"])
        else:
            n += 1
        if n > MAX_LAYERS:
            return n
    return n


def _structural(path: tuple) -> bool:
    """A schema issue in the shape of the layer list (not inside one layer's settings)."""
    return bool(path) and path[0] == "layers" and not any(part in _BUILDERS for part in path[1:])


def _layers(data: dict, model: Model, c: _Checks, skip=()) -> tuple:
    items = data["layers"]
    total = _count_expanded(items)
    if total > MAX_LAYERS:
        c.error(("layers",), f"the stack expands to more than {MAX_LAYERS:,} layers")
        c.raise_if_any()
    configs: dict[tuple, Any] = {}  # one config per YAML item, however often it repeats
    expanded: list[tuple[str, tuple]] = []

    def walk(seq, path, iteration):
        for i, item in enumerate(seq):
            p = path + (i,)
            if "repeat" in item:
                for r in range(item["repeat"]):
                    walk(item["block"], p + ("block",), r)
            elif "cycle" in item:
                j = iteration % len(item["cycle"])
                _one(item["cycle"][j], p + ("cycle", j))
            else:
                _one(item, p)

    def _one(item, p):
        if "repeat" in item:  # a repeat block chosen by a cycle
            for r in range(item["repeat"]):
                walk(item["block"], p + ("block",), r)
            return
        kind = next(k for k in item if k in _BUILDERS)
        if p not in configs:
            broken = any(b[:len(p)] == p for b in skip)  # the schema already reported this layer
            configs[p] = None if broken else _BUILDERS[kind](item[kind] or {}, p + (kind,), model, c)
        expanded.append((kind, p))

    walk(items, ("layers",), 0)
    layers = []
    moe_index = 0
    for index, (kind, p) in enumerate(expanded):
        layers.append(Layer(kind=kind, config=configs[p], index=index, path=p,
                            moe_index=moe_index if kind == "moe" else None))
        moe_index += kind == "moe"
    if not skip:
        _check_stack(layers, model, c)
    return tuple(layers)


def _check_stack(layers: list, model: Model, c: _Checks) -> None:
    reported: set = set()

    def once(path, message, hint=None):
        if path not in reported:
            reported.add(path)
            c.error(path, message, hint)

    for layer in layers:
        p = layer.path + (layer.kind,)
        if model.input == "vectors" and layer.kind in ("embedding", "head"):
            once(p, f"input: vectors has no token ids, so no {layer.kind} layer",
                 "set model.input: tokens, or remove this layer")
        elif layer.kind == "embedding" and layer.index != 0:
            once(p, "an embedding can only be the first layer of the stack")
        elif layer.kind == "head" and layer.index != len(layers) - 1:
            once(p, "a head can only be the last layer of the stack")
        if layer.kind == "moe" and layer.config.gate.type == "hash" and model.input != "tokens":
            once(p + ("gate", "type"), "a hash gate hashes token ids: it needs model.input: tokens")
    if model.input == "tokens" and layers[0].kind != "embedding":
        once(layers[0].path, "input: tokens needs an embedding as the first layer",
             "add '- embedding: {}' at the top of layers")
    if model.tie_embeddings and not (layers[0].kind == "embedding" and layers[-1].kind == "head"):
        c.error(("model", "tie_embeddings"), "tie_embeddings needs an embedding first and a head last")


def _embedding(d, p, model, c) -> Embedding:
    return _take(Embedding, d)


def _attention(d, p, model, c) -> Attention:
    a = _take(Attention, d, kv_heads=d.get("kv_heads", d["heads"]))
    if model.d_model % a.heads:
        c.error(p + ("heads",), f"d_model {model.d_model} is not divisible by {a.heads} heads")
    elif a.positions == "rotary" and (model.d_model // a.heads) % 2:
        c.error(p + ("positions",), f"rotary positions need an even head width, got "
                f"{model.d_model} / {a.heads} = {model.d_model // a.heads}")
    if a.kv_heads > a.heads or a.heads % a.kv_heads:
        c.error(p + ("kv_heads",), f"{a.heads} heads are not divisible by {a.kv_heads} kv_heads",
                "in grouped-query attention kv_heads divides heads")
    return a


def _lstm(d, p, model, c) -> LSTM:
    return _take(LSTM, d)


def _ffn(d, p, model, c) -> FFN:
    return _take(FFN, d)


def _norm(d, p, model, c) -> Norm:
    return Norm(type=d.get("type", model.norm), eps=d.get("eps", model.norm_eps))


def _head(d, p, model, c) -> Head:
    return _take(Head, d)


def _moe(d, p, model, c) -> MoE:
    e = d["experts"]
    shared = None
    if "shared" in e:
        shared = SharedExperts(count=e["shared"]["count"], hidden=e["shared"].get("hidden", e["hidden"]))
    experts = _take(Experts, e, shared=shared)
    hierarchy = None
    if "hierarchy" in d:
        h = d["hierarchy"]
        hp = p + ("hierarchy",)
        primary = _sub_gate(h["primary"], hp + ("primary",), h["groups"], "groups", c)
        secondary = _sub_gate(h["secondary"], hp + ("secondary",), h["experts_per_group"], "experts_per_group", c)
        hierarchy = Hierarchy(groups=h["groups"], experts_per_group=h["experts_per_group"],
                              primary=primary, secondary=secondary)
        if h["groups"] * h["experts_per_group"] != experts.count:
            c.error(p + ("experts", "count"),
                    f"experts.count {experts.count} != hierarchy groups {h['groups']} × experts_per_group "
                    f"{h['experts_per_group']} = {h['groups'] * h['experts_per_group']}")
        gate = _capacity(h, hp, "hierarchical", primary.k * secondary.k, c)
    else:
        gate = _gate(d["gate"], p + ("gate",), experts, c)
    losses = _take(Losses, d.get("losses"))
    for name, weight in (d.get("losses") or {}).items():
        if weight and gate.type not in LOSSES_FOR[name]:
            kinds = ", ".join(sorted(LOSSES_FOR[name]))
            why = {"expert_choice": "expert choice is balanced by construction",
                   "hash": "a hash gate has no router probabilities"}.get(gate.type, f"it is defined for: {kinds}")
            c.error(p + ("losses", name), f"the {name} loss does not apply to {_a(gate.type)} gate", why)
        elif weight and name == "load" and hierarchy and {hierarchy.primary.type, hierarchy.secondary.type} != {
                "noisy_topk"}:
            c.error(p + ("losses", name), "the load loss's estimator uses the gate noise: "
                    "both hierarchy levels must be noisy_topk")
    return _take(MoE, d, experts=experts, gate=gate, hierarchy=hierarchy, losses=losses)


def _gate(g: dict, p, experts: Experts, c: _Checks) -> Gate:
    t = g["type"]
    for key in g:
        if key != "type" and key not in GATE_OPTIONS[t]:
            homes = sorted(name for name, opts in GATE_OPTIONS.items() if key in opts)
            c.error(p + (key,), f"{key!r} does not apply to {_a(t)} gate",
                    f"it is an option of: {', '.join(homes)}" if homes else None, key=True)
    E = experts.count
    k = {"switch": 1, "gshard": 2, "hash": 1, "softmax": E, "expert_choice": 0}.get(t, g.get("k", 1))
    if t in ("topk", "noisy_topk") and k > E:
        c.error(p + ("k",), f"k = {k} exceeds the {E} experts", "k must be at most experts.count")
    if t == "gshard" and E < 2:
        c.error(p + ("type",), f"gshard routes to 2 experts but the layer has {E}")
    mept = g.get("max_experts_per_token")
    if mept is not None and mept > E:
        c.error(p + ("max_experts_per_token",), f"max_experts_per_token {mept} exceeds the {E} experts")
    bias = g.get("bias_balancing")
    gate = _capacity(g, p, t, k, c)
    extra = {key: g[key] for key in ("jitter", "noise_epsilon", "second_expert", "normalize", "score",
                                     "max_experts_per_token", "hash_seed") if key in g}
    return Gate(**{**gate.__dict__, **extra, "bias_balancing_rate": bias["rate"] if bias else None,
                   "jitter": g.get("jitter", 0.01 if t == "switch" else 0.0)})


def _capacity(g: dict, p, t: str, k: int, c: _Checks) -> Gate:
    """Resolve capacity_factor / drop_policy with the papers' defaults, and refuse contradictions."""
    policy = g.get("drop_policy")
    factor = g.get("capacity_factor")
    if t == "softmax":
        policy = "dropless"
    elif policy is None:
        policy = "drop" if (factor is not None or t in DEFAULT_CAPACITY) else "dropless"
    if policy == "dropless":
        if t == "expert_choice":
            c.error(p + ("drop_policy",), "expert choice is defined by its capacity: it cannot be dropless")
        for key in ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_priority"):
            if key in g:
                c.error(p + (key,), f"{key} conflicts with dropless routing (no capacity, nothing dropped)",
                        "remove it, or set drop_policy: drop", key=True)
        factor = None
    elif factor is None:
        factor = DEFAULT_CAPACITY.get(t)
        if factor is None:
            c.error(p + ("drop_policy",), "drop_policy: drop needs a capacity_factor",
                    "add capacity_factor (e.g. 1.25), or use drop_policy: dropless")
    return Gate(type=t, k=k, capacity_factor=factor, eval_capacity_factor=g.get("eval_capacity_factor"),
                min_capacity=g.get("min_capacity", 0), drop_policy=policy,
                drop_priority=g.get("drop_priority", "position"), routing_groups=g.get("routing_groups", 1))


def _sub_gate(g: dict, p, n: int, what: str, c: _Checks) -> SubGate:
    t = g["type"]
    for key in g:
        if key != "type" and key not in SUB_GATE_OPTIONS[t]:
            c.error(p + (key,), f"{key!r} does not apply to {_a(t)} gate", key=True)
    k = n if t == "softmax" else g["k"]
    if k > n:
        c.error(p + ("k",), f"k = {k} exceeds the {n} {what.replace('_', ' ')}")
    return _take(SubGate, g, k=k)


# ----------------------------------------------------------------------------- placement

def _placement(d: dict, layers: tuple, c: _Checks) -> Placement:
    p = ("placement",)
    ex = d.get("experts") or {}
    strategy = ex.get("strategy", "contiguous")
    moes = [layer for layer in layers if layer.kind == "moe"]
    ep = ("placement", "experts")

    def as_ranks(m):
        return tuple(tuple(r) if isinstance(r, list) else (r,) for r in m)

    emap = as_ranks(ex["map"]) if "map" in ex else None
    layer_maps = tuple(sorted((int(i), as_ranks(m)) for i, m in (ex.get("layers") or {}).items()))
    replicas = tuple(sorted((int(e), n) for e, n in (ex.get("replicas") or {}).items()))
    if strategy != "explicit":
        for key in ("map", "layers"):
            if key in ex:
                c.error(ep + (key,), f"{key!r} is for strategy: explicit (the strategy here is {strategy})",
                        key=True)
    else:
        covered = {i for i, _ in layer_maps}
        if emap is None and any(layer.moe_index not in covered for layer in moes):
            c.error(ep, "strategy: explicit needs a 'map' (expert -> rank) for every MoE layer")
    for i, _ in layer_maps:
        if i >= len(moes):
            c.error(ep + ("layers", str(i)), f"there is no MoE layer {i}: the stack has {len(moes)} "
                    f"(numbered 0..{len(moes) - 1})", key=True)
    declared = dict(replicas)
    for e, n in replicas:
        small = [layer for layer in moes if e >= layer.config.experts.count]
        if small:
            c.error(ep + ("replicas", str(e)), f"expert {e} does not exist in the MoE layer at "
                    f"{format_path(small[0].path)} ({small[0].config.experts.count} experts)", key=True)
    if strategy == "explicit":
        maps = dict(layer_maps)
        for layer in moes:
            m = maps.get(layer.moe_index, emap)
            if m is None:
                continue
            where = ep + (("layers", str(layer.moe_index)) if layer.moe_index in maps else ("map",))
            E = layer.config.experts.count
            if len(m) != E:
                c.error(where, f"the map places {len(m)} experts but the MoE layer at "
                        f"{format_path(layer.path)} has {E}")
                continue
            for e, ranks in enumerate(m):
                copies = declared.get(e, 1)
                if len(ranks) != copies:
                    c.error(where + (e,), f"expert {e} is placed on {len(ranks)} rank(s) but "
                            f"{'replicas declares' if e in declared else 'without replicas it has'} {copies}",
                            f"declare placement.experts.replicas: {{{e}: {len(ranks)}}}" if e not in declared
                            else None)
    mesh = Mesh(**d["mesh"]) if "mesh" in d else None
    return Placement(mesh=mesh, expert_parallel=d.get("expert_parallel"), data_parallel=d.get("data_parallel"),
                     strategy=strategy, map=emap, layer_maps=layer_maps, replicas=replicas,
                     all_to_all=d.get("all_to_all", "flat"))


# ----------------------------------------------------------------------------- train

def _train(d: dict, model: Model, c: _Checks) -> Train:
    seq = d.get("seq_len", min(model.max_seq_len, 64))
    if seq > model.max_seq_len:
        c.error(("train", "seq_len"), f"seq_len {seq} exceeds model.max_seq_len {model.max_seq_len}")
    return _take(Train, d, seq_len=seq)


_BUILDERS = {"embedding": _embedding, "attention": _attention, "lstm": _lstm, "ffn": _ffn, "moe": _moe,
             "norm": _norm, "head": _head}
