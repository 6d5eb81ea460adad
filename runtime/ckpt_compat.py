"""What a resume may change: a checkpoint against the spec it is loaded into.

``compare`` refuses a checkpoint whose weights' shapes or meaning differ from the spec's,
naming the first difference, and names the training-only changes it allows (``training_only``)
and the changed run options of ``TRAJECTORY``. Which fields of a section of the spec are
training-only is declared by each part of the spec itself: ``Model.training_only``, each layer
kind's ``resume_may_change`` and each gate type's ``training_only``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from moedsl.errors import UserError, format_path
from moedsl.kinds import layer_kinds
from moedsl.spec import Model
from moedsl.spec_loader import load_spec

# The run options a checkpoint records (meta.json "train"): those that change the training
# trajectory after a resume, each named in a note when it changed.
# Distillation (train.distill) is one of them: it changes the objective, never the weights' meaning;
# so are micro-batches (capacity and balancing losses are per micro-batch). Recomputation is not:
# it changes what memory holds, never what a step computes.
TRAJECTORY = ("steps", "batch", "seq", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "seed", "data",
              "distill_teacher", "distill_alpha", "distill_temperature", "micro_batches")


def architecture(spec) -> dict:
    """The model and the layer stack (an encoder-decoder's two) as written in the spec (kept in ``meta.json``)."""
    stacks = ("layers",) if "layers" in spec.data else ("encoder", "decoder")
    return {"model": spec.data["model"], **{key: spec.data[key] for key in stacks}}


def fingerprint(spec) -> str:
    """A hash of ``architecture``: equal fingerprints need no closer comparison."""
    return hashlib.sha256(json.dumps(architecture(spec), sort_keys=True).encode()).hexdigest()[:16]


def training_only(names: tuple, old, new, gate_type=None) -> bool:
    """Whether a change of the field at ``names`` (its dict keys from the top, e.g.
    ``("layers", "moe", "gate", "capacity_factor")``) from ``old`` to ``new`` leaves the
    checkpoint's weights with the same shapes and the same meaning.

    Allowed (training-only): what only shapes how the weights are trained or how much is
    computed, never the function the weights stand for --
      * the auxiliary losses' weights (any ``losses`` field): they add to the objective only;
      * the capacity of token-choice gates (``capacity_factor``, ``eval_capacity_factor``,
        ``min_capacity``, ``drop_policy``, ``drop_priority``, ``routing_groups``) and expert
        choice's ``max_experts_per_token``: a compute budget that drops overflow tokens
        (Switch Transformer, Fedus et al. 2021, §2.2), each token's experts stay the same;
      * training noise (``jitter``: Switch §2.4 applies it in training only; ``noise_epsilon``:
        Shazeer et al. 2017 §2.1, eq. 4, the noise is drawn in training only), ``dropout``;
      * initialisation (``init_std``, ``init_scale``): the checkpoint replaces it;
      * the autocast precision (``dtype``, ``router_dtype``): the weights are kept in float32;
      * the rate of the aux-loss-free bias (``bias_balancing_rate``), but not turning it on or
        off, which adds or removes the ``expert_bias`` / ``load_acc`` buffers.
    Refused: every shape (dims, counts, heads, layer kinds), and what the same weights would
    compute differently -- the gate type and score function, ``normalize``, GShard's
    ``second_expert``, ``hash_seed`` (another table), the norm's type and eps, positions,
    and ``k``: top-k weights are a softmax over the k selected (Shazeer et al. 2017 eq. 3;
    Mixtral), so the router and experts were trained for mixtures of exactly k. For the same
    reason expert choice's ``capacity_factor`` is refused: it is that gate's k, the average
    number of experts per token (Zhou et al. 2022, §3.1).

    Each part declares its own: ``Model.training_only``, each layer kind's ``resume_may_change``
    (its ``training_only`` fields: ``dropout`` for every kind), each gate type's.
    """
    if len(names) == 2 and names[0] == "model":
        return names[1] in Model.training_only
    kinds = layer_kinds()
    for i in range(len(names) - 1, 0, -1):  # the innermost layer (as written, a repeat's block nests them)
        if names[i - 1] in ("layers", "block", "cycle") and names[i] in kinds:
            return kinds[names[i]].resume_may_change(names[i + 1:], old, new, gate_type)
    return False


def _differences(a, b, path: str, names: tuple, gate_type=None) -> list:
    """Every leaf where ``a`` (the checkpoint's) and ``b`` (the spec's) differ:
    ``(path, names, old, new, gate type)``, in key order."""
    if a == b:
        return []
    if isinstance(a, (dict, type(None))) and isinstance(b, (dict, type(None))):
        a, b = a or {}, b or {}
        if names and names[-1] == "gate":
            gate_type = a.get("type") or b.get("type")
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), names + (k,), gate_type)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _differences(x, y, f"{path}[{i}]", names, gate_type)
        return out
    return [(path, names, a, b, gate_type)]


def _resolved_differences(old, spec) -> list:
    """Differences of two validated specs, field by field with defaults filled in and
    ``repeat`` expanded; layers are named by where they are in ``spec``'s YAML."""
    out = _differences(asdict(old.model), asdict(spec.model), "model", ("model",))
    if len(old.layers) != len(spec.layers):
        return out + [("layers", ("layers",), f"{len(old.layers)} layers", f"{len(spec.layers)} layers", None)]
    for was, now in zip(old.layers, spec.layers):
        where = format_path(now.path)
        if was.kind != now.kind:
            out.append((where, ("layers", "kind"), was.kind, now.kind, None))
        else:
            out += _differences(asdict(was.config), asdict(now.config), f"{where}.{now.kind}", ("layers", now.kind))
    return out


def _spec_differences(meta: dict, spec) -> list:
    if meta.get("fingerprint") == fingerprint(spec):
        return []
    try:
        old = load_spec(meta["spec_data"])
    except Exception:  # noqa: BLE001 - an older checkpoint's spec this version cannot read: compare as written
        return _differences(meta.get("architecture", {}), architecture(spec), "", ())
    return _resolved_differences(old, spec)


def compare(meta: dict, spec, path, options=None) -> list[str]:
    """Refuse (``MoedslError``) a checkpoint whose weights' shapes or meaning differ from
    ``spec``'s (``training_only``), naming the first difference; otherwise return one note
    naming each training-only change (``path old -> new``), and each changed run option of
    ``TRAJECTORY`` when ``options`` (the run's options) is given and the checkpoint recorded them."""
    diffs, seen = [], set()
    for d in _spec_differences(meta, spec):  # a repeated block: one difference for its copies
        if (d[0], repr(d[2]), repr(d[3])) not in seen:
            seen.add((d[0], repr(d[2]), repr(d[3])))
            diffs.append(d)
    refused = [d for d in diffs if not training_only(d[1], d[2], d[3], d[4])]
    if refused:
        where, _, old, new, _ = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"checkpoint {path} was saved from spec {meta.get('spec')!r}, whose architecture differs "
                          f"from {spec.name!r}: {where}: {old!r} in the checkpoint, {new!r} in the spec{more}")
    changes = [f"{where} {old!r} -> {new!r}" for where, _, old, new, _ in diffs]
    saved = meta.get("train") or {}
    for k in TRAJECTORY:
        if options is not None and k in saved and saved[k] != getattr(options, k, saved[k]):
            changes.append(f"{k} {saved[k]!r} -> {getattr(options, k)!r}")
    if not changes:
        return []
    return [f"resuming with training-only changes since {Path(path).name}: {', '.join(changes)}"]
