"""The trainer: one object that trains a spec on this rank, from the start or a checkpoint.

    trainer = Trainer(spec, RunOptions.from_spec(spec, steps=100))
    summary = trainer.fit()          # the loop below; or drive it: trainer.step(batch, lr)

    for step: batch -> Trainer.step (runtime/step.py: forward, backward with the gradient sync
              overlapping it, clip, AdamW, balancing bias; eager, or replayed as a CUDA graph)
              -> on a logging step: the metrics of the steps since the last one, over ranks
              (-> held-out eval, -> checkpoint)

Read top to bottom; the pieces it calls are in this folder: step.py (the step itself),
grads.py (gradient sync), optim.py (AdamW, schedule, loss scale), cudagraph.py (capture),
metrics.py (one collective per logging step), checkpoint.py, data.py, diagnose.py (where a
NaN came from), faults.py (tests' fault injection), progress.py (what rank 0 prints),
distill.py (a teacher's soft targets in the loss).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moedsl import dtypes
from moedsl.api import build_model
from moedsl.compiler.passes.verify import signature_digest
from moedsl.errors import MoedslError
from moedsl.hf.files import HF_CONFIG, TOKENIZER_FILES, copy_side_files

from . import checkpoint as ckpt
from . import report
from .compile import use_compile
from .cpu import keep_freed_memory, release_freed_memory
from .cudagraph import GraphedForward, GraphedTrainStep
from .data import make_source, packed, spec_data
from .diagnose import first_nonfinite
from .distill import load_teacher, spec_teacher
from .evaluate import held_out_images
from .faults import inject_fault
from .grads import DEFAULT_BUCKET_MB
from .load import fill
from .metrics import reduce_step, step_figures
from .optim import lr_at
from .preflight import check_run
from .progress import Reporter
from .recompute import apply_recompute
from .replicate import Replicator
from .resolve import resolve
from .step import TrainStep, masked_count, task_loss

PLOT_EVERY_S = 30.0  # loss.png is redrawn at an evaluation at most this often (a redraw takes ~0.2 s)


@dataclass
class RunOptions:
    """Everything a run needs besides the spec; ``from_spec`` fills it from the spec's ``train``."""

    steps: int
    batch: int  # global batch, in sequences; each rank takes batch / world of them
    seq: int
    lr: float  # peak learning rate
    min_lr: float  # the cosine decay ends at min_lr · lr
    warmup: int  # linear warm-up steps
    weight_decay: float
    grad_clip: float  # max global gradient norm (0: no clipping)
    seed: int  # weights, data and routing noise
    data: str
    eval_every: int
    eval_batches: int
    checkpoint_every: Optional[int]
    out: Path = Path("runs/run")
    resume: bool = False  # True: the latest checkpoint under out; a path: that checkpoint
    device: str = "auto"  # auto | cpu | cuda
    cuda_graphs: str = "auto"  # auto | on | off
    progress: bool = True
    timeout: float = 300.0  # seconds a collective may wait before the run fails
    log_every: int = 1  # figures read (a collective, a host sync) every N steps, and at eval, checkpoint, last
    grad_sync: str = "bucketed"  # bucketed (all-reduces overlap backward) | after_backward (runtime/grads.py)
    bucket_mb: float = DEFAULT_BUCKET_MB  # bucketed: a bucket's size cap, MiB
    keep_memory: bool = True  # on a CPU: malloc keeps freed memory (runtime/cpu.py)
    init: Optional[str] = None  # an import folder (moedsl import): the initial weights
    from_scratch: bool = False  # an import's spec without --init: random weights on purpose (runtime/preflight.py)
    compile: str = "auto"  # auto | on | off: torch.compile the dense segments (runtime/compile.py)
    pack: str = "none"  # none | documents: the model gets Batch.documents (attention and positions per document)
    distill_teacher: Optional[str] = None  # distillation (runtime/distill.py): the teacher, anything resolve reads
    distill_alpha: float = 0.25  # the soft targets' weight (1 - alpha: the labels')
    distill_temperature: float = 1.0  # T of both softmaxes; the soft term is scaled by T²
    recompute: str = "none"  # none | experts | layers: activations recomputed in backward (runtime/recompute.py)
    micro_batches: int = 1  # M: each rank's batch in M micro-batches, gradients accumulated (runtime/step.py)
    shard: str = "none"  # none | optimizer | full: training states split over data-parallel groups (runtime/shard.py)

    @staticmethod
    def from_spec(spec, **overrides) -> "RunOptions":
        t = spec.train
        base = dict(steps=t.steps, batch=t.batch_size, seq=t.seq_len, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup,
                    weight_decay=t.weight_decay, grad_clip=t.grad_clip, seed=t.seed, data=spec_data(spec),
                    eval_every=t.eval_every, eval_batches=t.eval_batches, checkpoint_every=t.checkpoint_every,
                    pack=t.pack, recompute=t.recompute, micro_batches=t.micro_batches, shard=spec.placement.shard)
        if t.distill is not None:
            base.update(distill_teacher=spec_teacher(spec), distill_alpha=t.distill.alpha,
                        distill_temperature=t.distill.temperature)
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
    skipped_steps: int = 0  # float16: steps skipped because the scaled gradient overflowed
    losses: list = field(default_factory=list)
    eval_accuracy: Optional[float] = None  # image classifiers: held-out accuracy at the last evaluation
    loss_plot: Optional[str] = None  # loss.png: train and held-out loss over the whole run's steps
    balancedness: dict = field(default_factory=dict)  # layer -> mean / max tokens per EP rank, last logging step


class Trainer:
    """Trains ``spec`` on this rank (one of WORLD_SIZE launched by torchrun or ``moedsl run --nproc``,
    or alone).

    Building it: (1) picks the device and joins the process group, (2) builds this rank's
    share of the model, (3) makes the fused AdamW, the gradient sync, the loss scale
    (float16) and the one ``TrainStep`` both modes run, (4) decides on CUDA graphs and
    (5) opens the data source. Nothing is written to disk before ``fit``. With
    ``placement.replication`` it also places the experts (runtime/replicate.py) by ``policy``
    (``(load, LayerInfo) -> phy2log``; default: the spec's policy).
    """

    def __init__(self, spec, options: RunOptions, layout: str = "auto", policy=None):
        o = self.options = options
        self.spec = spec
        self.rank, self.world, local_rank = _env()
        self.device = _device(o.device, local_rank)
        if self.device.type == "cpu" and o.keep_memory:
            keep_freed_memory()  # no page faults on every step's activations
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=o.timeout))
        if o.batch % self.world:
            raise MoedslError(f"batch {o.batch} does not split over {self.world} processes")
        torch.manual_seed(o.seed + self.rank)
        self.say = Reporter(self.rank, o.progress)
        self.model = build_model(spec, device=self.device, rank=self.rank, world_size=self.world, seed=o.seed,
                                 dtype=torch.float32, layout=layout, init=not o.init)
        if o.init:  # each rank reads only the experts it holds, memory-mapped (moedsl/hf/weights.py)
            fill(self.model, resolve(o.init), spec)
        apply_recompute(self.model, o.recompute)  # before compiling: layers refuses --compile on (preflight)
        # dense segments compiled; not with recompute: layers (each sublayer under checkpoint), nor under
        # FSDP (shard full), whose hooks gather each layer's parameters
        # (not an encoder-decoder's: its step runs eagerly until its compilation is checked)
        self.compile_on = use_compile(self.model, o, self.device, self.say, self.world) \
            if o.recompute != "layers" and (o.shard != "full" or self.world == 1) and not spec.encoder_decoder \
            else False
        self.amp = dtypes.autocast_dtype(spec.model.dtype)  # None: float32, no autocast
        self.graphs = _use_cuda_graphs(o, self.device, self.model.compiled, self.say, spec.encoder_decoder)
        replicating = spec.placement.replication is not None and self.model.compiled.mesh.expert_parallel > 1
        if self.graphs and replicating:  # a captured step would keep the dispatch tables of its capture
            self.say.once("placement.replication moves experts between steps: CUDA graphs off")
            self.graphs = False
        # distillation: the teacher built once here, whole on every rank (runtime/distill.py)
        self.teacher = None if not o.distill_teacher else \
            load_teacher(o.distill_teacher, self.device, o.distill_alpha, o.distill_temperature)
        self.train_step = TrainStep.for_run(self.model, spec, o, self.rank, self.world, self.amp,
                                            capturable=self.graphs, teacher=self.teacher)
        ts = self.train_step
        self.lr, self.opt, self.sync, self.loss_scale = ts.lr, ts.opt, ts.sync, ts.loss_scale
        # placement.replication (runtime/replicate.py): experts placed for an even load now, moved
        # every N steps; ``policy`` (load, LayerInfo) -> phy2log replaces the spec's policy (tests)
        self.replicator = Replicator.for_run(ts, spec, self.rank, policy) if replicating else None
        self.sync = ts.sync
        self.source = make_source(spec, o.data, o.seed, init=o.init)
        self._graphed = None  # the captured step, made at the first step in graph mode
        self._eval_graph = None
        self.start_step = 0
        self.eval_accuracy: Optional[float] = None  # image classifiers: the last evaluation's accuracy

    # ------------------------------------------------------------------ one step

    @property
    def captured(self) -> bool:
        """Whether steps replay a captured CUDA graph (known after the first step)."""
        return self._graphed is not None

    def step(self, batch, lr: float):
        """One training step on this rank's ``batch`` at learning rate ``lr``: the ``StepOutputs``
        (device tensors). A step whose gradient is not finite updates nothing (``skipped``)."""
        self.lr.fill_(lr)
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        mask = None if batch.loss_mask is None else batch.loss_mask.to(self.device, non_blocking=True)
        documents = packed(batch, self.options.pack, self.source, self.device)  # None unless --pack (no CUDA graphs then)
        seq2seq = self._seq2seq(batch)  # an encoder-decoder's (decoder inputs, source mask): eager
        if self.graphs and self._graphed is None:
            self._graphed = self._capture(inputs, targets, mask)
        if self._graphed is not None:
            return self._graphed(inputs, targets, mask)
        self.opt.zero_grad(set_to_none=True)  # the last step's gradients stay readable until now
        return self.train_step(inputs, targets, mask, documents, *seq2seq)

    def _seq2seq(self, batch) -> tuple:
        """``batch``'s (decoder inputs, source mask) on the device for an encoder-decoder; () for a
        model of one stack. An encoder-decoder fed plain token rows is refused in one line."""
        args = batch.model_args(self.device)
        if self.spec.encoder_decoder and not args:
            raise MoedslError(f"{self.spec.name} is an encoder-decoder: it trains on source/target pairs, but the "
                              f"data {self.source.name} gives plain token rows (no decoder inputs)")
        return args

    def _capture(self, inputs, targets, mask=None):
        try:
            graphed = GraphedTrainStep(self.train_step, inputs, targets, mask)
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back, or fail in `on` mode
            if self.options.cuda_graphs == "on":
                raise MoedslError(f"--cuda-graphs on: capturing the training step failed: {e}") from e
            self.say.once(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); running eager")
            self.graphs = False
            return None
        self.say.once("CUDA graphs on: the training step is captured and replayed")
        return graphed

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over ``eval_batches`` batches, averaged over ranks (with CUDA graphs:
        a captured forward)."""
        o, model = self.options, self.model
        if self.spec.model.input == "image":  # the whole held-out set, once; its accuracy too
            h = held_out_images(model, self.spec, self.source, o.batch, self.rank, self.world, self.device, self.amp)
            self.eval_accuracy = h.accuracy
            return h.loss
        was = model.training
        model.eval()
        total = 0.0
        for i in range(o.eval_batches):
            b = self.source.batch(i, o.batch, o.seq, self.rank, self.world, split="eval")
            inputs = b.inputs.to(self.device)
            documents = packed(b, o.pack, self.source, self.device)
            if self.graphs:
                if self._eval_graph is None:
                    self._eval_graph = GraphedForward(model, inputs, self.amp)
                out = self._eval_graph(inputs)
            else:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    args = self._seq2seq(b) + (() if documents is None else (documents,))
                    out = model(inputs, *args)
            mask = None if b.loss_mask is None else b.loss_mask.to(self.device)  # instruction data: the answers
            count = None if mask is None else masked_count(mask, self.world)
            total += float(task_loss(self.spec, out, b.targets.to(self.device), mask, count))
        model.train(was)
        return _mean(total / o.eval_batches, self.world, self.device)

    # ------------------------------------------------------------------ checkpoints

    def _extra(self) -> dict:
        """This rank's RNG states (dropout) and the loss scale; routing noise is counter-based and
        lives in the gates' buffers."""
        extra = {f"rng_cpu_{self.rank}": torch.get_rng_state()}
        if torch.cuda.is_available():
            extra[f"rng_cuda_{self.rank}"] = torch.cuda.get_rng_state()
        if self.loss_scale is not None:
            extra.update(self.loss_scale.state())
        if self.replicator is not None:  # placement.replication: this rank's load window
            extra.update(self.replicator.window_state())
        return extra

    def resume(self, where) -> int:
        """Load ``where`` (True: the latest checkpoint under ``out``; else a checkpoint's path) into
        the model, the optimizer and the RNGs; returns the step to continue from."""
        ckpt_dir = Path(self.options.out) / "checkpoints"
        meta = ckpt.resume(ckpt_dir, where, self.model, self.opt, self.spec, self._extra(), self.rank, self.world,
                           options=self.options)  # the newest whole one; notes name what was skipped or changed
        for note in meta["notes"]:
            self.say.once(note)
        restored = meta["extra"]
        if f"rng_cpu_{self.rank}" in restored:
            torch.set_rng_state(restored[f"rng_cpu_{self.rank}"])
        if torch.cuda.is_available() and f"rng_cuda_{self.rank}" in restored:
            torch.cuda.set_rng_state(restored[f"rng_cuda_{self.rank}"])
        if self.loss_scale is not None:
            for k, v in self.loss_scale.state().items():
                if k in restored:
                    v.copy_(restored[k])
        self.start_step = int(meta["step"])
        self._restore_placement(meta)
        self.say.once(f"resumed from {meta['path']} at step {self.start_step}")
        return self.start_step

    def _restore_placement(self, meta: dict) -> None:
        """placement.replication: the checkpoint's expert placement and load windows, where it was
        written by a run like this one (runtime/replicate.py ``restore``); else the experts stay
        where this run placed them (the checkpoint is logical) and one line says so."""
        record, name = meta.get("replication"), Path(meta["path"]).name
        if self.replicator is not None:
            why = "it records none (saved without placement.replication)" if record is None else \
                self.replicator.restore(record, meta["extra"], self.start_step)
            self.sync = self.train_step.sync
            if why is not None:
                self.say.once(f"placement.replication: the placement and load window of {name} are not restored "
                              f"({why}): the experts start from this run's initial placement, the window empty")
        elif record is not None:
            now = "no placement.replication" if self.spec.placement.replication is None else \
                "one expert-parallel rank"
            self.say.once(f"placement.replication: {name} was saved with replicated experts over "
                          f"{record.get('expert_parallel')} expert-parallel ranks; this run has {now}: the experts "
                          "load logically, their placement and load window are reset")

    def save(self, step: int) -> Path:
        more = None if self.replicator is None else {"replication": self.replicator.record(step)}
        return ckpt.save(Path(self.options.out) / "checkpoints", step, self.model, self.opt, self.spec, self._extra(),
                         self.rank, self.world, options=self.options, more=more)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Summary:
        """Train from ``start_step`` (or the checkpoint ``options.resume`` names) to ``options.steps``:
        metrics to ``out/metrics.jsonl`` (rank 0), held-out loss every ``eval_every`` steps,
        checkpoints every ``checkpoint_every`` steps and at the end, the expert-load plot, and
        the loss plot (``loss.png``: at evaluations as the run goes, and at the end)."""
        o, spec, rank, world = self.options, self.spec, self.rank, self.world
        if o.resume:
            self.resume(o.resume)
        start = self.start_step
        out_dir = Path(o.out)
        metrics_path = out_dir / "metrics.jsonl"
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            _trim_metrics(metrics_path, start)
            if o.init:  # what `moedsl export` of this run restores: the source config, the tokenizer
                copy_side_files(Path(o.init), out_dir, (HF_CONFIG,) + TOKENIZER_FILES)
            elif self.source.tokenizer is not None:  # the tokenizer its ids came from: generate, eval and
                _keep_tokenizer(self.source.tokenizer, out_dir)  # inspect of the run read text through it
        _verify_collectives(self.model, world)
        self.say.once(f"{spec.name}: {world} process(es) on {self.device.type}, batch {o.batch} × {o.seq}, "
                      f"steps {start}..{o.steps}, data {self.source.name}, {spec.model.dtype}"
                      f"{', loss scaling' if self.loss_scale is not None else ''}"
                      f"{f', training states sharded ({o.shard})' if o.shard != 'none' and world > 1 else ''}"
                      f"{', CUDA graphs' if self.graphs else ''}")
        for note in self.source.notes(o.seq):  # what the data is (instruction data: how many examples were cut)
            self.say.once(note)
        log = open(metrics_path, "a") if rank == 0 else None
        losses, last_ckpt, eval_loss, first, skipped = [], None, None, None, 0
        balance = dropped = float("nan")
        balancedness: dict = {}
        t0, tokens = time.perf_counter(), 0
        bar = self.say.progress(o.steps, start)
        # the steps since the last logging step: their figures stay on the device until it
        history, since, window_t = [], start, None
        plotted = None  # when loss.png was last drawn (rank 0)
        try:
            for step in range(start, o.steps):
                inject_fault(step, rank, self.model)
                b = self.source.batch(step, o.batch, o.seq, rank, world)
                window_t = time.perf_counter() if window_t is None else window_t
                lr = lr_at(step, o)
                outputs = self.step(b, lr)
                history.append(step_figures(outputs))
                migrating = self.replicator is not None and self.replicator.observe(step, outputs.router_stats)
                tokens += o.batch * o.seq
                evaluating = (step + 1) % o.eval_every == 0 or step + 1 == o.steps
                saving = bool(o.checkpoint_every) and (step + 1) % o.checkpoint_every == 0 and step + 1 < o.steps
                if not (evaluating or saving or migrating or (step + 1) % o.log_every == 0):
                    continue  # no collective and no host read: the next logging step reads this one
                # a logging step: every step since the last one checked (a checkpoint holds checked weights)
                m = reduce_step(outputs, world, history, self.model.compiled.placements,
                                rank % self.model.compiled.mesh.expert_parallel)
                for at, f in enumerate(m.steps, start=since):
                    if f.skipped or not (math.isfinite(f.loss) and math.isfinite(f.aux_loss)):
                        if not self._overflow(f):
                            raise self._nonfinite_error(f, at, step, last_ckpt)
                        skipped += 1
                        self.say.once("float16: a step's scaled gradient overflowed; the step was skipped and the "
                                      "loss scale halved (this repeats quietly; metrics.jsonl marks such steps)")
                    first = f.loss if first is None else first
                    losses.append(f.loss)
                balance, dropped, balancedness = m.balance, m.dropped, m.balancedness
                dt = time.perf_counter() - window_t  # the steps since the last logging step, this read included
                row = {"step": step + 1, "loss": m.loss, "aux_loss": m.aux_loss, "lr": lr, "grad_norm": m.grad_norm,
                       "tokens_per_s": len(m.steps) * o.batch * o.seq / dt, "balance": balance, "dropped": dropped,
                       "balancedness": m.balancedness, "expert_load": m.expert_load, "time": time.time()}
                if migrating:  # after this step's figures: its balancedness is the old placement's
                    row["replication"] = self.replicator.migrate(step + 1)
                    self.sync = self.train_step.sync
                history, since, window_t = [], step + 1, None
                if self.loss_scale is not None:
                    row.update(loss_scale=float(self.loss_scale.scale), skipped=m.skipped)
                if evaluating:
                    eval_loss = self.evaluate()
                    if self.device.type == "cpu" and o.keep_memory:
                        release_freed_memory()  # the evaluation's own shapes: not kept past it
                    row.update(eval_loss=eval_loss, eval_ppl=_ppl(spec, eval_loss))
                    if self.eval_accuracy is not None:
                        row.update(accuracy=self.eval_accuracy)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    redraw = plotted is None or time.perf_counter() - plotted >= PLOT_EVERY_S
                    if evaluating and redraw and step + 1 < o.steps:  # the last step's: drawn below
                        # from the whole file: a resumed run's steps before its checkpoint too
                        report.plot_losses(metrics_path, out_dir / "loss.png", spec.name)
                        plotted = time.perf_counter()
                bar(step + 1, m.loss, row["tokens_per_s"], balance, eval_loss, accuracy=self.eval_accuracy)
                if saving:
                    last_ckpt = self.save(step + 1)
            if o.steps > start:
                last_ckpt = self.save(o.steps)
        finally:
            bar(None, None, None, None, None)
            if log is not None:
                log.close()
        seconds = time.perf_counter() - t0
        plot = loss_plot = None
        if rank == 0:
            plot = report.plot_expert_load(metrics_path, out_dir / "expert_load.png", spec.name)
            loss_plot = report.plot_losses(metrics_path, out_dir / "loss.png", spec.name)
        return Summary(spec=spec.name, steps=o.steps, tokens=tokens, seconds=seconds,
                       tokens_per_s=tokens / max(seconds, 1e-9), train_loss=losses[-1] if losses else float("nan"),
                       eval_loss=eval_loss, eval_ppl=_ppl(spec, eval_loss), balance=balance, dropped=dropped,
                       first_loss=first if first is not None else float("nan"),
                       checkpoint=str(last_ckpt) if last_ckpt else None, metrics=str(metrics_path),
                       plot=str(plot) if plot else None, world=world, cuda_graphs=self.graphs,
                       skipped_steps=skipped, losses=losses, eval_accuracy=self.eval_accuracy,
                       loss_plot=str(loss_plot) if loss_plot else None, balancedness=balancedness)

    def _overflow(self, m) -> bool:
        """A float16 step whose loss was finite but whose scaled gradient overflowed: expected now
        and then with loss scaling, and handled (skipped, scale halved)."""
        return self.loss_scale is not None and math.isfinite(m.loss) and math.isfinite(m.aux_loss)

    def _nonfinite_error(self, f, at: int, step: int, last_ckpt) -> MoedslError:
        """Step ``at`` (0-based) had a non-finite loss or gradient (``f``: its figures), found at the
        logging step ``step``; where it came from is looked for on ``at``'s batch (a function of
        the step), with the weights as they are now."""
        o = self.options
        batch = self.source.batch(at, o.batch, o.seq, self.rank, self.world)
        where = first_nonfinite(self.model, batch.inputs.to(self.device), self.amp, batch.model_args(self.device))
        what, value = next((w, v) for w, v in (("loss", f.loss), ("aux loss", f.aux_loss),
                                                ("gradient norm", f.grad_norm)) if not math.isfinite(v))
        found = "" if at == step else f" (read at step {step + 1}: --log-every {o.log_every})"
        stopped = "The run stopped before updating the weights" if at == step else \
            "That step updated nothing, and the run stopped"
        return MoedslError(f"the {what} is {value} at step {at + 1}{found}: the first non-finite values come from "
                           f"{where}. {stopped}" + (f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""))


def run(spec, o: RunOptions) -> Summary:
    """Train ``spec`` on this rank: every reason it cannot start refused first (runtime/preflight.py;
    the CLI has checked already, a run from torchrun or Python has not), then ``Trainer(spec, o).fit()``."""
    check_run(spec, o, _env()[1])
    return Trainer(spec, o).fit()


def _ppl(spec, eval_loss: Optional[float]) -> Optional[float]:
    if eval_loss is None or spec.model.input != "tokens":
        return None
    return math.exp(min(eval_loss, 50))


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


def _use_cuda_graphs(o: RunOptions, device, compiled, say, encoder_decoder: bool = False) -> bool:
    if o.cuda_graphs == "off":
        return False
    why = None
    if device.type != "cuda":
        why = "the run is on the CPU"
    elif encoder_decoder:  # the captured step copies in inputs and targets only
        why = "an encoder-decoder's step (decoder inputs, source mask) runs eagerly"
    elif o.pack == "documents":  # each batch's own masks; the captured step copies only inputs and targets in
        why = "--pack documents builds each batch's attention masks from its documents"
    elif o.shard != "none":  # the all-gathers of ZeRO and FSDP2 have not been captured and checked on a GPU
        why = f"placement.shard {o.shard} runs the step eagerly"
    elif o.distill_teacher:  # the captured step holds the student's graph only
        why = "distillation runs the teacher's forward in each step"
    elif o.micro_batches > 1 or o.recompute != "none":  # not captured on a GPU yet: eager until it is checked
        why = (f"train.micro_batches {o.micro_batches}" if o.micro_batches > 1 else
               f"train.recompute {o.recompute}") + " runs the step eagerly (its capture is not checked on a GPU yet)"
    elif not compiled.static.capturable:
        why = f"{', '.join(compiled.static.dynamic_layers)} have data-dependent shapes (dropless or routed as one batch)"
    if why is None:
        return True
    if o.cuda_graphs == "on":
        raise MoedslError(f"--cuda-graphs on: cannot capture, {why}")
    say.once(f"CUDA graphs off: {why}; running eager")
    return False


def _keep_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    """Copy the tokenizer a run's token ids come from (the spec's ``model.tokenizer`` or the prepared
    data's) into the run folder as tokenizer.json, with the tokenizer_config.json and chat template
    beside it, where ``moedsl generate``, ``eval`` and ``inspect`` of the run look for it."""
    if tokenizer.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    copy_side_files(tokenizer.parent, out_dir, ("tokenizer_config.json", "chat_template.jinja"))


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


def _verify_collectives(model, world: int) -> None:
    """Every rank must issue the same collectives in the same order; compare digests first."""
    if world == 1:
        return
    mine = signature_digest(model.graph)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise MoedslError(f"ranks compiled different collective sequences ({everyone}): refusing to start a run "
                          "that would hang")


__all__ = ["RunOptions", "Summary", "Trainer", "run", "lr_at", "task_loss"]
