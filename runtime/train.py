"""The training loop: a compiled spec, one rank, from start (or a checkpoint) to the end.

    for step: batch -> forward (autocast) -> task loss + aux loss -> backward (÷ world)
              -> gradient sync -> clip -> AdamW -> aux-loss-free bias -> metrics
              (-> held-out eval, -> checkpoint)

Read top to bottom; the pieces it calls are in this folder.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moedsl.errors import MoedslError

from . import checkpoint as ckpt
from .cpu import keep_freed_memory, release_freed_memory
from .data import make_source
from .grads import GradSync
from .preflight import check_run

AMP = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunOptions:
    steps: int
    batch: int
    seq: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    seed: int
    data: str
    eval_every: int
    eval_batches: int
    checkpoint_every: Optional[int]
    out: Path = Path("runs/run")
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda
    cuda_graphs: str = "auto"  # auto | on | off
    progress: bool = True
    timeout: float = 300.0  # seconds a collective may wait before the run fails
    log_every: int = 1
    eval_only: bool = False
    keep_memory: bool = True  # on a CPU: malloc keeps freed memory (runtime/cpu.py)

    @staticmethod
    def from_spec(spec, **overrides) -> "RunOptions":
        t = spec.train
        base = dict(steps=t.steps, batch=t.batch_size, seq=t.seq_len, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup,
                    weight_decay=t.weight_decay, grad_clip=t.grad_clip, seed=t.seed, data=t.data,
                    eval_every=t.eval_every, eval_batches=t.eval_batches, checkpoint_every=t.checkpoint_every)
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["out"] = Path(base.get("out", "runs/run"))
        return RunOptions(**base)


@dataclass
class Summary:
    spec: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_loss: float
    eval_loss: Optional[float]
    eval_ppl: Optional[float]
    balance: float  # mean over MoE layers of max/mean expert load (1 = even)
    dropped: float  # fraction of assignments dropped
    first_loss: float
    checkpoint: Optional[str]
    metrics: str
    plot: Optional[str]
    world: int
    cuda_graphs: bool
    losses: list = field(default_factory=list)


def lr_at(step: int, o: RunOptions) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr · lr at the last step."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    span = max(o.steps - o.warmup, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - o.warmup, span) / span))
    return o.lr * (o.min_lr + (1 - o.min_lr) * cos)


def task_loss(spec, out, targets) -> torch.Tensor:
    if spec.model.input == "tokens":
        return F.cross_entropy(out.output.flatten(0, 1).float(), targets.flatten())
    return F.mse_loss(out.output.float(), targets.float())


def _env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MoedslError("--device cuda: no CUDA device is available here")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _mean(x: float, world: int, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def _optimizer(model, o: RunOptions, capturable: bool):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=torch.tensor(o.lr) if capturable else o.lr, betas=(0.9, 0.95), eps=1e-8)
    if capturable:
        kw["capturable"] = True
    return torch.optim.AdamW(groups, **kw)


def _gates(model):
    from moedsl.nn.gates import Gate

    return [m for m in model.modules() if isinstance(m, Gate) and m.spec.bias_balancing_rate is not None]


def _balance_bias(gates, world: int) -> None:
    for g in gates:
        load = g.load_acc.clone()
        if world > 1:
            dist.all_reduce(load)
        g.balance_step(load)


def _router_summary(stats, world: int) -> tuple[float, float, dict]:
    """(balance = mean over layers of max/mean load, dropped fraction, per-layer load fractions)."""
    if not stats:
        return 1.0, 0.0, {}
    loads = torch.stack([s.tokens_per_expert.float() for s in stats]) if len({
        s.tokens_per_expert.numel() for s in stats}) == 1 else None
    dropped = torch.stack([s.dropped.float() for s in stats])
    assigned = torch.tensor([float(s.assignments) for s in stats], device=dropped.device)
    per_layer = {}
    if loads is not None:
        if world > 1:
            dist.all_reduce(loads)
        for s, row in zip(stats, loads):
            per_layer[s.layer] = (row / row.sum().clamp(min=1)).tolist()
        balance = float((loads.max(1).values / loads.mean(1).clamp(min=1e-9)).mean())
    else:
        balance = float("nan")
    if world > 1:
        both = torch.stack([dropped.sum(), assigned.sum()])
        dist.all_reduce(both)
        frac = float(both[0] / both[1].clamp(min=1))
    else:
        frac = float(dropped.sum() / assigned.sum().clamp(min=1))
    return balance, frac, per_layer


def _first_nonfinite(model, inputs, amp) -> str:
    """The first module (in execution order) whose output has a NaN or inf."""
    found: list = []

    def bad(obj) -> bool:
        if torch.is_tensor(obj):
            return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        if isinstance(obj, (tuple, list)):
            return any(bad(o) for o in obj)
        if hasattr(obj, "__dataclass_fields__"):
            return any(bad(getattr(obj, f)) for f in obj.__dataclass_fields__)
        return False

    hooks = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, name=name: found.append(name) if not found and bad(out) else None))
        elif name.endswith((".gate", ".experts", ".attention", ".lstm")):
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, name=name: found.append(name) if not found and bad(out) else None))
    try:
        with torch.no_grad(), torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    if found:
        return found[0]
    bad_params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    return f"parameter {bad_params[0]}" if bad_params else "the loss (activations are finite)"


@torch.no_grad()
def evaluate(model, spec, source, o: RunOptions, rank: int, world: int, device, amp, graphs: dict = None) -> float:
    """Mean held-out loss over ``eval_batches`` batches (with CUDA graphs: a captured forward)."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(o.eval_batches):
        b = source.batch(i, o.batch, o.seq, rank, world, split="eval")
        inputs = b.inputs.to(device)
        if graphs is not None:
            from .cudagraph import GraphedForward

            if "eval" not in graphs:
                graphs["eval"] = GraphedForward(model, inputs, amp)
            out = graphs["eval"](inputs)
        else:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(inputs)
        total += float(task_loss(spec, out, b.targets.to(device)))
    model.train(was)
    return _mean(total / o.eval_batches, world, device)


def _inject_fault(step: int, rank: int, model) -> None:
    """A testing hook: MOEDSL_FAULT="exit@STEP[:RANK]" ends the process abruptly at that step,
    "nan@STEP[:RANK]" puts a NaN into the first expert weight (to test detection)."""
    spec = os.environ.get("MOEDSL_FAULT")
    if not spec:
        return
    kind, _, where = spec.partition("@")
    at, _, who = where.partition(":")
    if int(at) != step + 1 or (who and int(who) != rank):
        return
    if kind == "exit":
        os._exit(3)
    if kind == "nan":
        with torch.no_grad():
            name, p = next((n, p) for n, p in model.named_parameters() if ".experts." in n)
            p.view(-1)[0] = float("nan")


def run(spec, o: RunOptions) -> Summary:
    """Train ``spec`` on this rank (one of WORLD_SIZE launched by torchrun, or alone)."""
    from moedsl.api import build_model

    rank, world, local_rank = _env()
    check_run(spec, o, world)  # every reason it cannot start, before anything is built (once more under the CLI)
    device = _device(o.device, local_rank)
    if device.type == "cpu" and o.keep_memory:
        keep_freed_memory()  # no page faults on every step's activations
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=o.timeout))
    if o.batch % world:
        raise MoedslError(f"batch {o.batch} does not split over {world} processes")
    torch.manual_seed(o.seed + rank)
    say = _Say(rank, o.progress)
    model = build_model(spec, device=device, rank=rank, world_size=world, seed=o.seed, dtype=torch.float32)
    compiled = model.compiled
    amp = AMP[spec.model.dtype]
    graphs = _use_cuda_graphs(o, device, compiled, say)
    opt = _optimizer(model, o, capturable=graphs)
    sync = GradSync(model, compiled.mesh, rank)
    gates = _gates(model)
    source = make_source(spec, o.data, o.seed)
    out_dir = Path(o.out)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if o.resume:
        found = ckpt.latest(ckpt_dir) if o.resume is True else Path(o.resume)
        if found is None:
            raise MoedslError(f"--resume: no checkpoint under {ckpt_dir}")
        meta = ckpt.load(found, model, opt, spec, _extra(rank))
        start = int(meta["step"])
        _restore_rng(meta["extra"], rank)
        say.once(f"resumed from {found} at step {start}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(metrics_path, start)
        _verify_collectives(model, world, device)
    elif world > 1:
        _verify_collectives(model, world, device)
    say.once(f"{spec.name}: {world} process(es) on {device.type}, batch {o.batch} × {o.seq}, steps {start}..{o.steps}, "
             f"data {source.name}, {spec.model.dtype}{', CUDA graphs' if graphs else ''}")
    step_fn = _make_step(model, spec, opt, sync, gates, o, world, amp, graphs, source, device, say)
    log = open(metrics_path, "a") if rank == 0 else None
    losses, last_ckpt, eval_loss = [], None, None
    eval_graphs = {} if graphs else None
    balance = dropped = float("nan")
    t0, tokens = time.perf_counter(), 0
    first = None
    bar = say.progress(o.steps, start)
    try:
        for step in range(start, o.steps):
            _inject_fault(step, rank, model)
            b = source.batch(step, o.batch, o.seq, rank, world)
            ts = time.perf_counter()
            lr = lr_at(step, o)
            loss, aux, norm, stats = step_fn(b, lr)
            loss, aux = _mean(loss, world, device), _mean(aux, world, device)
            if not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(norm)):
                where = _first_nonfinite(model, b.inputs.to(device), amp)
                what = "loss" if not math.isfinite(loss) else "aux loss" if not math.isfinite(aux) else "gradient norm"
                value = loss if what == "loss" else aux if what == "aux loss" else norm
                raise MoedslError(f"the {what} is {value} at step {step + 1}: the first non-finite values come from "
                                  f"{where}. The run stopped before updating the weights"
                                  + (f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""))
            first = loss if first is None else first
            balance, dropped, per_layer = _router_summary(stats, world)
            dt = time.perf_counter() - ts
            tokens += o.batch * o.seq
            losses.append(loss)
            row = {"step": step + 1, "loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": norm,
                   "tokens_per_s": o.batch * o.seq / dt, "balance": balance, "dropped": dropped,
                   "expert_load": per_layer, "time": time.time()}
            if (step + 1) % o.eval_every == 0 or step + 1 == o.steps:
                eval_loss = evaluate(model, spec, source, o, rank, world, device, amp, eval_graphs)
                if device.type == "cpu" and o.keep_memory:
                    release_freed_memory()  # the evaluation's own shapes: not kept past it
                row.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)) if spec.model.input == "tokens"
                           else None)
            if log is not None and ((step + 1) % o.log_every == 0 or "eval_loss" in row):
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar(step + 1, loss, row["tokens_per_s"], balance, eval_loss)
            if o.checkpoint_every and (step + 1) % o.checkpoint_every == 0 and step + 1 < o.steps:
                last_ckpt = ckpt.save(ckpt_dir, step + 1, model, opt, spec, _extra(rank), rank, world)
        if o.steps > start:
            last_ckpt = ckpt.save(ckpt_dir, o.steps, model, opt, spec, _extra(rank), rank, world)
    finally:
        bar(None, None, None, None, None)
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    plot = None
    if rank == 0:
        from .report import plot_expert_load

        plot = plot_expert_load(metrics_path, out_dir / "expert_load.png", spec.name)
    return Summary(spec=spec.name, steps=o.steps, tokens=tokens, seconds=seconds,
                   tokens_per_s=tokens / max(seconds, 1e-9), train_loss=losses[-1] if losses else float("nan"),
                   eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)) if eval_loss is not None and
                   spec.model.input == "tokens" else None, balance=balance, dropped=dropped,
                   first_loss=first if first is not None else float("nan"),
                   checkpoint=str(last_ckpt) if last_ckpt else None, metrics=str(metrics_path),
                   plot=str(plot) if plot else None, world=world, cuda_graphs=graphs, losses=losses)


def _make_step(model, spec, opt, sync, gates, o, world, amp, graphs, source, device, say):
    """One training step: (batch, lr) -> (loss, aux loss, grad norm, router stats)."""

    def eager(b, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        inputs, targets = b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(inputs)
            loss = task_loss(spec, out, targets)
        ((loss + out.aux_loss) / world).backward()
        sync()
        norm = float(sync.clip(o.grad_clip))
        if math.isfinite(norm):  # the same on every rank: the norm is global
            opt.step()
            _balance_bias(gates, world)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(out.aux_loss.detach()), norm, out.router_stats

    if not graphs:
        return eager
    from .cudagraph import GraphedTrainStep

    example = source.batch(0, o.batch, o.seq, 0, world)
    return GraphedTrainStep(model, spec, opt, sync, gates, o, world, amp, example, device, say, fallback=eager)


def _use_cuda_graphs(o: RunOptions, device, compiled, say) -> bool:
    if o.cuda_graphs == "off":
        return False
    why = None
    if device.type != "cuda":
        why = "the run is on the CPU"
    elif not compiled.static.capturable:
        why = f"{', '.join(compiled.static.dynamic_layers)} have data-dependent shapes (dropless or routed as one batch)"
    if why is None:
        return True
    if o.cuda_graphs == "on":
        raise MoedslError(f"--cuda-graphs on: cannot capture, {why}")
    say.once(f"CUDA graphs off: {why}; running eager")
    return False


def _extra(rank: int) -> dict:
    """This rank's RNG states (dropout); routing noise is counter-based and in the gates' buffers."""
    extra = {f"rng_cpu_{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        extra[f"rng_cuda_{rank}"] = torch.cuda.get_rng_state()
    return extra


def _restore_rng(extra: dict, rank: int) -> None:
    if f"rng_cpu_{rank}" in extra:
        torch.set_rng_state(extra[f"rng_cpu_{rank}"])
    if torch.cuda.is_available() and f"rng_cuda_{rank}" in extra:
        torch.cuda.set_rng_state(extra[f"rng_cuda_{rank}"])


def _trim_metrics(path: Path, start: int) -> None:
    """A resumed run rewrites the steps after its checkpoint; a new run starts the file afresh."""
    if start == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= start]
    path.write_text("".join(line + "\n" for line in keep))


_LOST_PEER = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "NCCL error",
              "DistBackendError", "Socket Timeout", "failed to recv", "Connection refused")


def collective_failure(e: BaseException):
    """A one-line account of a collective that failed because another rank died or hung."""
    text = str(e)
    if not dist.is_initialized() or not any(m in text for m in _LOST_PEER):
        return None
    first = next((line for line in text.splitlines() if line.strip()), text)
    return (f"rank {dist.get_rank()}: a collective failed, another rank has died or hung "
            f"({first.strip()[:160]})")


def _verify_collectives(model, world: int, device) -> None:
    """Every rank must issue the same collectives in the same order; compare digests first."""
    if world == 1:
        return
    from moedsl.compiler.passes.verify import signature_digest

    mine = signature_digest(model.graph)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise MoedslError(f"ranks compiled different collective sequences ({everyone}): refusing to start a run "
                          "that would hang")


class _Say:
    """Rank 0's messages and progress bar (a rich bar on a terminal, a line per log step otherwise)."""

    def __init__(self, rank: int, progress: bool):
        self.rank, self.progress_on, self.seen = rank, progress, set()

    def once(self, text: str) -> None:
        if self.rank == 0 and text not in self.seen:
            self.seen.add(text)
            print(f"moedsl: {text}", flush=True)

    def progress(self, total: int, start: int):
        if self.rank != 0 or not self.progress_on:
            return lambda *a: None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn(), transient=False)
            task = bar.add_task("train", total=total, completed=start, info="")
            bar.start()

            def update(step, loss, tps, balance, eval_loss):
                if step is None:
                    bar.stop()
                    return
                info = f"loss {loss:.3f}  {tps:,.0f} tok/s  balance {balance:.2f}"
                if eval_loss is not None:
                    info += f"  eval {eval_loss:.3f}"
                bar.update(task, completed=step, info=info)
            return update
        every = max(total // 20, 1)

        def lines(step, loss, tps, balance, eval_loss):
            if step is None or (step % every and step != total):
                return
            extra = f"  eval {eval_loss:.4f}" if eval_loss is not None else ""
            print(f"step {step:>6}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s  balance {balance:.2f}{extra}", flush=True)
        return lines


__all__ = ["RunOptions", "Summary", "run", "lr_at", "evaluate", "asdict"]
