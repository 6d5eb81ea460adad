"""What a run checks before it builds a model or starts a worker.

A run that cannot work should say so in a second, once, with every reason at once, and
leave nothing behind: not after minutes of building a model, not once per rank, not as a
traceback from AdamW, the allocator or the rendezvous. ``check_run`` looks at

- the options (learning rate, warm-up, timeout, evaluation, sequence length, device);
- what depends on the number of processes (the batch split, the experts' placement);
- the data source (``--data``);
- ``--resume`` and the output folder (created here; an earlier run in it is refused unless
  the run resumes it or ``--overwrite`` replaces it);
- memory: the plan's bytes per process (``moedsl.compiler.plan``, computed on the meta
  device, so nothing is allocated) against the memory this machine has free.

and raises ``RunRefused`` with one line per problem. The CLI calls it before it starts
workers, with the world of ``--nproc``; ``runtime.train.run`` calls it again on every rank
(for runs started by torchrun or from Python), and only rank 0 prints it.

A run that can work but will be far slower than it need be is warned about, not refused:
``sixteen_bit_warning``, a 16-bit spec on a CPU without native 16-bit GEMMs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from moedsl import dtypes
from moedsl.compiler import compile_graph
from moedsl.compiler.memory_plan import Settings
from moedsl.compiler.plan import human_bytes, make_plan
from moedsl.errors import SpecError, UserError
from moedsl.hf.weights import problems
from moedsl.mesh import resolve_mesh
from moedsl.nn import cpu_caps
from moedsl.validate import check_batch

from . import checkpoint as ckpt
from .data import pack_problems, source_problems
from .distill import teacher_problems
from .grads import MODES
from .recompute import MODES as RECOMPUTE
from .shard import MODES as SHARD_MODES
from .resolve import IMPORT, is_import_dir, resolve

# the files of a run in its output folder (runtime/train.py writes them)
RUN_FILES = ("metrics.jsonl", "checkpoints", "expert_load.png", "loss.png")
REPLACED = ".replaced"  # where --overwrite keeps the old run until the new one has started
MAX_TIMEOUT_S = 10**9  # torch keeps a timeout in milliseconds as a 64-bit int; far below that


class RunRefused(UserError):
    """A run that must not start: every reason, one line each. A user's mistake: exit 2."""

    def __init__(self, problems: list):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _err(text: str) -> str:
    return f"moedsl: error: {text}"


def check_run(spec, o, world: int, *, names: dict | None = None, world_name: str | None = None,
              overwrite: bool | None = None, memory: bool = False, processes_here: int | None = None) -> None:
    """Raise ``RunRefused`` listing every reason the run ``o`` of ``spec`` on ``world``
    processes cannot start; create the output folder when there is none.

    ``names``: option field -> how the user wrote it (``{"lr": "--lr"}``); fields not in it
    came from the spec (``train.lr``). ``overwrite``: None does not look for an earlier run
    in the output folder; False refuses one (unless ``o.resume``); True lets it be replaced.
    ``memory``: also compare the plan's memory per process, times ``processes_here`` (the
    processes on this machine, default ``world``), with the memory available."""
    names = names or {}
    world_name = world_name or f"{world} processes"
    options = option_problems(spec, o, names)
    placement = placement_problems(spec, o, world, names, world_name)
    problems = options + placement
    problems += [_err(p) for p in source_problems(spec, o.data, o.seq, init=getattr(o, "init", None))]
    problems += [_err(p) for p in pack_problems(spec, o.data, o.pack, o.init, _name(names, "pack"))]
    if o.pack == "documents" and o.cuda_graphs == "on":
        problems.append(_err("--cuda-graphs on: packed documents (--pack documents) run the step eagerly, each "
                             "batch's attention masks made from its documents"))
    problems += resume_problems(o, overwrite)
    problems += init_problems(spec, o)
    if getattr(o, "distill_teacher", None):  # from the specs and tokenizer files: nothing built yet
        problems += [_err(p) for p in teacher_problems(spec, o.distill_teacher, getattr(o, "init", None), o.data)]
    if overwrite is not None and not o.resume and not overwrite:
        held = existing_run(Path(o.out))
        if held:
            problems.append(_err(f"--out {o.out} already holds a run ({held}): --resume to continue it, "
                                 "--overwrite to replace it, or another --out"))
    if memory and not options and not placement:  # the plan needs a sound batch and placement
        problem = memory_problem(spec, o, world, processes_here or world)
        if problem:
            problems.append(_err(problem))
    created = []
    if not problems:
        problem, created = make_out(Path(o.out))
        if problem:
            problems.append(_err(problem))
    if problems:
        for d in reversed(created):  # a refused run leaves nothing behind
            try:
                d.rmdir()
            except OSError:
                pass
        raise RunRefused(problems)


# ----------------------------------------------------------------------------- options

_SPEC_FIELD = {"batch": "batch_size", "seq": "seq_len", "distill_teacher": "distill.teacher",  # RunOptions field
               "distill_alpha": "distill.alpha", "distill_temperature": "distill.temperature"}  # -> train.* key
# RunOptions fields that RunOptions.from_spec fills from the spec's train section
_FROM_SPEC = {"steps", "batch", "seq", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "seed", "data",
              "eval_every", "eval_batches", "checkpoint_every", "pack", "distill_teacher", "distill_alpha",
              "distill_temperature", "recompute", "micro_batches"}


def _name(names: dict, field: str) -> str:
    """How the user gave ``field``: a flag (``names``), the spec's ``train.*`` key, or else the
    RunOptions field itself (set from Python)."""
    if field in names:
        return names[field]
    return f"train.{_SPEC_FIELD.get(field, field)}" if field in _FROM_SPEC else field


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def option_problems(spec, o, names: dict) -> list:
    """The options on their own (and the sequence length against the model)."""
    out = []

    def bad(field: str, why: str) -> None:
        out.append(_err(f"{_name(names, field)} {getattr(o, field)!r}: {why}"))

    for field in ("steps", "batch", "seq", "eval_every", "eval_batches", "log_every"):
        v = getattr(o, field)
        if not _whole(v) or v < 1:
            bad(field, "must be a whole number >= 1")
    if o.checkpoint_every is not None and (not _whole(o.checkpoint_every) or o.checkpoint_every < 1):
        bad("checkpoint_every", "must be a whole number >= 1")
    if not _finite(o.lr) or o.lr <= 0:
        bad("lr", "the learning rate must be a finite number > 0")
    if not _finite(o.min_lr) or not 0 <= o.min_lr <= 1:
        bad("min_lr", "the final learning rate, a fraction of lr, must be between 0 and 1")
    if not _whole(o.warmup) or o.warmup < 0:
        bad("warmup", "the warm-up steps must be a whole number >= 0")
    if not _finite(o.weight_decay) or o.weight_decay < 0:
        bad("weight_decay", "must be a finite number >= 0")
    if not _finite(o.grad_clip) or o.grad_clip <= 0:
        bad("grad_clip", "must be a finite number > 0")
    if o.grad_sync not in MODES:
        bad("grad_sync", f"must be {' or '.join(MODES)}")
    if not _finite(o.bucket_mb) or o.bucket_mb <= 0:
        bad("bucket_mb", "must be a number > 0 (MiB of gradients per all-reduce)")
    if not _finite(o.timeout) or not 0 < o.timeout <= MAX_TIMEOUT_S:
        bad("timeout", "the seconds a collective may wait must be a finite number > 0")
    if not _whole(o.seed) or not -2**63 <= o.seed < 2**63 - 2**20:
        bad("seed", "must be a whole number that fits in 64 bits")
    if _whole(o.seq) and o.seq > spec.model.max_seq_len:
        bad("seq", f"exceeds model.max_seq_len {spec.model.max_seq_len}")
    lone = [names[f] for f in ("distill_alpha", "distill_temperature") if f in names]
    if lone and not getattr(o, "distill_teacher", None):
        out.append(_err(f"{' and '.join(lone)} without a teacher: give --distill-teacher (or train.distill)"))
    if getattr(o, "distill_teacher", None):
        if not _finite(o.distill_alpha) or not 0 <= o.distill_alpha <= 1:
            bad("distill_alpha", "the soft targets' weight must be between 0 and 1")
        if not _finite(o.distill_temperature) or o.distill_temperature <= 0:
            bad("distill_temperature", "the temperature must be a finite number > 0")
        if o.cuda_graphs == "on":
            out.append(_err("--cuda-graphs on: distillation runs the teacher's forward in each step, eagerly"))
    if o.recompute not in RECOMPUTE:
        bad("recompute", f"must be {', '.join(RECOMPUTE[:-1])} or {RECOMPUTE[-1]}")
    elif o.recompute == "layers" and o.compile == "on":
        out.append(_err(f"--compile on and {_name(names, 'recompute')} layers: choose one (torch.compile runs the "
                        "dense segments whole; recomputing layers runs each sublayer under checkpoint)"))
    if not _whole(o.micro_batches) or o.micro_batches < 1:
        bad("micro_batches", "must be a whole number >= 1")
    if spec.encoder_decoder:  # what its step does not do (yet): refused in one line each
        for field, allowed, why in (("pack", ("none",), "packed documents are a decoder-only model's rows"),
                                    ("cuda_graphs", ("off", "auto"), "its step runs eagerly"),
                                    ("compile", ("off", "auto"), "its step runs eagerly"),
                                    ("recompute", ("none", "experts"), "its sublayers read the stack's shared "
                                     "relative bias, not checked under recomputation")):
            if getattr(o, field, allowed[0]) not in allowed:
                bad(field, f"not for an encoder-decoder: {why}")
        if getattr(o, "distill_teacher", None):
            out.append(_err(f"{_name(names, 'distill_teacher')}: distillation is not for an encoder-decoder (yet)"))
    if o.cuda_graphs == "on" and (o.recompute != "none" or o.micro_batches != 1):
        field = "recompute" if o.recompute != "none" else "micro_batches"
        out.append(_err(f"--cuda-graphs on: {_name(names, field)} {getattr(o, field)} runs the step eagerly (its "
                        "capture is not checked on a GPU yet)"))
    shard = getattr(o, "shard", "none")
    if shard not in SHARD_MODES:
        out.append(_err(f"{names.get('shard', 'placement.shard')} {shard!r}: must be {', '.join(SHARD_MODES)}"))
    elif shard != "none" and o.cuda_graphs == "on":
        out.append(_err(f"--cuda-graphs on: a sharded step ({names.get('shard', 'placement.shard')} {shard}) "
                        "runs eagerly"))
    if shard in ("optimizer", "full") and getattr(spec.placement, "replication", None) is not None:
        out.append(_err(f"{names.get('shard', 'placement.shard')} {shard}: placement.replication moves experts "
                        "and their AdamW moments between ranks, which sharded states do not follow yet"))
    if shard == "full" and o.compile == "on":
        out.append(_err(f"--compile on: {names.get('shard', 'placement.shard')} full gathers each layer's "
                        "parameters in FSDP's module hooks, which the compiled dense segments are not run with"))
    if o.device == "cuda" or o.cuda_graphs == "on":
        if not torch.cuda.is_available():
            if o.device == "cuda":
                out.append(_err("--device cuda: no CUDA device is available here"))
            elif o.cuda_graphs == "on":
                out.append(_err("--cuda-graphs on: CUDA graphs need a CUDA device, and none is available here"))
        elif o.cuda_graphs == "on" and o.device == "cpu":
            out.append(_err("--cuda-graphs on: the run is on the CPU (--device cpu)"))
    return out


def placement_problems(spec, o, world: int, names: dict, world_name: str) -> list:
    """What the number of processes or the batch breaks: the batch split, the experts' placement,
    the MoE layers' routing groups."""
    out = []
    if world > 1 and _whole(o.batch) and o.batch >= 1 and o.batch % world:
        low = o.batch // world * world
        out.append(_err(f"{_name(names, 'batch')} {o.batch} does not split over {world_name}: give a multiple "
                        f"of {world} ({low or world} or {low + world})"))
    try:
        resolve_mesh(spec, world)
    except SpecError as e:
        out += str(e).splitlines()
    M = o.micro_batches if _whole(o.micro_batches) and o.micro_batches >= 1 else 1
    if _whole(o.batch) and o.batch >= 1:
        if M > 1 and o.batch % world == 0 and o.batch // world % M:
            out.append(_err(f"{_name(names, 'micro_batches')} {M}: the {o.batch // world} sequences of each of "
                            f"{world_name} do not split into {M} equal micro-batches: give a batch that is a "
                            f"multiple of {world * M}"))
        elif _whole(o.seq) and o.seq >= 1 and o.batch % M == 0:  # the gate's rule: the tokens of a forward
            # (each forward routes one micro-batch: B / M sequences over the ranks) split into its groups
            origin = _name(names, "batch") if M == 1 else \
                f"the micro-batch ({_name(names, 'batch')} / {_name(names, 'micro_batches')})"
            out += [i.format(spec.source) for i in check_batch(spec, o.batch // M, origin=origin, seq=o.seq)]
    return out


# ----------------------------------------------------------------------------- output folder

def resume_problems(o, overwrite) -> list:
    if not o.resume:
        return []
    if overwrite:
        return [_err("--resume and --overwrite: choose one (continue the run in --out, or replace it)")]
    if o.resume is True:
        ckpt_dir = Path(o.out) / "checkpoints"
        if ckpt.latest(ckpt_dir) is None:
            return [_err(f"--resume: no checkpoint under {ckpt_dir}")]
        return []
    path = Path(o.resume)
    if not (path / "meta.json").is_file():
        what = "no such checkpoint" if not path.exists() else "not a checkpoint (no meta.json in it)"
        return [_err(f"--resume {o.resume}: {what}")]
    return []


def init_problems(spec, o) -> list:
    """``--init DIR``: an import folder whose weights fit the spec (from the files' headers
    alone: the tensor, both shapes and the spec's field and line where they do not)."""
    init = getattr(o, "init", None)
    scratch = getattr(o, "from_scratch", False)
    if init and scratch:
        return [_err("--init and --from-scratch: choose one (--init starts from imported weights, --from-scratch "
                     "from random ones)")]
    if not init:
        folder = _import_folder(spec)
        if folder is None or o.resume or scratch:
            return []
        return [_err(f"{spec.source}: the spec of the import folder {folder}, which holds its weights: --init "
                     f"{folder} to start from them, or --from-scratch to train from random weights")]
    if o.resume:
        return [_err("--init and --resume: choose one (--init starts from imported weights, --resume continues "
                     "the run in --out)")]
    try:
        source = resolve(init)
    except UserError:
        source = None
    if source is None or source.kind != IMPORT:
        return [_err(f"--init {init}: not an import folder (spec.yaml and *.safetensors, as moedsl import "
                     "writes)")]
    try:
        return [_err(f"--init: {p}") for p in problems(spec, source.path)]
    except UserError as e:
        return [_err(f"--init: {e}")]


def _import_folder(spec) -> Path | None:
    """The import folder ``spec`` was read from (``moedsl import`` writes its spec.yaml beside
    the weights, so the folder itself says the spec has weights), else None."""
    source = Path(spec.source) if getattr(spec, "source", None) else None
    if source is None or not source.is_file() or not is_import_dir(source.parent):
        return None
    return source.parent


def existing_run(out: Path) -> str | None:
    """What an earlier run left in ``out`` ("metrics up to step 130, checkpoint step-00000130"),
    or None when there is none."""
    found = []
    lines = _last_lines(out / "metrics.jsonl")
    if lines:
        try:
            found.append(f"metrics up to step {json.loads(lines[-1])['step']}")
        except (ValueError, KeyError, TypeError):
            found.append("a metrics.jsonl")
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.is_dir():
        latest = ckpt.latest(ckpt_dir)
        if latest is not None:
            found.append(f"checkpoint {latest.name}")
        elif any(ckpt_dir.iterdir()):
            found.append("an incomplete checkpoint")
    if (out / REPLACED).is_dir() and any((out / REPLACED).iterdir()):  # a launcher killed while starting over it
        found.append(f"an earlier run set aside in {out / REPLACED} by an --overwrite that never started")
    return ", ".join(found) or None


def _last_lines(path: Path, tail: int = 1 << 16) -> list:
    """The non-empty lines of the last ``tail`` bytes of ``path`` (a long run's metrics are large)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - tail, 0))
            return [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def make_out(out: Path) -> tuple:
    """Create the output folder (and its parents): (problem or None, folders created)."""
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder", []
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                return f"--out {out}: cannot create it, {d} is a file", created
        except OSError as e:
            why = "is a file" if isinstance(e, NotADirectoryError) else e.strerror or str(e)
            where = d.parent if isinstance(e, NotADirectoryError) else d
            return f"--out {out}: cannot create it ({where}: {why})", created
        created.append(d)
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write in it (permission denied)", created
    return None, created


class Replaced:
    """``--overwrite``: the old run's files wait in ``OUT/.replaced/`` while the new run starts.
    ``settle()`` deletes them once the new run has written a step, and puts them back when it
    failed before its first step, so a run that never started loses nothing."""

    def __init__(self, out: Path):
        self.out, self.aside = Path(out), Path(out) / REPLACED
        self.moved = []
        if self.aside.exists():  # left by a start that was killed: this --overwrite replaces it too
            shutil.rmtree(self.aside)
        for name in RUN_FILES:
            if (self.out / name).exists():
                self.aside.mkdir(exist_ok=True)
                (self.out / name).rename(self.aside / name)
                self.moved.append(name)

    def started(self) -> bool:
        return bool(_last_lines(self.out / "metrics.jsonl"))

    def settle(self) -> None:
        if not self.moved:
            return
        if self.started():
            shutil.rmtree(self.aside, ignore_errors=True)
            return
        for name in self.moved:  # the new run never wrote a step: its leftovers go, the old run comes back
            new = self.out / name
            if new.is_dir():
                shutil.rmtree(new)
            elif new.exists():
                new.unlink()
            (self.aside / name).rename(new)
        shutil.rmtree(self.aside, ignore_errors=True)


# ----------------------------------------------------------------------------- 16 bits on a CPU

def slow_sixteen_bit(spec, o, caps=None, cuda: bool | None = None) -> list:
    """The spec's 16-bit dtypes (``model.dtype``, ``model.router_dtype``: (field, torch dtype))
    that this run computes on a CPU without a native GEMM for them: none on CUDA (``o.device``
    cuda, or auto with a GPU; ``cuda``: default ``torch.cuda.is_available()``) and none where
    ``caps`` (default ``cpu_caps.probe()``) has them."""
    wanted = [(f"model.{f}", getattr(spec.model, f)) for f in ("dtype", "router_dtype")]
    sixteen = [(f, dtypes.torch_dtype(n)) for f, n in wanted if dtypes.itemsize(n) == 2]
    if not sixteen or o.device == "cuda":
        return []
    if o.device == "auto" and (torch.cuda.is_available() if cuda is None else cuda):
        return []
    caps = caps or cpu_caps.probe()
    return [(f, dt) for f, dt in sixteen if not caps.native(dt)]


def sixteen_bit_warning(spec, o, caps=None, cuda: bool | None = None, slowdown=None) -> str | None:
    """The line ``moedsl run`` prints before training a 16-bit spec on a CPU without native
    GEMMs for the type (``slow_sixteen_bit``), None elsewhere: the capability, how many times
    longer a 16-bit matmul took than a float32 one just now (``slowdown(dtype)``, default
    ``cpu_caps.slowdown``: ~0.1 s, nothing kept), and what to do. There torch's 16-bit GEMMs
    convert element by element: an AVX2-only CPU ran a 1024³ bfloat16 matmul at 0.2 GFLOP/s
    against 8 in float32, and a bfloat16 training step of a 54M-parameter Mixtral took ~100 s."""
    slow = slow_sixteen_bit(spec, o, caps, cuda)
    if not slow:
        return None
    caps, slowdown = caps or cpu_caps.probe(), slowdown or cpu_caps.slowdown
    names = {dt: str(dt).removeprefix("torch.") for _, dt in slow}  # each dtype once, measured once
    took = [f"{r:.1f}×" if r < 10 else f"{r:.0f}×" for r in map(slowdown, names)]
    took = " and ".join([f"a {n} matmul took {t}" if i == 0 else f"a {n} one {t}"
                         for i, (n, t) in enumerate(zip(names.values(), took))])
    fields = ", ".join(f"{f} {names[dt]}" for f, dt in slow)
    return (f"moedsl: warning: {fields} on a CPU without native {'/'.join(names.values())} GEMMs "
            f"({caps.capability}): {took} as long as float32 here just now, and every layer but the experts "
            f"(computed in float32) runs about that much slower: set "
            f"{' and '.join(f for f, _ in slow)} to float32 in the spec, or run on a GPU")


# ----------------------------------------------------------------------------- memory

def memory_needed(spec, o, world: int) -> int:
    """Bytes one process of the run holds at most: fp32 weights, gradients and AdamW's two
    moments, the 16-bit working copies and the training activations under the run's shard
    mode, recomputation and micro-batches, from the plan of the rank with the most (compiled
    on the meta device: nothing is allocated)."""
    settings = Settings(getattr(o, "shard", spec.placement.shard), getattr(o, "recompute", spec.train.recompute),
                        getattr(o, "micro_batches", spec.train.micro_batches))
    worst = 0
    for rank in range(min(world, 8)):  # ranks differ only by the experts they hold
        compiled = compile_graph(spec, rank, world, device="meta", batch=(o.batch, o.seq), verify_ranks=False)
        worst = max(worst, make_plan(spec, compiled, settings).memory_train_total)
    return worst


def memory_available(o, processes_here: int) -> tuple:
    """(bytes available to the processes of this run on this machine, what they are, processes
    sharing them). A GPU run has one device per process; a CPU run shares MemAvailable."""
    if o.device in ("auto", "cuda") and torch.cuda.is_available():
        if "LOCAL_RANK" in os.environ or processes_here == 1:  # this process trains: free memory of its device
            free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
            return free, "free on the GPU", 1
        # the launcher: no CUDA context here (it would hold GPU memory for the whole run)
        total = min(torch.cuda.get_device_properties(i).total_memory
                    for i in range(min(processes_here, torch.cuda.device_count())))
        return total, "on each GPU", 1
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024, "available", processes_here


def memory_problem(spec, o, world: int, processes_here: int) -> str | None:
    try:
        available, what, sharing = memory_available(o, processes_here)
    except (OSError, KeyError, ValueError):
        return None  # nothing to compare with (not Linux): the run goes ahead
    need = memory_needed(spec, o, world)
    if need * sharing <= available:
        return None
    times = f" per process × {sharing} processes" if sharing > 1 else " per process"
    return (f"{spec.name} needs about {human_bytes(need)}{times} (weights, gradients, AdamW state and "
            f"activations at batch {o.batch} × {o.seq}), {human_bytes(available)} {what}: "
            "--ignore-memory-check to run anyway")


__all__ = ["RunRefused", "check_run", "slow_sixteen_bit", "sixteen_bit_warning", "existing_run", "make_out", "Replaced", "memory_needed", "memory_available"]
