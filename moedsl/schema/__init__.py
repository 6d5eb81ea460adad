"""The JSON Schema of a spec (one JSON file, the single source of truth for its shape),
and the translation of schema violations into messages a person can act on."""
from __future__ import annotations

import difflib
import functools
import json
import math
import re
from importlib import resources
from typing import Any, Iterator

from ..errors import Issue, format_path

SCHEMA_FILE = "moedsl.schema.json"


@functools.cache
def schema_text() -> str:
    return resources.files(__name__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


@functools.cache
def schema() -> dict:
    return json.loads(schema_text())


@functools.cache
def _validator():
    import jsonschema

    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema())
    return cls(schema())


def __getattr__(name: str):
    if name == "LAYER_KINDS":  # the kinds the schema admits, read from it (its `layer_kinds` enum)
        return layer_kinds()
    raise AttributeError(name)


@functools.cache
def layer_kinds() -> tuple:
    return tuple(schema()["$defs"]["layer_kinds"]["enum"])


@functools.cache
def _defaults(name: str) -> tuple:
    found: dict = {}
    stack = [schema()["$defs"][name]]
    while stack:
        s = stack.pop()
        for key, sub in s.get("properties", {}).items():
            if isinstance(sub, dict) and "default" in sub:
                found.setdefault(key, sub["default"])
        if "$ref" in s:
            stack.append(schema()["$defs"][s["$ref"].rsplit("/", 1)[-1]])
        stack += s.get("allOf", [])
    return tuple(found.items())


def defaults(name: str) -> dict:
    """The ``default`` annotations of definition ``name``'s properties, through ``$ref`` (a
    sublayer's ``residual`` and ``prenorm``): the one place a default is written. The typed
    spec's dataclasses take their defaults from here."""
    return dict(_defaults(name))


def _resolve(sub: Any) -> Any:
    """Follow a local ``$ref`` (``#/$defs/name``)."""
    while isinstance(sub, dict) and "$ref" in sub and len(sub) == 1:
        sub = schema()["$defs"][sub["$ref"].rsplit("/", 1)[-1]]
    return sub


def allowed_keys(sub: dict) -> list[str]:
    """The property names an object schema admits, through ``$ref`` and ``allOf``."""
    keys: list[str] = []
    stack = [sub]
    while stack:
        s = stack.pop()
        if not isinstance(s, dict):
            continue
        keys += [k for k in s.get("properties", {}) if k not in keys]
        if "$ref" in s:
            stack.append(schema()["$defs"][s["$ref"].rsplit("/", 1)[-1]])
        stack += s.get("allOf", [])
    return keys


@functools.cache
def _key_homes() -> dict[str, list[str]]:
    """For each property name, the definitions that admit it (to say where a misplaced key belongs)."""
    homes: dict[str, list[str]] = {}
    for name, sub in schema()["$defs"].items():
        for k in sub.get("properties", {}) if isinstance(sub, dict) else ():
            homes.setdefault(k, []).append(name)
    return homes


# names other MoE code bases use for our keys
SYNONYMS = {"learning_rate": "lr", "top_k": "k", "topk": "k", "num_experts": "count", "n_experts": "count",
            "num_experts_per_tok": "k", "experts_per_token": "k", "d_ff": "hidden", "ffn_dim": "hidden",
            "hidden_size": "d_model", "dim": "d_model", "n_heads": "heads", "num_heads": "heads",
            "num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "n_kv_heads": "kv_heads",
            "vocab": "vocab_size", "seq_len": "max_seq_len", "batch": "batch_size", "iters": "steps",
            "capacity": "capacity_factor", "aux_loss": "balance", "router_z_loss": "z_loss",
            "num_layers": "repeat", "n_layers": "repeat", "router_jitter": "jitter", "act": "activation"}


def did_you_mean(word: str, choices) -> str | None:
    choices = [str(c) for c in choices]
    if SYNONYMS.get(str(word)) in choices:
        return f"did you mean {SYNONYMS[str(word)]!r}?"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "nothing (null)"}


def _what(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, float):
        return f"number {value!r}"
    return f"{type(value).__name__} {value!r}"


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def check(data: Any, located) -> list[Issue]:
    """Validate ``data`` against the schema; every violation becomes one Issue with its place."""
    issues: dict[tuple, Issue] = {}
    for err in _validator().iter_errors(data):
        for issue in _translate(err, located):
            issues.setdefault((issue.path, issue.message), issue)
    return list(issues.values())


def _translate(err, located) -> Iterator[Issue]:
    path = tuple(err.absolute_path)
    inst = err.instance
    kw = err.validator
    sub = err.schema if isinstance(err.schema, dict) else {}

    if kw in ("additionalProperties", "unevaluatedProperties"):
        allowed = allowed_keys(sub)
        for key in inst:
            if key in allowed:
                continue
            if key == "cycle" and path and path[0] == "layers" and len(path) == 2:
                yield located.issue(path + (key,), "'cycle' only works inside a repeat block's 'block' list",
                                    key=True)
                continue
            hint = did_you_mean(key, allowed)
            if hint is None:
                homes = [h for h in _key_homes().get(key, []) if h not in ("layer", "block_layer")]
                if homes:
                    hint = f"{key!r} is an option of {', '.join(homes)}; here: {_choices(allowed)}"
                else:
                    hint = f"expected one of: {_choices(allowed)}"
            yield located.issue(path + (key,), f"unknown key {key!r}", hint, key=True)
        return
    if kw == "required":
        for key in err.validator_value:
            if isinstance(inst, dict) and key not in inst:
                desc = _resolve(sub.get("properties", {}).get(key, {}))
                hint = desc.get("description") if isinstance(desc, dict) else None
                yield located.issue(path, f"missing required key {key!r}", hint, key=True)
        return
    if kw == "type":
        want = err.validator_value
        want = [want] if isinstance(want, str) else want
        wanted = " or ".join(_TYPE_NAMES.get(w, w) for w in want)
        yield located.issue(path, f"expected {wanted}, got {_what(inst)}")
        return
    if kw == "enum":
        hint = did_you_mean(inst, err.validator_value) if isinstance(inst, str) else None
        yield located.issue(path, f"{inst!r} is not one of: {_choices(err.validator_value)}", hint)
        return
    if kw == "const":
        if path == ("moedsl",):
            yield located.issue(path, f"unsupported spec version {inst!r}: this moedsl reads version "
                                f"{err.validator_value}")
        else:
            why = sub.get("description")
            name = format_path(path[-1:]) if path else "value"
            yield located.issue(path, f"{name} must be {err.validator_value!r}, got {inst!r}", why)
        return
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if kw in bounds:
        if isinstance(inst, float) and not math.isfinite(inst):
            yield located.issue(path, f"must be a finite number, got {inst!r}")
            return
        yield located.issue(path, f"must be {bounds[kw]} {err.validator_value}, got {inst!r}")
        return
    if kw == "minItems":
        yield located.issue(path, f"needs at least {err.validator_value} item(s), got {len(inst)}")
        return
    if kw == "uniqueItems":
        yield located.issue(path, "lists a rank more than once (each replica goes on a different rank)")
        return
    if kw == "maxLength":
        yield located.issue(path, f"is longer than {err.validator_value} characters")
        return
    if kw == "minLength":
        yield located.issue(path, "must not be empty")
        return
    if kw == "pattern":
        if path == ("name",):
            yield located.issue(path, f"{inst!r} is not a valid name",
                                "use letters, digits, '.', '_' and '-', starting with a letter or digit")
        else:
            yield located.issue(path, f"{inst!r} does not match {err.validator_value}")
        return
    if kw == "propertyNames":
        bad = [k for k in inst if not re.match(err.validator_value.get("pattern", ".*"), k)]
        for key in bad:
            yield located.issue(path + (key,), f"{key!r} is not an index (0, 1, 2, ...)", key=True)
        return
    if kw == "oneOf":
        yield from _one_of(err, path, inst, located)
        return
    yield located.issue(path, err.message)  # pragma: no cover - a keyword the schema does not use


def _one_of(err, path, inst, located) -> Iterator[Issue]:
    branches = err.validator_value
    # a layer item: exactly one kind key, or repeat + block, or cycle
    if isinstance(inst, dict) and any("required" in b and b["required"][0] in layer_kinds() for b in branches):
        kinds = [k for k in inst if k in layer_kinds()]
        structural = [k for k in ("repeat", "block", "cycle") if k in inst]
        if len(kinds) > 1:
            yield located.issue(path, f"a layer has exactly one kind, this one has {len(kinds)}: "
                                f"{', '.join(kinds)}", "write each as its own list item")
        elif kinds and structural:
            yield located.issue(path, f"a layer cannot be both {kinds[0]!r} and {structural[0]!r}")
        elif "repeat" in inst and "block" not in inst:
            yield located.issue(path, "'repeat' needs a 'block': the list of layers to repeat")
        elif "block" in inst and "repeat" not in inst:
            yield located.issue(path, "'block' needs 'repeat: N': how many times to repeat it")
        elif "cycle" in inst and ("repeat" in inst or "block" in inst):
            yield located.issue(path, "'cycle' is a layer of its own inside a block, not part of a repeat")
        elif not inst:
            yield located.issue(path, f"empty layer: expected one of {_choices(layer_kinds())}, or a repeat block")
        # else: only unknown keys; additionalProperties reports them
        return
    if isinstance(inst, dict) and {"gate", "hierarchy"} <= {k for b in branches for k in b.get("required", [])}:
        if "gate" in inst and "hierarchy" in inst:
            yield located.issue(path, "a moe layer has a 'gate' or a 'hierarchy' of gates, not both", key=True)
        else:
            yield located.issue(path, "missing required key 'gate' (or 'hierarchy' for a hierarchical MoE)",
                                key=True)
        return
    # a count or a named value (routing_groups: N or sequence): an integer's own bound, or both choices
    named = [b["const"] for b in branches if "const" in b]
    if named:
        if isinstance(inst, int) and not isinstance(inst, bool):
            for sub in err.context:
                if sub.relative_schema_path and sub.relative_schema_path[0] == 0:
                    yield from _translate(sub, located)
            return
        yield located.issue(path, f"expected a positive integer or {_choices(named)}, got {_what(inst)}")
        return
    # a rank list in an expert map: say what is wrong inside the list
    if isinstance(inst, list):
        for sub in err.context:
            if sub.relative_schema_path and sub.relative_schema_path[0] == 1:
                yield from _translate(sub, located)
        return
    yield located.issue(path, f"expected a rank (an integer >= 0) or a list of distinct ranks, got {_what(inst)}")
