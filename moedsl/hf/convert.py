"""``moedsl import`` and ``moedsl export``: a family's tensor map applied tensor by tensor.

Both plan every output tensor's shape first (the family's transform run on meta tensors, so
nothing is read), check it, then write safetensors one tensor at a time into a folder that
is renamed to ``--out`` only when complete (``files.staged``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from moedsl.dtypes import torch_dtype
from moedsl.errors import UserError
from moedsl.spec_loader import load_spec

from . import family, family_of_spec
from .files import HF_CONFIG, Checkpoint, apart, copy_side_files, nbytes, read_config, resolve, staged, torch_dtype_of, write_sharded
from .write_progress import Written
from .weights import global_shapes, mismatch

IMPORT_SHARD = 2 * 10**9  # moedsl's own files: shards of up to 2 GB


def _dtype(ck: Checkpoint, name: str):
    return torch_dtype_of(ck.headers[ck.where[name]][name]["dtype"])


def _spec_name(source: str) -> str:
    """The spec's name: a folder's name, or ORG-NAME for a model id of the cache."""
    base = Path(source).name if Path(source).exists() else source.replace("/", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "imported"


def import_checkpoint(source: str, out: Path, overwrite: bool = False, max_shard: int = IMPORT_SHARD,
                      progress: Optional[bool] = False) -> dict:
    """Write ``out/spec.yaml``, ``out/hf_config.json``, moedsl-format safetensors and the
    tokenizer files from the Hugging Face checkpoint ``source``. Returns a summary. ``progress``:
    tensors and bytes written on stdout, True always, None past ``progress.AUTO_BYTES`` (the CLI),
    False never."""
    folder = resolve(source)
    apart(out, [folder])
    config = read_config(folder)
    fam = family(config.get("model_type"))
    text = fam.spec_text(config, source, _spec_name(source))
    spec = load_spec(text, source="spec.yaml")
    ck = Checkpoint(folder)
    want = global_shapes(spec)
    plan, used = [], set()
    for t in fam.import_tensors(spec, config, ck.names):
        missing = [s for s in t.sources if s not in ck.names]
        if missing:
            raise UserError(f"{folder}: no tensor {missing[0]} in the checkpoint, which its config.json needs "
                            f"(for {t.name})")
        used.update(t.sources)
        metas = [torch.empty(ck.shape(s), dtype=_dtype(ck, s), device="meta") for s in t.sources]
        try:
            made = t.make(metas)
        except RuntimeError as e:  # per-expert tensors of different shapes cannot be stacked
            raise UserError(f"{folder}: the tensors {t.sources[0]}... do not fit together ({str(e)[:160]})") \
                from None
        why = mismatch(spec, t.name, made.shape, want[t.name], text)
        if why:
            src = next((s for s in t.sources if ck.shape(s) != ck.shape(t.sources[0])), t.sources[0])
            raise UserError(f"{ck.file_of(src)}: {src} is {_shape(ck.shape(src))}, which config.json does not "
                            f"fit: it makes {t.name} {why}")
        # the family's float32 tensors (a router transformers keeps float32) are float32 here whatever
        # the checkpoint holds: transformers widens them on load too
        dtype = torch.float32 if any(fam.keeps_float32(s) for s in t.sources) else made.dtype
        plan.append((t.name, tuple(made.shape), dtype,
                     (lambda t=t, dtype=dtype: t.make([ck.get(s) for s in t.sources]).to(dtype))))
    unused = sorted(ck.names - used - fam.skipped_tensors(config, ck.names))
    if unused:
        raise UserError(f"{ck.file_of(unused[0])}: tensor {unused[0]} is not part of a {fam.model_type} model as "
                        f"its config.json describes it ({len(unused)} such tensors)")
    absent = sorted(set(want) - {p[0] for p in plan})
    if absent:  # a family's map that misses a parameter is a bug of moedsl, not the user's
        raise RuntimeError(f"the {fam.model_type} import makes no tensor for {absent[0]}")
    total = sum(_nbytes(p[1], p[2]) for p in plan)
    with staged(out, overwrite) as tmp:
        with Written("import", len(plan), total, progress) as written:
            files = write_sharded(tmp, plan, max_shard, written=written)
        (tmp / "spec.yaml").write_text(text)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        side = copy_side_files(folder, tmp)
    return {"out": str(out), "model_type": fam.model_type, "tensors": len(plan), "files": files, "copied": side,
            "bytes": total}


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _nbytes(shape, dtype) -> int:
    return nbytes(shape, dtype)


# -- export ----------------------------------------------------------------------------------

class _StateReader:
    """A loaded model's state dict, read like a ``Checkpoint``."""

    def __init__(self, sd: dict):
        self.sd = sd

    @property
    def names(self) -> set:
        return set(self.sd)

    def shape(self, name):
        return list(self.sd[name].shape)

    def get(self, name):
        return self.sd[name]

    def get_expert(self, name, e):
        return self.sd[name][e]


def _export_source(src: Path, checkpoint: Optional[Path]):
    """(spec, reader, folder holding hf_config.json and tokenizer files or None) of what ``src``
    (with ``checkpoint``) resolves to: an import's safetensors are read as they are, a checkpoint
    through the model it loads into."""
    from moedsl.runtime.load import build  # runtime imports moedsl.hf: resolved on first use
    from moedsl.runtime.resolve import IMPORT, resolve as resolve_model

    source = resolve_model(src, checkpoint)
    side = next((d for d in source.folders if (d / HF_CONFIG).is_file()), None)
    if source.kind == IMPORT:
        return source.spec, Checkpoint(source.path), side or source.path
    model = build(source)
    return source.spec, _StateReader(dict(model.state_dict())), side


def export_checkpoint(src: Path, out: Path, max_shard: int = 5 * 10**9, overwrite: bool = False,
                      checkpoint: Optional[Path] = None, progress: Optional[bool] = False) -> dict:
    """Write a Hugging Face checkpoint (config.json, safetensors in the family's names, the
    tokenizer files) of ``src``: an import folder, a run folder, a DCP checkpoint, or a spec with
    ``checkpoint``. ``progress`` as for ``import_checkpoint``."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    apart(out, [src, checkpoint])
    spec, reader, side = _export_source(src, checkpoint)
    recorded = None
    if side is not None and (side / HF_CONFIG).is_file():
        recorded = json.loads((side / HF_CONFIG).read_text())
    fam = family_of_spec(spec, recorded.get("model_type") if recorded else None)
    config = fam.export_config(spec, recorded)
    dtype = torch_dtype(spec.model.dtype)
    plan = []
    for t in fam.export_tensors(spec):
        metas = []
        for s in t.sources:
            name, e = (s, None) if isinstance(s, str) else s
            if name not in reader.names:
                raise UserError(f"{src}: no tensor {name}, which the {fam.model_type} export needs")
            shape = reader.shape(name)
            metas.append(torch.empty(shape if e is None else shape[1:], device="meta"))
        made = t.make(metas)
        # the spec's dtype, but float32 for the tensors the family keeps in float32 (DeepSeek-V3's
        # router): the checkpoint holds them as transformers saves them
        want = torch.float32 if fam.keeps_float32(t.name) else dtype

        def make(t=t, want=want):
            ts = [reader.get(s) if isinstance(s, str) else reader.get_expert(*s) for s in t.sources]
            return t.make(ts).to(want)

        plan.append((t.name, tuple(made.shape), want, make))
    total = sum(_nbytes(p[1], p[2]) for p in plan)
    with staged(out, overwrite) as tmp:
        with Written("export", len(plan), total, progress) as written:
            files = write_sharded(tmp, plan, max_shard, written=written)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_side_files(side, tmp) if side is not None else []
    return {"out": str(out), "model_type": fam.model_type, "tensors": len(plan), "files": files, "copied": copied,
            "bytes": total}
