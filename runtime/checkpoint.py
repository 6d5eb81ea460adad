"""Checkpoints with torch.distributed.checkpoint: every rank writes its own experts.

Layout: ``DIR/step-00000200/`` (DCP shards + ``meta.json``) and ``DIR/latest`` naming the
newest complete one. A save goes to ``step-…​.tmp`` first and is renamed when every rank
has written and ``meta.json`` is in place; ``latest`` is replaced atomically after that,
so an interrupted save never touches the last good checkpoint.

Expert weights and their optimizer state are stored per global expert
(``model/layers.2.experts.w_in/e5``), so a checkpoint written by N expert-parallel ranks
loads on M ranks, or into one process: each rank asks for the experts it now holds.
A checkpoint whose architecture (``model`` and ``layers``) differs from the spec is refused
with the first difference named.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from moedsl.errors import MoedslError

KEEP = 3  # complete checkpoints kept


def architecture(spec) -> dict:
    """What a checkpoint's tensors depend on: the model and the layer stack."""
    return {"model": spec.data["model"], "layers": spec.data["layers"]}


def fingerprint(spec) -> str:
    return hashlib.sha256(json.dumps(architecture(spec), sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} in the checkpoint, {b!r} in the spec"


def _expert_slots(model) -> dict:
    """module name -> list of global expert ids of its slots."""
    return {name: mod.expert_ids.tolist() for name, mod in model.named_modules() if name.endswith(".experts")}


def state_dict(model, optimizer, extra: dict) -> dict:
    """The flat DCP state of this rank: replicated tensors under their names, experts per id;
    ``extra`` holds this rank's own tensors (RNG states) under ``extra/<key>``."""
    slots = _expert_slots(model)
    sd: dict = {}
    opt_state = optimizer.state if optimizer is not None else {}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        entries = [(f"{name}/e{e}", i) for i, e in enumerate(slots[owner])] if owner in slots else [(name, None)]
        st = opt_state.get(p, {})
        for key, slot in entries:
            sd[f"model/{key}"] = p.detach() if slot is None else p.detach()[slot]
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    sd[f"optim/{key}/{k}"] = v if slot is None else v[slot]
                elif torch.is_tensor(v):
                    sd[f"optim/{key}/{k}"] = v
    for name, b in model.named_buffers():
        if not name.endswith("expert_ids"):
            sd[f"model/{name}"] = b
    for k, v in extra.items():
        sd[f"extra/{k}"] = v
    return sd


def _prime_optimizer(model, optimizer) -> None:
    """AdamW makes its state lazily; make it now so a load has tensors to fill."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device) \
                    if group.get("capturable") or group.get("fused") else torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def save(directory: Path, step: int, model, optimizer, spec, extra: dict, rank: int, world: int) -> Path:
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f"step-{step:08d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier(world)
    sd = state_dict(model, optimizer, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, checkpoint_id=str(tmp))
    _barrier(world)
    if rank == 0:
        meta = {"step": step, "world": world, "spec": spec.name, "fingerprint": fingerprint(spec),
                "architecture": architecture(spec), "spec_data": spec.data, "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = directory / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / "latest")
        _prune(directory)
    _barrier(world)
    return final


def _prune(directory: Path) -> None:
    done = sorted(p for p in directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    directory = Path(directory)
    pointer = directory / "latest"
    if pointer.exists():
        path = directory / pointer.read_text().strip()
        if (path / "meta.json").exists():
            return path
    done = sorted(p for p in directory.glob("step-*") if (p / "meta.json").exists())
    return done[-1] if done else None


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise MoedslError(f"{path} is not a moedsl checkpoint (no readable meta.json: {e})") from None


def check_compatible(meta: dict, spec, path) -> None:
    if meta.get("fingerprint") != fingerprint(spec):
        where = _first_difference(meta.get("architecture", {}), architecture(spec))
        raise MoedslError(f"checkpoint {path} was saved from spec {meta.get('spec')!r}, whose architecture differs "
                          f"from {spec.name!r}: {where}")


def load(path: Path, model, optimizer, spec, extra: dict | None = None) -> dict:
    """Fill ``model`` (and ``optimizer``) from ``path``. ``extra``: this rank's tensors to restore
    if the checkpoint has them (a checkpoint from another world size has other ranks').
    Returns the meta data (``step``, ``world``, ...) with the restored ``extra`` keys."""
    meta = read_meta(path)
    check_compatible(meta, spec, path)
    if optimizer is not None:
        _prime_optimizer(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp

        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        wanted = {k: v for k, v in (extra or {}).items() if f"extra/{k}" in saved}
        sd = state_dict(model, optimizer, wanted)
        missing = [k for k in sd if k not in saved]
        if missing:
            raise MoedslError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[0]}")
        try:
            dcp.load(sd, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - DCP raises assorted errors for unreadable files
            raise MoedslError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:300]}") from None
    meta["extra"] = {k: sd[f"extra/{k}"] for k in wanted}
    return meta


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
