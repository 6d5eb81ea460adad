"""moedsl-format weights (an import folder: ``spec.yaml`` and safetensors in moedsl's names,
experts stacked [E, ...]) into a model: each rank reads only the experts it holds, one tensor
at a time through a fresh memory map (``Checkpoint.get_expert``: safetensors'
``safe_open(...).get_slice``), and every shape is checked against the spec first, naming the
spec's field and line where the weights no longer fit (an edited expert count, a hidden size).
``moedsl.runtime.load`` is the loader that calls it (``load_model``, ``run --init``, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moedsl.compiler import compile_graph
from moedsl.errors import UserError, format_path

from .files import Checkpoint


def global_shapes(spec) -> dict:
    """name -> shape of every parameter of the whole model (one process holds every expert),
    built on the meta device."""
    gm = compile_graph(spec, 0, 1, device="meta", init=False, verify_ranks=False).module
    return {k: tuple(p.shape) for k, p in stored_tensors(gm)}


def stored_tensors(model):
    """(name, tensor) of what a checkpoint holds: the parameters, and the gates' choice bias
    (``expert_bias``, a buffer: DeepSeek-V3's ``e_score_correction_bias``)."""
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if n.endswith(".expert_bias"))


def _field(spec, name: str, dim: int) -> tuple:
    """The spec's field that sets dimension ``dim`` of the moedsl tensor ``name``."""
    parts = name.split(".")
    model = ("model", "vocab_size") if dim == 0 else ("model", "d_model")
    if parts[0] in ("embedding", "head"):
        return model
    if parts[0] != "layers":
        return ("model", "d_model")
    layer = spec.layers[int(parts[1])]
    base = tuple(layer.path) + (layer.kind,)
    what = parts[2]
    if what == "norm":
        return ("model", "d_model")
    if what == "attention":
        if parts[3] in ("wk", "wv") and dim == 0:
            return base + ("kv_heads",)
        return base + ("heads",) if dim == 0 and parts[3] == "wq" else ("model", "d_model")
    if what == "gate":
        return base + ("experts", "count") if dim == 0 else ("model", "d_model")
    if what in ("experts", "shared"):
        if dim == 0 and what == "experts":
            return base + ("experts", "count")
        hidden_dim = 2 if parts[3] in ("w_in", "w_gate") else 1
        return base + ("experts", "hidden") if dim == hidden_dim else ("model", "d_model")
    return base


def field_note(spec, name: str, dim: int, text: Optional[str] = None) -> str:
    """``spec.yaml:30: layers[1].block[1].moe.experts.count = 8``; given the spec's ``text``, with
    the line's own comment (an imported spec's names the config.json field it came from)."""
    path = _field(spec, name, dim)
    value = _value(spec.data, path)
    line = spec.located.where(path)[0] if spec.located is not None else None
    where = f"{spec.source}:{line}" if line else spec.source
    note = f"{where}: {format_path(path)}"
    if value is not None:
        note += f" = {value}"
    if text is not None and line:
        comment = text.splitlines()[line - 1].partition("#")[2].strip()
        if comment:
            note += f", from {comment}"
    return note


def _value(data, path):
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data if not isinstance(data, (dict, list)) else None


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def mismatch(spec, name: str, have, want, text: Optional[str] = None) -> Optional[str]:
    """None when ``have`` == ``want``, else both shapes and the spec field setting the first
    dimension that differs."""
    have, want = tuple(have), tuple(want)
    if have == want:
        return None
    dim = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), 0)
    return f"{_fmt(have)} in the weights, {_fmt(want)} by the spec ({field_note(spec, name, dim, text)})"


def problems(spec, folder: Path, ck: Optional[Checkpoint] = None) -> list:
    """Every tensor of ``folder`` that does not fit ``spec`` (shape, missing, extra), one line
    each; reads only the files' headers."""
    ck = ck or Checkpoint(folder)
    want = global_shapes(spec)
    found: dict = {}  # the cause (a spec field) -> its lines: one line per cause, counting the tensors
    for name, shape in want.items():
        if name not in ck.names:
            if name.endswith(".expert_bias"):  # a choice bias the checkpoint lacks starts at zero
                continue
            found.setdefault(("missing", name), []).append(f"{folder}: no tensor {name}, which the spec needs")
            continue
        why = mismatch(spec, name, ck.shape(name), shape)
        if why:
            found.setdefault(why[why.index("("):], []).append(
                f"{ck.file_of(name)}: {name} is {why}: the weights no longer fit the spec")
    for name in sorted(ck.names - set(want)):
        found.setdefault(("extra", name), []).append(f"{ck.file_of(name)}: {name} has no place in the spec")
    return [lines[0] + (f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else "")
            for lines in found.values()]


def load_weights(model, folder: Path, spec) -> None:
    """Fill ``model`` (one rank's share: its ``experts.expert_ids``) from the moedsl-format
    safetensors in ``folder``; refuse (``UserError``) weights that do not fit ``spec``."""
    ck = Checkpoint(folder)
    found = problems(spec, folder, ck)
    if found:
        more = f"; and {len(found) - 1} more problems" if len(found) > 1 else ""
        raise UserError(found[0] + more)
    slots = {n: m.expert_ids.tolist() for n, m in model.named_modules() if n.endswith(".experts")}
    with torch.no_grad():
        for name, p in stored_tensors(model):
            owner = name.rsplit(".", 1)[0]
            if owner in slots:
                for i, e in enumerate(slots[owner]):  # only the experts this rank holds
                    p[i].copy_(ck.get_expert(name, e))
            elif name in ck.names:
                p.copy_(ck.get(name))
            else:  # an expert_bias the checkpoint lacks (``problems`` lets only those through)
                p.zero_()
