"""Checkpoints on disk: atomic saves, why a save failed, and which saved checkpoint is newest.

Layout: ``DIR/step-00000200/`` (``ckpt_format``: DCP shards + ``meta.json``) and ``DIR/latest``
naming the last one saved. A save goes to ``step-….tmp`` first and is renamed when every rank
has written and ``meta.json`` is in place; ``latest`` is replaced atomically after that, so an
interrupted save never touches the last good checkpoint. A save that fails (a full disk, an
I/O error) removes its ``.tmp`` folder and stops the run with one line naming the cause
(``save``); a ``.tmp`` folder left by a killed run is removed by the next save or resume.

Which checkpoint is newest is read from the checkpoints themselves (the save time in each
``meta.json``), never from ``latest``: a process killed between a rename and the update of
``latest`` leaves the pointer naming the one before, and a run resumed from an earlier
checkpoint rewrites a step that a later one already had. ``latest`` is written for people
and other tools; nothing here reads it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from moedsl.compiler.plan import human_bytes
from moedsl.errors import MoedslError

from .ckpt_format import make_meta, problem, state_dict

KEEP = 3  # complete checkpoints kept


def save(directory: Path, step: int, model, optimizer, spec, extra: dict, rank: int, world: int,
         options=None, more: dict | None = None) -> Path:
    """Write step ``step`` to ``directory/step-…`` (every rank its own part); ``options``: the
    run's options, their ``ckpt_compat.TRAJECTORY`` fields kept so a resume can name what changed;
    ``more``: rank 0's further ``meta.json`` keys (``ckpt_format.make_meta``).

    A save that fails on any rank (``OSError``: a full disk, a quota, an I/O error; or DCP's
    own errors) removes its ``.tmp`` folder, leaves ``latest`` and the checkpoints as they
    were, and raises one ``MoedslError`` on every rank naming the cause and the last good one.
    """
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f"step-{step:08d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for note in remove_partial_saves(directory):
            print(f"moedsl: {note}", file=sys.stderr, flush=True)
    barrier(world)
    sd = state_dict(model, optimizer, extra)
    failure = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        try:  # DCP gathers every rank's failure: all ranks see the same outcome
            dcp.save(sd, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
            failure = e
    reasons = None
    if failure is not None:  # every rank tells why, from its own disk: a rank's full disk may be its own
        reasons = gather(failure_reason(failure, tmp), world)
    message = None
    if rank == 0:
        if failure is None:
            try:
                _finish(directory, tmp, final, step, spec, world, options, more)
            except Exception as e:  # noqa: BLE001 - meta.json or the rename failed: the save did not happen
                reasons = [failure_reason(e, tmp)]
        if reasons:
            message = _not_saved(directory, tmp, final, reasons, _nbytes(sd) * world)
    message = agree(message, rank, world)
    # a barrier last, as the save ended before the broadcast above was added: without it, a
    # 4-step `--nproc 4` run of the switch example aborted at exit in 3 of 10 tries ("terminate
    # called without an active exception" in a rank other than 0); with it, 0 of 20
    barrier(world)
    if message:
        raise MoedslError(message)
    return final


def _finish(directory: Path, tmp: Path, final: Path, step: int, spec, world: int, options, more=None) -> None:
    """Rank 0, once every shard is written: ``meta.json``, the rename, ``latest``, pruning."""
    (tmp / "meta.json").write_text(json.dumps(make_meta(step, world, spec, options, more), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / "latest.tmp"
    try:
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / "latest")
    except OSError:  # the checkpoint is whole, and found by its save time (``newest_first``) without a pointer
        for stale in (pointer, directory / "latest"):
            stale.unlink(missing_ok=True)
    _prune(directory)


def _nbytes(sd: dict) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if torch.is_tensor(v))


def _not_saved(directory: Path, tmp: Path, final: Path, reasons: list, estimate: int) -> str:
    """Remove the partial save; the one line saying why it failed (a full disk first, if any
    rank's was) and what is left."""
    reason, full = next((r for r in reasons if r[1]), reasons[0])
    shutil.rmtree(tmp, ignore_errors=True)
    (directory / "latest.tmp").unlink(missing_ok=True)
    good = newest_whole(directory)
    text = f"checkpoint {final.name} not saved: {reason}"
    if full:
        needed = _size(good) if good is not None else estimate
        free = free_space(directory)
        text += f" (it needs about {human_bytes(needed)}"
        text += f", {human_bytes(free)} free in {directory})" if free is not None else ")"
    if tmp.exists():
        text += f"; its partial save {tmp} could not be removed"
    text += f"; the last good checkpoint is {good}" if good is not None else "; there is no earlier checkpoint"
    return text


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def failure_reason(failure: BaseException, tmp: Path) -> tuple[str, bool]:
    """(why, whether the disk is full) for a failed save. torch.save turns a failed write into
    ``RuntimeError: ... unexpected pos``, losing the errno; then a 1 MB probe written where the
    shards went, through DCP's own file layer, tells a full disk or quota from other failures."""
    oserror = _oserror(failure) or _probe(tmp)
    if oserror is not None:
        if oserror.errno in _FULL:
            return _FULL[oserror.errno], True
        name = errno.errorcode.get(oserror.errno, oserror.errno)
        return f"{os.strerror(oserror.errno).lower()} (errno {name})", False
    inner = failure
    failures = getattr(failure, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))[0]
    first = (str(inner).strip().splitlines() or [""])[0][:300]
    return f"{type(inner).__name__}: {first}", False


def _oserror(failure: BaseException):
    """The first OSError with an errno in ``failure``, its causes and DCP's per-rank failures."""
    todo, seen = [failure], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]
        todo += [e.__cause__, e.__context__]
    return None


def _probe(tmp: Path, size: int = 1 << 20):
    """The OSError writing ``size`` bytes into ``tmp`` raises, or None if it fits."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    probe = tmp / f"space-probe-{os.getpid()}"  # one per rank
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with FileSystem().create_stream(probe, "wb") as stream:
            stream.write(bytes(size))
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as e:
        return e if e.errno is not None else None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def free_space(directory: Path):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def remove_partial_saves(directory: Path) -> list[str]:
    """Remove ``step-….tmp`` folders (saves a killed run left half-written); a note for each."""
    notes = []
    for tmp in sorted(Path(directory).glob("step-*.tmp")):
        if tmp.is_dir():
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
            notes.append(f"removed {tmp.name}, a save that did not finish ({human_bytes(size)})")
    return notes


def _prune(directory: Path) -> None:
    """Keep the ``KEEP`` checkpoints saved last."""
    for old in newest_first(directory)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def newest_first(directory: Path) -> list[Path]:
    """The saved (renamed) checkpoint folders under ``directory``, the last saved first: by the
    save time their ``meta.json`` records (a folder without a readable one: its modification
    time), then by step."""
    directory = Path(directory)
    done = [p for p in directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: (_saved_at(p), _step(p)), reverse=True)


def _saved_at(path: Path) -> float:
    try:
        meta = json.loads((path / "meta.json").read_text())
        return float(meta["time"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return path.stat().st_mtime
        except OSError:
            return float("-inf")


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest(directory: Path) -> Path | None:
    """The last saved checkpoint under ``directory`` with a ``meta.json`` (not checked whole:
    ``newest_whole``), or None."""
    return next((p for p in newest_first(directory) if (p / "meta.json").exists()), None)


def newest_whole(directory: Path) -> Path | None:
    """The last saved checkpoint under ``directory`` that ``problem`` finds nothing wrong with."""
    return next((p for p in newest_first(directory) if problem(p) is None), None) if Path(directory).is_dir() else None


def gather(value, world: int) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world > 1 and dist.is_initialized():
        out = [None] * world
        dist.all_gather_object(out, value)
        return out
    return [value]


def agree(value, rank: int, world: int):
    """Rank 0's ``value`` on every rank."""
    if world > 1 and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def barrier(world: int) -> None:
    """Every rank waits here for the others."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
