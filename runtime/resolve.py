"""What a path is and which weights it holds: the one answer ``load_model``, ``moedsl run
--init``, ``eval``, ``export``, ``generate`` and ``inspect`` all start from.

A model is named by ``src`` alone, or by a spec and ``checkpoint`` (its weights):

* an import folder (``moedsl import``'s ``--out``: ``spec.yaml`` and safetensors in moedsl's
  names), or its ``spec.yaml``: those weights, that spec;
* a checkpoint folder (``meta.json`` in it): that checkpoint, the spec stored with it;
* a ``moedsl run`` output folder, or its ``checkpoints/`` folder: its newest whole checkpoint
  (``ckpt_storage.newest_whole``: the last saved, whatever ``latest`` names);
* a spec (a path, YAML text, a dict, a ``Spec``) with ``checkpoint``: any of the above, the
  spec as given (a checkpoint's stored spec is compared with it when it loads).

A checkpoint is checked whole and of a format this moedsl reads here, before anything is
built; every path that is none of these is refused in one line naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from moedsl.errors import UserError
from moedsl.paths import HF_CONFIG
from moedsl.spec_loader import looks_like_path, load_spec

from .ckpt_format import problem, read_meta
from .ckpt_storage import newest_whole

SIDE_MARKS = ("tokenizer.json", HF_CONFIG)  # the side files that make a folder the model's origin
IMPORT = "import"  # safetensors in moedsl's names (moedsl/hf/weights.py reads them)
DCP = "dcp"  # a moedsl checkpoint (runtime/ckpt_format.py reads it)


@dataclass(frozen=True)
class ModelSource:
    """A model's spec and where its weights are."""

    spec: object  # the Spec the model is built from
    kind: str  # IMPORT or DCP
    path: Path  # the import folder or the checkpoint folder
    run: Optional[Path] = None  # the folder ``src`` named when it holds a checkpoint (a run, ...), else None
    meta: dict = field(default_factory=dict)  # a checkpoint's meta.json ({} for an import)
    folders: tuple = ()  # where side files may be (tokenizer.json, hf_config.json), nearest first

    @property
    def origin(self) -> Optional[Path]:
        """What a run of these weights would have as ``--init``, for the data checks and sources
        (``runtime.data``): the nearest of ``folders`` holding a tokenizer.json or a Hugging Face
        config (an import, or the run folder a run from one copied them to), else None."""
        return next((Path(f) for f in self.folders if any((Path(f) / n).is_file() for n in SIDE_MARKS)), None)


def is_import_dir(path) -> bool:
    """Whether ``path`` is an import folder: ``spec.yaml`` and safetensors beside it."""
    path = Path(path)
    return (path / "spec.yaml").is_file() and any(path.glob("*.safetensors"))


def _is_spec_file(src) -> bool:
    return isinstance(src, (str, os.PathLike)) and str(src).endswith((".yaml", ".yml", ".json"))


def resolve(src, checkpoint=None) -> ModelSource:
    """The ``ModelSource`` of ``src`` (with ``checkpoint``: the spec ``src`` and those weights);
    see the module docstring. Raises ``UserError`` naming the path for anything else."""
    path = Path(str(src)) if isinstance(src, (str, os.PathLike)) and "\n" not in str(src) else None
    as_dir = path is not None and path.is_dir()
    if path is not None and not as_dir and not path.exists() and (checkpoint is None or looks_like_path(str(src))):
        raise UserError(f"{src}: no such file or folder")
    if checkpoint is not None:
        spec = load_spec(path / "spec.yaml" if as_dir else src)
        found = _weights(Path(checkpoint), f"checkpoint {checkpoint}: neither an import folder nor a moedsl "
                                            "checkpoint, run or checkpoints folder")
        return _source(spec, found, [path] if as_dir else [])
    if not as_dir:
        if path is not None and _is_spec_file(src) and is_import_dir(path.parent):
            return _source(load_spec(path), (IMPORT, path.parent), [])
        where = f"{src}: " if path is not None else ""  # a Spec, a dict or YAML text: not printed whole
        raise UserError(f"{where}a spec needs a checkpoint (--checkpoint, or checkpoint=): an import folder, a run "
                        "or a checkpoint")
    kind, where = _weights(path, f"{path}: no checkpoint under it or its checkpoints/, and not an import "
                                      "folder (spec.yaml and *.safetensors)")
    if kind == IMPORT:
        spec = load_spec(where / "spec.yaml")
    else:
        spec = load_spec(read_meta(where)["spec_data"], source=str(where / "meta.json"))
    return _source(spec, (kind, where), [path], run=path if kind == DCP else None)


def _weights(path: Path, nothing: str) -> tuple:
    """(kind, folder) of the weights at ``path``; ``nothing``: the error when there are none."""
    if is_import_dir(path):
        return IMPORT, path
    if (path / "meta.json").is_file():
        why = problem(path)
        if why is not None:
            raise UserError(f"checkpoint {path}: {why}")
        return DCP, path
    for d in (path / "checkpoints", path):
        if d.is_dir() and any(d.glob("step-*")):
            found = newest_whole(d)
            if found is None:
                raise UserError(f"{path}: no checkpoint under {d} can be loaded (each is broken or incomplete)")
            return DCP, found
    raise UserError(nothing)


def _source(spec, found: tuple, given: list, run: Optional[Path] = None) -> ModelSource:
    kind, where = found
    meta = read_meta(where) if kind == DCP else {}
    folders = [*given, where]
    if kind == DCP and where.parent.name == "checkpoints":
        folders.append(where.parent.parent)  # the run folder: `run --init` copies an import's side files there
    spec_file = Path(spec.source).parent if spec.source and Path(spec.source).is_file() else None
    folders += [spec_file] if spec_file is not None else []
    return ModelSource(spec=spec, kind=kind, path=where, run=run, meta=meta,
                       folders=tuple(dict.fromkeys(folders)))
