"""The checkpoint format: what a checkpoint folder holds, which versions this moedsl reads,
and reading one back into a model.

A checkpoint is a folder (``step-00000200/``) of torch.distributed.checkpoint (DCP) shards,
their ``.metadata``, and ``meta.json``: the format version (``format``), the step, the world
size that wrote it, the spec (name, fingerprint, architecture and its data), the save time,
and the run options that shape the trajectory (``ckpt_compat.TRAJECTORY``).

The DCP state is flat: ``model/<name>`` for a replicated tensor, ``model/<name>/e<id>`` for
one global expert of a stacked one (``model/layers.2.experts.w_in/e5``), ``optim/<key>/<state>``
for its optimizer state, and ``extra/<key>`` for one rank's own tensors (RNG states). Experts
are stored per global id, so a checkpoint written by N expert-parallel ranks loads on M ranks,
or into one process: each rank asks for the experts it now holds.

Versions: ``FORMAT`` is what ``save`` writes; a ``meta.json`` without ``format`` was written
before versions existed, in the layout of version 1, and is read as it is. Any other version
is refused by name (``read_meta``), before a tensor is read.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from moedsl.errors import MoedslError, UserError

from .ckpt_compat import TRAJECTORY, architecture, compare, fingerprint
from .optim import prime_optimizer

# What ``moedsl eval`` needs to evaluate a checkpoint as its run's own held-out evaluation did
# (meta.json "eval", with the spec's ``model.dtype``: the autocast it ran under; runtime/evaluate.py).
EVALUATION = ("batch", "seq", "eval_batches", "data", "seed", "pack")
FORMAT = 1  # the version ``meta.json`` records; bump it when the layout above changes
READS = (None, 1)  # the versions ``read_meta`` accepts (None: written before versions existed)


class BrokenCheckpoint(MoedslError):
    """A checkpoint whose files cannot be read back (truncated, missing, unreadable)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} is broken: {reason}")


def make_meta(step: int, world: int, spec, options=None, more: dict | None = None) -> dict:
    """The ``meta.json`` of a checkpoint of ``spec`` at ``step``, written by ``world`` ranks;
    ``options``: the run's options, their ``TRAJECTORY`` fields kept so a resume can name what changed;
    ``more``: further keys (``replication``: where a run's replicated experts sat, runtime/replicate.py),
    which readers that do not know them ignore."""
    meta = {"format": FORMAT, "step": step, "world": world, "spec": spec.name, "fingerprint": fingerprint(spec),
            "architecture": architecture(spec), "spec_data": spec.data, "time": time.time()}
    if options is not None:
        meta["train"] = {k: _plain(getattr(options, k)) for k in TRAJECTORY if hasattr(options, k)}
        meta["eval"] = {**{k: _plain(getattr(options, k)) for k in EVALUATION if hasattr(options, k)},
                        "dtype": spec.model.dtype}
    meta.update(more or {})
    return meta


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def read_meta(path: Path) -> dict:
    """The ``meta.json`` of the checkpoint at ``path``; a folder without a readable one, or one of
    a format version this moedsl does not read, is refused in one line (``UserError``)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a moedsl checkpoint (no readable meta.json: {e})") from None
    version = meta.get("format") if isinstance(meta, dict) else None
    if version not in READS:
        numbered = ", ".join(str(v) for v in READS if v is not None)
        raise UserError(f"checkpoint {path} has format version {version!r}; this moedsl reads format {numbered} "
                        "and checkpoints written before format versions (no \"format\" in meta.json)")
    return meta


def _expert_slots(model) -> dict:
    """module name -> list of global expert ids of its slots."""
    return {name: mod.expert_ids.tolist() for name, mod in model.named_modules() if name.endswith(".experts")}


def state_dict(model, optimizer, extra: dict) -> dict:
    """The flat DCP state of this rank: replicated tensors under their names, experts per id;
    ``extra`` holds this rank's own tensors (RNG states) under ``extra/<key>``."""
    slots = _expert_slots(model)
    sd: dict = {}
    opt_state = optimizer.state if optimizer is not None else {}
    sharded = hasattr(optimizer, "checkpoint_state")
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        entries = [(f"{name}/e{e}", i) for i, e in enumerate(slots[owner])] if owner in slots else [(name, None)]
        st = opt_state.get(p, {})
        for key, slot in entries:
            sd[f"model/{key}"] = p.detach() if slot is None else p.detach()[slot]
            if sharded:  # runtime/shard.py: this rank's rows of the slot's moments, as DTensors
                states = optimizer.checkpoint_state(p, slot)
            else:
                states = {k: v if slot is None or v.dim() == 0 else v[slot]
                          for k, v in st.items() if torch.is_tensor(v)}
            for k, v in states.items():
                sd[f"optim/{key}/{k}"] = v
    persistent = model.state_dict(keep_vars=True).keys()  # not the all-to-alls' send tables (non-persistent)
    for name, b in model.named_buffers():
        # not the placement's tables (which experts a rank holds, where its all-to-all sends each
        # slot): the run that loads rebuilds them for its own mesh, and a mesh without expert
        # parallelism has no all-to-all to hold them
        if not name.endswith("expert_ids") and name in persistent:
            sd[f"model/{name}"] = b
    for k, v in extra.items():
        sd[f"extra/{k}"] = v
    return sd


def problem(path: Path) -> str | None:
    """What makes the checkpoint at ``path`` unloadable, or None if it is whole: its
    ``meta.json`` and DCP ``.metadata`` read, and every shard file the metadata names holds
    the bytes it lists (a truncated or missing shard is found without loading anything)."""
    path = Path(path)
    if not path.is_dir():
        return "no such checkpoint folder"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "it has no meta.json"
    except (OSError, ValueError) as e:
        return f"its meta.json is unreadable ({str(e).splitlines()[0][:200]})"
    if not isinstance(meta, dict) or "step" not in meta:
        return "its meta.json names no step"
    if not (path / ".metadata").is_file():
        return "it has no DCP .metadata"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch.distributed.checkpoint as dcp

            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        ends: dict = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - a truncated pickle raises assorted errors
        return f"its DCP .metadata is unreadable ({type(e).__name__})"
    for name, end in sorted(ends.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return f"its shard {name} is missing"
        except OSError as e:
            return f"its shard {name} is unreadable ({e.strerror})"
        if size < end:
            return f"its shard {name} is truncated ({size:,} of {end:,} bytes)"
    return None


def load(path: Path, model, optimizer, spec, extra: dict | None = None, options=None) -> dict:
    """Fill ``model`` (and ``optimizer``) from ``path``. ``extra``: this rank's tensors to restore
    if the checkpoint has them with their shapes (a checkpoint from another world size has other ranks').
    Returns the meta data (``step``, ``world``, ...) with the restored ``extra`` keys and
    ``notes`` (``compare``'s). Raises ``BrokenCheckpoint`` if the files cannot be read back,
    having changed nothing: the tensors are read into new host tensors and copied over once all
    are read (the model's own tensors keep their storage, so captured CUDA graphs stay valid)."""
    path = Path(path)
    why = problem(path)
    if why is not None:
        if not (path / "meta.json").exists() and not (path / ".metadata").exists():
            read_meta(path)  # not a checkpoint at all: say so
        raise BrokenCheckpoint(path, why)
    meta = read_meta(path)
    meta["notes"] = compare(meta, spec, path, options)
    if optimizer is not None:
        prime_optimizer(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        # an extra tensor of another shape belongs to other settings (a load window of another
        # length): not this run's state, and left as it is
        wanted = {k: v for k, v in (extra or {}).items()
                  if f"extra/{k}" in saved and tuple(getattr(saved[f"extra/{k}"], "size", ())) == tuple(v.shape)}
        sd = state_dict(model, optimizer, wanted)
        missing = [k for k in sd if k not in saved]
        if missing:
            raise MoedslError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[0]}")
        # read into host memory first: a failed read changes nothing, and costs no device memory
        fresh = {k: torch.empty_like(v, device="cpu") if torch.is_tensor(v) else v for k, v in sd.items()}
        try:
            dcp.load(fresh, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises assorted errors for bad files
            raise BrokenCheckpoint(path, f"cannot read it back: {first_line(e)}") from None
    with torch.no_grad():
        for k, v in sd.items():
            if torch.is_tensor(v):
                v.copy_(fresh[k])
    meta["extra"] = {k: sd[f"extra/{k}"] for k in wanted}
    return meta


def first_line(e: BaseException) -> str:
    """``Type: the first line of the message`` of ``e`` (of DCP's first per-rank failure, if it gathered any)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
