"""Choosing what ``--resume`` loads: the last saved checkpoint that is whole, or the one named.

Rank 0 decides which checkpoints to try (``problem``: whole from their files alone) and every
rank follows, so all load the same one; a broken one skipped is named once, as is a partial save
removed and each training-only change (``ckpt_compat.compare``). A checkpoint that reads as whole
but fails to load is skipped too, when none was named.
"""
from __future__ import annotations

from pathlib import Path

from moedsl.errors import MoedslError, UserError

from .ckpt_format import BrokenCheckpoint, load, problem
from .ckpt_storage import agree, newest_first, remove_partial_saves


def resume(directory: Path, choice, model, optimizer, spec, extra: dict | None = None, rank: int = 0,
           world: int = 1, options=None) -> dict:
    """Fill ``model`` and ``optimizer`` for ``--resume``: ``choice`` is True (the newest whole
    checkpoint under ``directory``) or a path (that one, no other). Returns ``load``'s meta
    data with ``path`` and ``notes``: lines to show once (a broken checkpoint skipped, a
    partial save removed, training-only changes). Rank 0 decides which checkpoints to try and
    every rank follows, so all load the same one."""
    plan = _resume_plan(Path(directory), choice) if rank == 0 else None
    paths, notes, error = agree(plan, rank, world)
    if error:  # a user's mistake (nothing there, a named one not whole), or every one broken
        raise error
    broken = list(notes.pop("broken"))
    notes = notes["removed"]
    for path in paths:
        try:
            meta = load(path, model, optimizer, spec, extra, options=options)
        except BrokenCheckpoint as e:
            if choice is not True:
                raise UserError(f"--resume {path}: {e.reason}") from None
            broken.append((path, e.reason))
            continue
        if broken:
            names = "; ".join(f"checkpoint {p.name} is broken: {why}" for p, why in broken)
            notes.append(f"{names}; resuming from {path.name} instead")
        meta["path"] = path
        meta["notes"] = notes + meta["notes"]
        return meta
    raise MoedslError(f"--resume: no checkpoint under {directory} can be loaded: {_tried(broken)}")


def _tried(broken: list) -> str:
    return "; ".join(f"{p.name}: {why}" for p, why in broken)


def _resume_plan(directory: Path, choice) -> tuple:
    """Rank 0: (checkpoints to try in order, {"removed": notes, "broken": [(path, why)]}, the error to
    raise on every rank or None)."""
    if choice is not True:
        path = Path(choice)
        why = problem(path)
        if why is not None:
            return [], {}, UserError(f"--resume {path}: {why}")
        return [path], {"removed": [], "broken": []}, None
    removed = remove_partial_saves(directory) if directory.is_dir() else []
    found = newest_first(directory) if directory.is_dir() else []
    if not found:
        return [], {}, UserError(f"--resume: no checkpoint under {directory}")
    good, broken = [], []
    for path in found:
        why = problem(path)
        if why is None:
            good.append(path)
        elif not good:
            broken.append((path, why))
    if not good:
        return [], {}, MoedslError(f"--resume: no checkpoint under {directory} can be loaded: {_tried(broken)}")
    return good, {"removed": removed, "broken": broken}, None
