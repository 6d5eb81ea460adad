"""Folders a command writes: checked against the paths it reads, and swapped into place whole
(no torch here: ``moedsl data prepare`` runs without it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

HF_CONFIG = "hf_config.json"  # what `moedsl import` keeps of a Hugging Face checkpoint's config.json


def side_file(folders: Iterable, name: str) -> Optional[Path]:
    """The first ``name`` in ``folders`` (an import folder, a checkpoint, the run folder above it;
    None entries skipped), or None."""
    for folder in folders:
        if folder is not None and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def apart(out: Path, sources: Iterable, option: str = "--out") -> None:
    """Refuse an ``out`` that is one of ``sources`` (None entries skipped) or lies inside or above
    one: ``staged`` replaces ``out`` whole, which would delete the source being read. Every
    command with a source and an ``--out`` calls this before writing."""
    here = Path(out).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if here == src:
            where = "is"
        elif src in here.parents:
            where = "lies inside"
        elif here in src.parents:
            where = "holds"
        else:
            continue
        raise UserError(f"{option} {out} {where} the source {source}: give an {option} apart from it (writing "
                        f"{out} would {'write into' if where == 'lies inside' else 'delete'} the source)")


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``out``; an existing ``out`` is moved aside first
    and removed after, or put back whole when the rename fails."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # the old out comes back whole
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
