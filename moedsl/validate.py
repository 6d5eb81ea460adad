"""From schema-valid data to a typed ``Spec``, with the checks a schema cannot express.

Every check reports through ``_Checks.error`` with the JSON path of the value at
fault, so the user sees the line to fix; all problems are collected and raised
together as one ``SpecError``.
"""
from __future__ import annotations

from typing import Any

from .checks import Checks as _Checks
from .checks import NoLocation
from .checks import a as _a
from .errors import Issue, MoedslError, UserError, format_path
from .kinds import layer_kind, layer_kinds, take
from .kinds.moe import overlap_issue
from .kinds.patch_embed import tokens_per_image
from .mesh import check_mesh
from .spec import Distill, Hardware, Image, Layer, Mesh, Model, Placement, Replication, Spec, SpanCorruption, Train

MAX_LAYERS = 10_000  # after repeat expansion

_take = take  # the layer kinds' configs are built in their modules (moedsl.kinds)


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
    needed = ("d_model", "input", "vocab_size", "max_seq_len", "norm", "norm_eps", "tie_embeddings", "image",
              "classes")
    if any(p in ((), ("model",)) or (p[0] == "model" and p[1] in needed) or _structural(p) for p in bad):
        c.raise_if_any()
    model = _model(data["model"], c)
    _stacks(data, model, c)
    layers = _layers(data, model, c, skip=bad)
    if schema_issues:
        c.raise_if_any()  # what follows needs the whole spec sound
    train = _train(data.get("train") or {}, model, c, layers)
    placement = _placement(data.get("placement") or {}, layers, c)
    spec = Spec(version=data["moedsl"], name=data["name"], description=data.get("description", ""),
                model=model, layers=layers, placement=placement, train=train,
                source=located.source, located=located, data=data)
    if model.tokenizer is not None:
        _tokenizer(spec, c)
    c.issues.extend(i for i in check_batch(spec, train.batch_size, origin="train.batch_size") if i not in c.issues)
    if placement.mesh is not None:
        check_mesh(spec, placement.mesh.size, c)
    c.raise_if_any()
    return spec


class BatchError(MoedslError, ValueError):
    """A batch the model cannot route: its sequences do not split into a layer's routing groups."""


def routing_groups_issue(layer, batch: int, seq: int | None = None) -> str | None:
    """What is wrong with routing ``batch`` sequences through MoE ``layer`` (None: nothing).
    Without ``seq`` (the spec's own train.batch_size) the batch splits into routing_groups
    groups of whole sequences (GShard's local groups); with ``seq`` (a batch a run or a
    forward actually routes) the rule is the gate's own: its batch·seq tokens split evenly."""
    groups = layer.config.gate.routing_groups
    if layer.config.gate.per_sequence:  # each sequence its own group: any batch splits
        return None
    if seq is None:
        if batch % groups == 0:
            return None
        return f"routing_groups = {groups} does not divide the batch of {batch} sequences"
    if (batch * seq) % groups == 0:
        return None
    return (f"routing_groups = {groups} does not divide the batch of {batch} sequences × {seq} tokens "
            f"({batch * seq} tokens)")


def check_batch(spec: Spec, batch: int, world: int = 1, origin: str = "the batch",
                seq: int | None = None) -> list[Issue]:
    """Every reason a global batch of ``batch`` sequences (of ``seq`` tokens, when known) on
    ``world`` processes cannot run ``spec``, as located issues (empty: it can). ``origin`` says
    where the batch came from (``--batch``, ``train.batch_size``) in the hints."""
    located = spec.located or NoLocation(spec.source)
    issues: list[Issue] = []
    for layer in spec.moe_layers:
        chunks = overlap_issue(layer.config, batch, seq or spec.train.seq_len, world)
        if chunks is not None:
            issue = located.issue(layer.path + ("moe", "overlap", "chunks"), chunks,
                                  f"{origin} is {batch}: use at most that many chunks, or a larger batch")
            if issue not in issues:
                issues.append(issue)
        problem = routing_groups_issue(layer, batch, seq)
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

def _whole(x) -> bool:
    """An integer the schema accepts (not a bool): what a comparison needs, where the schema's own
    error names any other value."""
    return isinstance(x, int) and not isinstance(x, bool)


def _model(d: dict, c: _Checks) -> Model:
    m = _take(Model, d, image=_take(Image, d["image"]) if "image" in d else None)
    if m.input == "tokens" and m.vocab_size is None:
        c.error(("model",), "missing required key 'vocab_size'", "input: tokens embeds integer ids", key=True)
    if m.input in ("vectors", "image"):
        for key in ("vocab_size", "tie_embeddings"):
            if key in d:
                c.error(("model", key), f"{key!r} does not apply to input: {m.input} (there are no token ids)",
                        key=True)
    if m.vocab_size is not None:
        for key in ("pad_id", "eos_id", "decoder_start_id"):
            value = getattr(m, key)  # the schema's error already names a value that is not an integer
            if _whole(value) and _whole(m.vocab_size) and value >= m.vocab_size:
                c.error(("model", key), f"{key} {getattr(m, key)} is not an id of the vocabulary of {m.vocab_size}",
                        f"use an id below {m.vocab_size}")
    if m.input == "image":
        _image(d, m, c)
    else:
        for key in ("image", "classes"):
            if key in d:
                c.error(("model", key), f"{key!r} applies to input: image only (this model's input is {m.input})",
                        key=True)
    return m


def _tokenizer(spec: Spec, c: _Checks) -> None:
    """model.tokenizer: a file whose every id the embedding has a row for. Checked where the spec
    is YAML a person wrote (it has positions); a spec rebuilt from a dict (a checkpoint's
    meta.json, a worker's copy) was checked when written, and its relative path no longer has
    the folder it was relative to."""
    m = spec.model
    if m.input != "tokens":
        c.error(("model", "tokenizer"), f"'tokenizer' applies to input: tokens only (this model's input is "
                f"{m.input})", key=True)
        return
    if not spec.located.values:
        return
    from .runtime.tokens import model_tokenizer, tokenizer_max_id

    try:
        path = model_tokenizer(spec)
        found, folder = path.is_file(), path.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # ~user with no such user
        c.error(("model", "tokenizer"), f"{m.tokenizer!r} is not a usable path ({e})")
        return
    if not found:
        c.error(("model", "tokenizer"), f"{path}: no such file" + (" (a folder: name its tokenizer.json)"
                                                                   if folder else ""))
        return
    try:
        top = tokenizer_max_id(path)
    except UserError as e:
        c.error(("model", "tokenizer"), str(e))
        return
    if m.vocab_size is not None and top >= m.vocab_size:
        c.error(("model", "vocab_size"), f"{m.vocab_size} does not cover the tokenizer {path}: its ids run to {top}",
                f"vocab_size: {top + 1} or more")


def _image(d: dict, m: Model, c: _Checks) -> None:
    """model.image and model.classes of a model over images (ViT, Dosovitskiy et al. 2021, §3.1)."""
    if m.image is None:
        c.error(("model",), "missing required key 'image'", "input: image needs e.g. image: {size: 8, patch: 2}",
                key=True)
    elif m.image.size % m.image.patch:
        c.error(("model", "image", "patch"), f"patch {m.image.patch} does not divide the image size "
                f"{m.image.size}", f"use a divisor of {m.image.size}")
    if m.classes is None:
        c.error(("model",), "missing required key 'classes'", "input: image: the classifier predicts one of "
                "model.classes classes", key=True)


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


def _mixed_items(items: list, path: tuple, c: _Checks) -> bool:
    """Report items that are both a layer and a repeat / block / cycle (the schema's oneOf admits
    `{moe: ..., repeat: 2}` inside a block: a kind branch matches, the repeat branch does not)."""
    found = False
    for i, item in enumerate(items):
        kinds = [k for k in item if k in layer_kinds()]
        structural = [k for k in ("repeat", "block", "cycle") if k in item]
        if kinds and structural:
            c.error(path + (i,), f"a layer cannot be both {kinds[0]!r} and {structural[0]!r}",
                    "write the repeat as its own item, with the layer in its block")
            found = True
        for key in ("block", "cycle"):
            if isinstance(item.get(key), list):
                found |= _mixed_items(item[key], path + (i, key), c)
    return found


STACK_KEYS = ("layers", "encoder", "decoder")  # the top-level keys that hold layer lists


def _structural(path: tuple) -> bool:
    """A schema issue in the shape of the layer list (not inside one layer's settings)."""
    return bool(path) and path[0] in STACK_KEYS and not any(part in layer_kinds() for part in path[1:])


def _stacks(data: dict, model: Model, c: _Checks) -> None:
    """The spec states one stack (``layers``) or an encoder-decoder's two (``encoder`` and
    ``decoder``), never both, never a decoder alone; raises at once otherwise (no stack to build)."""
    before = len(c.issues)
    if "layers" in data:
        for key in ("encoder", "decoder"):
            if key in data:
                c.error((key,), f"{key!r} and 'layers' cannot both be given: 'layers' states a single stack, "
                        "'encoder' and 'decoder' an encoder-decoder's two", "keep one of the two forms", key=True)
    elif "encoder" in data and "decoder" not in data:
        c.error((), "missing required key 'decoder'", "an encoder-decoder states its decoder stack beside "
                "'encoder'", key=True)
    elif "decoder" in data and "encoder" not in data:
        c.error(("decoder",), "a decoder needs an encoder: its cross-attention reads the encoder's output",
                "add 'encoder:' (or write a decoder-only model's stack as 'layers:')", key=True)
    elif "encoder" not in data:
        c.error((), "missing required key 'layers'", "the layer stack, bottom to top (or 'encoder' and "
                "'decoder' for an encoder-decoder)", key=True)
    elif model.input != "tokens":
        c.error(("model", "input"), f"an encoder-decoder reads token ids, not input: {model.input}",
                "set model.input: tokens")
    if len(c.issues) > before:
        c.raise_if_any()


def _layers(data: dict, model: Model, c: _Checks, skip=()) -> tuple:
    stacks = ("layers",) if "layers" in data else ("encoder", "decoder")
    for key in stacks:
        if _mixed_items(data[key], (key,), c):
            c.raise_if_any()
    total = sum(_count_expanded(data[key]) for key in stacks)
    if total > MAX_LAYERS:
        c.error((stacks[-1],), f"the stack expands to more than {MAX_LAYERS:,} layers")
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
        kind = next(k for k in item if k in layer_kinds())
        if p not in configs:
            broken = any(b[:len(p)] == p for b in skip)  # the schema already reported this layer
            configs[p] = None if broken else layer_kind(kind).build(item[kind] or {}, p + (kind,), model, c)
        expanded.append((kind, p))

    for key in stacks:
        walk(data[key], (key,), 0)
    layers = []
    moe_index = 0
    for index, (kind, p) in enumerate(expanded):
        layers.append(Layer(kind=kind, config=configs[p], index=index, path=p,
                            moe_index=moe_index if kind == "moe" else None,
                            stack="" if p[0] == "layers" else p[0]))
        moe_index += kind == "moe"
    if not skip:
        reported: set = set()

        def once(path, message, hint=None):
            if path not in reported:
                reported.add(path)
                c.error(path, message, hint)

        for key in stacks:
            name = "" if key == "layers" else key
            _check_stack([layer for layer in layers if layer.stack == name], model, once)
        if model.tie_embeddings and not (layers[0].kind == "embedding" and layers[-1].kind == "head"):
            c.error(("model", "tie_embeddings"), "tie_embeddings needs an embedding first and a head last")
        _check_shared(layers, model, once)
    return tuple(layers)


def _check_shared(layers: list, model: Model, once) -> None:
    """Layers that use one module (``LayerKind.shared``: an encoder-decoder's one embedding table,
    a stack's relative position bias) state the same settings for it."""
    first: dict = {}
    for layer in layers:
        if layer.config is None:
            continue
        for name, settings in layer_kind(layer.kind).shared(layer, model).items():
            if name not in first:
                first[name] = (layer, settings)
                continue
            other, was = first[name]
            if settings != was:
                where, what = layer_kind(layer.kind).shared_field(layer, settings, was)
                once(layer.path + (layer.kind,) + where, f"{what} differs from {format_path(other.path)}'s, "
                     f"which uses the same {name} module", "the layers sharing it state it alike")


def _check_stack(layers: list, model: Model, once) -> None:
    """Where each kind may stand in its stack (first, last, only with token ids, only in an
    encoder or a decoder), then each kind's own checks."""
    stack = layers[0].stack
    where = f"the {stack}" if stack else "the stack"
    for layer in layers:
        kind = layer_kind(layer.kind)
        p = layer.path + (layer.kind,)
        if stack not in kind.stacks:
            if stack:
                once(p, f"{_a(layer.kind)} layer cannot stand in the {stack}",
                     f"it stands in {' or '.join('the ' + s for s in kind.stacks if s)} only")
            else:
                once(p, f"{_a(layer.kind)} layer needs an encoder-decoder",
                     "state the stacks as 'encoder' and 'decoder' instead of 'layers'")
        elif not kind.accepts(model.input):
            if kind.needs_tokens:
                once(p, f"input: {model.input} has no token ids, so no {layer.kind} layer",
                     "set model.input: tokens, or remove this layer" if model.input != "image" else
                     f"images start with a patch_embed and end with a classifier: replace this {layer.kind}")
            else:
                once(p, f"{_a(layer.kind)} layer needs model.input: {' or '.join(kind.inputs)} (this model's "
                     f"input is {model.input})", "remove this layer, or change model.input")
        elif kind.place == "first" and layer is not layers[0]:
            once(p, f"{_a(layer.kind)} can only be the first layer of {where}")
        elif kind.place == "last" and layer is not layers[-1]:
            once(p, f"{_a(layer.kind)} can only be the last layer of {where}")
        kind.check_stack(layer, model, once)
    key = stack or "layers"
    if model.input == "tokens" and layers[0].kind != "embedding":
        once(layers[0].path, f"input: tokens needs an embedding as the first layer{' of the ' + stack if stack else ''}",
             f"add '- embedding: {{}}' at the top of {key}")
    if stack == "decoder" and layers[-1].kind != "head":
        once(layers[-1].path, "the decoder needs a head as its last layer (its logits are the model's output)",
             "add '- head: {}' at the end of decoder")
    if model.input == "image":
        _check_image_stack(layers, model, once)


def _check_image_stack(layers: list, model: Model, once) -> None:
    """A model over images starts with a patch embedding and ends with a classifier (ViT §3.1);
    pooling the class token needs the patch embedding to add one."""
    first, last = layers[0], layers[-1]
    if first.kind != "patch_embed" and layer_kind(first.kind).accepts("image"):  # else reported already
        once(first.path, "input: image needs a patch_embed as the first layer",
             "add '- patch_embed: {}' at the top of layers")
    if last.kind != "classifier" and layer_kind(last.kind).accepts("image"):
        once(last.path, "input: image needs a classifier as the last layer",
             "add '- classifier: {}' at the end of layers")
    elif first.kind == "patch_embed" and None not in (first.config, last.config) and \
            last.config.pool == "token" and not first.config.class_token:
        once(last.path + ("classifier", "pool"), "pool: token reads the class token, but the patch_embed adds "
             "none (class_token: false)", "use pool: mean, or class_token: true")


# ----------------------------------------------------------------------------- placement

def _placement(d: dict, layers: tuple, c: _Checks) -> Placement:
    ex = d.get("experts") or {}
    strategy = ex.get("strategy", Placement.strategy)
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
                     all_to_all=d.get("all_to_all", Placement.all_to_all), shard=d.get("shard", Placement.shard),
                     replication=_take(Replication, d["replication"]) if "replication" in d else None,
                     hardware=_take(Hardware, d.get("hardware") or {}))


# ----------------------------------------------------------------------------- train

def _train(d: dict, model: Model, c: _Checks, layers: tuple = ()) -> Train:
    micro = d.get("micro_batches", Train.micro_batches)
    batch = d.get("batch_size", Train.batch_size)
    if batch % micro:
        c.error(("train", "micro_batches"), f"micro_batches {micro} does not split batch_size {batch} into equal "
                "micro-batches", f"use a divisor of {batch}")
    encoder_decoder = bool(layers) and layers[0].stack == "encoder"
    objective = d.get("objective", "seq2seq" if encoder_decoder else Train.objective)
    if objective != "lm" and layers and not encoder_decoder:
        c.error(("train", "objective"), f"objective {objective} trains an encoder–decoder, and this spec is "
                "decoder-only (layers)", "state encoder: and decoder: stacks, or use objective: lm")
    if objective == "lm" and encoder_decoder:
        c.error(("train", "objective"), "objective lm is a decoder-only stack's next-token loss; an "
                "encoder–decoder learns span_corruption (text) or seq2seq (source/target pairs)")
    if model.input == "image" and model.image is not None:
        return _image_train(d, model, c, layers)
    seq = d.get("seq_len", min(model.max_seq_len, 64))
    if seq > model.max_seq_len:
        c.error(("train", "seq_len"), f"seq_len {seq} exceeds model.max_seq_len {model.max_seq_len}")
    return _take(Train, d, seq_len=seq, distill=_take(Distill, d["distill"]) if "distill" in d else None,
                 objective=objective, span_corruption=_take(SpanCorruption, d.get("span_corruption") or {}))


def _image_train(d: dict, model: Model, c: _Checks, layers: tuple) -> Train:
    """input: image: a sequence is one image's tokens, so seq_len is resolved from model.image (and
    the class token); the data defaults to the digits."""
    tokens = tokens_per_image(model, layers)
    if "seq_len" in d and d["seq_len"] != tokens:
        c.error(("train", "seq_len"), f"seq_len {d['seq_len']} is not the {tokens} tokens of one image "
                f"({model.image.patches} patches{' + the class token' if tokens > model.image.patches else ''})",
                "leave seq_len out: it follows from model.image")
    if tokens > model.max_seq_len:
        c.error(("model", "image"), f"an image is {tokens} tokens, more than model.max_seq_len "
                f"{model.max_seq_len}")
    return _take(Train, {"data": "digits", **d}, seq_len=tokens,
                 distill=_take(Distill, d["distill"]) if "distill" in d else None)
