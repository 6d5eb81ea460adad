"""Checkpoints with torch.distributed.checkpoint: every rank writes its own experts.

Layout: ``DIR/step-00000200/`` (DCP shards + ``meta.json``) and ``DIR/latest`` naming the
newest complete one. A save goes to ``step-…​.tmp`` first and is renamed when every rank
has written and ``meta.json`` is in place; ``latest`` is replaced atomically after that,
so an interrupted save never touches the last good checkpoint. A save that fails (a full
disk, an I/O error) removes its ``.tmp`` folder and stops the run with one line
(``save``); a ``.tmp`` folder left by a killed run is removed by the next save or resume.

Expert weights and their optimizer state are stored per global expert
(``model/layers.2.experts.w_in/e5``), so a checkpoint written by N expert-parallel ranks
loads on M ranks, or into one process: each rank asks for the experts it now holds.

``resume`` takes the newest checkpoint that is whole (``problem``: its ``meta.json`` and
DCP ``.metadata`` read, and every shard file holds the bytes the metadata lists), names a
broken one it skipped, and loads into fresh tensors first, so a failed load leaves the
model as it was. ``compare`` refuses a checkpoint whose weights' shapes or meaning differ
from the spec's, naming the first difference, and names the training-only changes it allows.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from moedsl.compiler.plan import human_bytes
from moedsl.errors import MoedslError, UserError, format_path
from moedsl.kinds import layer_kinds
from moedsl.spec import Model

from .optim import prime_optimizer

KEEP = 3  # complete checkpoints kept
# The run options a checkpoint records (meta.json "train"): those that change the training
# trajectory after a resume, each named in a note when it changed.
TRAJECTORY = ("steps", "batch", "seq", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "seed", "data")


class BrokenCheckpoint(MoedslError):
    """A checkpoint whose files cannot be read back (truncated, missing, unreadable)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} is broken: {reason}")


def architecture(spec) -> dict:
    """The model and the layer stack as written in the spec (kept in ``meta.json``)."""
    return {"model": spec.data["model"], "layers": spec.data["layers"]}


def fingerprint(spec) -> str:
    """A hash of ``architecture``: equal fingerprints need no closer comparison."""
    return hashlib.sha256(json.dumps(architecture(spec), sort_keys=True).encode()).hexdigest()[:16]


# -- what a resume may change --------------------------------------------------------------

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
        from moedsl.api import load_spec

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


def save(directory: Path, step: int, model, optimizer, spec, extra: dict, rank: int, world: int,
         options=None) -> Path:
    """Write step ``step`` to ``directory/step-…`` (every rank its own part); ``options``: the
    run's options, their ``TRAJECTORY`` fields kept so a resume can name what changed.

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
    _barrier(world)
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
        reasons = _gather(_reason(failure, tmp), world)
    message = None
    if rank == 0:
        if failure is None:
            try:
                _finish(directory, tmp, final, step, spec, world, options)
            except Exception as e:  # noqa: BLE001 - meta.json or the rename failed: the save did not happen
                reasons = [_reason(e, tmp)]
        if reasons:
            message = _not_saved(directory, tmp, final, reasons, _nbytes(sd) * world)
    message = _agree(message, rank, world)
    # a barrier last, as the save ended before the broadcast above was added: without it, a
    # 4-step `--nproc 4` run of the switch example aborted at exit in 3 of 10 tries ("terminate
    # called without an active exception" in a rank other than 0); with it, 0 of 20
    _barrier(world)
    if message:
        raise MoedslError(message)
    return final


def _finish(directory: Path, tmp: Path, final: Path, step: int, spec, world: int, options) -> None:
    """Rank 0, once every shard is written: ``meta.json``, the rename, ``latest``, pruning."""
    meta = {"step": step, "world": world, "spec": spec.name, "fingerprint": fingerprint(spec),
            "architecture": architecture(spec), "spec_data": spec.data, "time": time.time()}
    if options is not None:
        meta["train"] = {k: _plain(getattr(options, k)) for k in TRAJECTORY if hasattr(options, k)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / "latest.tmp"
    try:
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / "latest")
    except OSError:  # the checkpoint is whole; without a pointer a resume takes the newest by step
        for stale in (pointer, directory / "latest"):
            stale.unlink(missing_ok=True)
    _prune(directory)


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


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
        free = _free(directory)
        text += f" (it needs about {human_bytes(needed)}"
        text += f", {human_bytes(free)} free in {directory})" if free is not None else ")"
    if tmp.exists():
        text += f"; its partial save {tmp} could not be removed"
    text += f"; the last good checkpoint is {good}" if good is not None else "; there is no earlier checkpoint"
    return text


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _reason(failure: BaseException, tmp: Path) -> tuple[str, bool]:
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


def _free(directory: Path):
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


# -- reading back --------------------------------------------------------------------------

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


def candidates(directory: Path) -> list[Path]:
    """The checkpoints under ``directory``, newest first: the one ``latest`` names, then the
    others by step, those before it first."""
    directory = Path(directory)
    done = [p for p in directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    named = None
    try:
        named = directory / (directory / "latest").read_text().strip()
    except OSError:
        pass
    named_step = _step(named) if named in done else None

    def order(p: Path):
        s = _step(p)
        return (p != named, named_step is not None and s > named_step, -s)

    return sorted(done, key=order)


def newest_whole(directory: Path) -> Path | None:
    """The newest checkpoint under ``directory`` that ``problem`` finds nothing wrong with."""
    return next((p for p in candidates(directory) if problem(p) is None), None) if Path(directory).is_dir() else None


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a moedsl checkpoint (no readable meta.json: {e})") from None


def resume(directory: Path, choice, model, optimizer, spec, extra: dict | None = None, rank: int = 0,
           world: int = 1, options=None) -> dict:
    """Fill ``model`` and ``optimizer`` for ``--resume``: ``choice`` is True (the newest whole
    checkpoint under ``directory``) or a path (that one, no other). Returns ``load``'s meta
    data with ``path`` and ``notes``: lines to show once (a broken checkpoint skipped, a
    partial save removed, training-only changes). Rank 0 decides which checkpoints to try and
    every rank follows, so all load the same one."""
    plan = _resume_plan(Path(directory), choice) if rank == 0 else None
    paths, notes, error = _agree(plan, rank, world)
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
    found = candidates(directory) if directory.is_dir() else []
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


def load(path: Path, model, optimizer, spec, extra: dict | None = None, options=None) -> dict:
    """Fill ``model`` (and ``optimizer``) from ``path``. ``extra``: this rank's tensors to restore
    if the checkpoint has them (a checkpoint from another world size has other ranks').
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

        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        wanted = {k: v for k, v in (extra or {}).items() if f"extra/{k}" in saved}
        sd = state_dict(model, optimizer, wanted)
        missing = [k for k in sd if k not in saved]
        if missing:
            raise MoedslError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[0]}")
        # read into host memory first: a failed read changes nothing, and costs no device memory
        fresh = {k: torch.empty_like(v, device="cpu") if torch.is_tensor(v) else v for k, v in sd.items()}
        try:
            dcp.load(fresh, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises assorted errors for bad files
            raise BrokenCheckpoint(path, f"cannot read it back: {_first_line(e)}") from None
    with torch.no_grad():
        for k, v in sd.items():
            if torch.is_tensor(v):
                v.copy_(fresh[k])
    meta["extra"] = {k: sd[f"extra/{k}"] for k in wanted}
    return meta


def _first_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _gather(value, world: int) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world > 1 and dist.is_initialized():
        out = [None] * world
        dist.all_gather_object(out, value)
        return out
    return [value]


def _agree(value, rank: int, world: int):
    """Rank 0's ``value`` on every rank."""
    if world > 1 and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
