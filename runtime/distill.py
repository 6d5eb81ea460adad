"""Knowledge distillation (``train.distill``, ``moedsl run --distill-teacher``): a student trained
on a teacher's soft targets and the labels, as Switch Transformer distils a sparse teacher into
a dense student (Fedus et al. 2021, §4.2: 0.25 of the teacher's probabilities, 0.75 of the
labels), with Hinton et al. 2015's temperature (§2).

    loss = alpha · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − alpha) · CE(z_s, labels)

per target token, averaged as the task loss averages (runtime/step.py ``task_loss``: the mean
over the tokens, or with instruction data the marked tokens ÷ ``count``), plus the student's
auxiliary losses as without distillation. z_t, z_s: the teacher's and the student's logits,
in float32. The T² keeps the soft term's gradient at the scale of the hard one's as T changes
(Hinton et al. 2015, §2: the soft gradients scale as 1/T²); KL rather than the teacher's
cross-entropy, so the soft term is 0 when the student matches the teacher (the two differ by
the teacher's entropy, a constant: the gradients are the same).

The teacher (``load_teacher``) is built once per process as on one process (``world 1``: all
its experts on this rank, no collective), in eval mode, with no gradient; each rank runs it on
its own share of the batch, so N processes train as one does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from moedsl.compiler import compile_graph
from moedsl.errors import UserError
from moedsl.hf.convert import IMPORT_SHARD
from moedsl.hf.files import TOKENIZER_FILES, copy_side_files, side_file, staged, write_sharded
from moedsl.hf.weights import mismatch, stored_tensors
from moedsl.spec_loader import load_spec

from .data import data_items
from .load import build
from .resolve import resolve
from .tokens import MANIFEST, TOKENIZER, model_tokenizer, tokenizer_sha256


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
              loss_mask: Optional[torch.Tensor] = None, count=None) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)) per row of the last dimension (logits
    [B, T, V] or [N, V]), in float32, averaged over the rows; with ``loss_mask`` [B, T] only the
    marked rows, summed and divided by ``count`` (as ``task_loss``)."""
    t = temperature
    log_q = F.log_softmax(student.float() / t, dim=-1)
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    each = (log_p.exp() * (log_p - log_q)).sum(-1).flatten() * (t * t)
    if loss_mask is None:
        return each.mean()
    mask = loss_mask.flatten()
    if count is None:
        count = mask.sum().clamp(min=1)
    return each.masked_fill(~mask, 0.0).sum() / count


def spec_teacher(spec) -> Optional[str]:
    """``train.distill.teacher`` with a relative path read from the spec file's folder, as the
    spec's ``train.data`` is (``--distill-teacher`` is read from the working directory)."""
    d = spec.train.distill
    if d is None:
        return None
    here = Path(d.teacher).expanduser()
    source = Path(spec.source) if getattr(spec, "source", None) else None
    if here.is_absolute() or source is None or not source.is_file():
        return d.teacher
    return str(source.parent / here)


class Teacher:
    """A teacher model and the mix of its soft targets with the labels (the module docstring)."""

    def __init__(self, model, alpha: float, temperature: float):
        self.model, self.alpha, self.temperature = model, float(alpha), float(temperature)

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's logits on the student's inputs, with no graph (the caller's autocast applies)."""
        out = self.model(inputs) if documents is None else self.model(inputs, documents)
        return out.output

    def loss(self, task: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             loss_mask: Optional[torch.Tensor] = None, count=None) -> torch.Tensor:
        """alpha · soft + (1 − alpha) · ``task`` (the labels' cross-entropy)."""
        soft = soft_loss(student, teacher, self.temperature, loss_mask, count)
        return self.alpha * soft + (1.0 - self.alpha) * task


def load_teacher(src, device, alpha: float, temperature: float) -> Teacher:
    """The teacher ``src`` names (anything ``resolve`` reads) on ``device``, built as on one process
    (every expert here, no collective: the teacher is replicated on each rank), float32 weights,
    eval mode, every parameter frozen."""
    model = build(resolve(src), device=device, dtype=torch.float32, rank=0, world=1)
    model.requires_grad_(False)
    return Teacher(model.eval(), alpha, temperature)


def teacher_problems(spec, teacher, init=None, data=None) -> list:
    """Why ``teacher`` cannot teach ``spec``'s model (``init``: the student's --init folder,
    ``data``: its --data), from the specs and tokenizer files alone, before any model is built:
    one line each. A model's tokenizer is its spec's or import's, else (the student) that of the
    prepared folders it trains on, else (the teacher) the copy its run folder keeps."""
    try:
        source = resolve(teacher)
    except UserError as e:
        return [f"--distill-teacher {teacher}: {e}"]
    t = source.spec
    if spec.model.input != "tokens" or t.model.input != "tokens":
        return [f"--distill-teacher {teacher}: distillation needs token models (the student's input is "
                f"{spec.model.input}, the teacher's {t.model.input})"]
    if t.model.vocab_size != spec.model.vocab_size:
        return [f"--distill-teacher {teacher}: the teacher's vocab_size {t.model.vocab_size} is not the student's "
                f"{spec.model.vocab_size}: both must read the same tokens"]
    mine = model_tokenizer(spec, init) or _data_tokenizer(data)
    theirs = model_tokenizer(t) or side_file(source.folders, TOKENIZER)  # a run keeps its copy in its folder
    if mine is None and theirs is None:
        return []
    if mine is None or theirs is None or tokenizer_sha256(mine) != tokenizer_sha256(theirs):
        def name(p):
            return "none (bytes)" if p is None else f"{p} (sha256 {tokenizer_sha256(p)[:12]})"
        return [f"--distill-teacher {teacher}: the teacher's tokenizer {name(theirs)} is not the student's "
                f"{name(mine)}: both must read the same tokens"]
    return []



def _data_tokenizer(data) -> Optional[Path]:
    """The tokenizer.json of the first prepared folder in ``data`` (all of them share one:
    ``data.source_problems`` holds them equal), or None."""
    try:
        items = data_items(data) if data else []
    except UserError:
        return None
    return next((Path(it.path) / TOKENIZER for it in items if (Path(it.path) / MANIFEST).is_file()), None)


# ---------------------------------------------------------------------------- distill-init

SKIPPED = (".experts.", ".gate.", ".expert_bias")  # the teacher's experts and routers: never copied


def distill_init(teacher, dense, out: Path, overwrite: bool = False) -> dict:
    """``moedsl distill-init``: the dense student ``dense`` (a spec file) initialised from
    ``teacher``'s non-expert weights (Switch Transformer, Fedus et al. 2021, §4.2): every tensor
    whose name and shape are in both (embedding, attention, norms, head, the dense ffn layers
    the teacher has) is copied; the teacher's experts and routers are skipped, and the student's
    tensors the teacher lacks keep the student's own initialisation (``train.seed``). A tensor of
    both whose shape differs is refused, named as ``run --init`` names it. Writes an import
    folder (spec.yaml, moedsl-format safetensors, the teacher's tokenizer files) that
    ``run --init`` and ``load_model`` take. Returns what was copied and skipped."""
    spec = load_spec(dense)
    why = teacher_problems(spec, teacher)
    if why:
        raise UserError(why[0].replace("--distill-teacher", "distill-init"))
    source = resolve(teacher)
    theirs = dict(stored_tensors(build(source, dtype=torch.float32)))  # the whole teacher, as on one process
    student = compile_graph(spec, 0, 1, device="cpu", seed=spec.train.seed, verify_ranks=False).module
    mine = dict(stored_tensors(student))
    copied, fresh = [], []
    for name, t in mine.items():
        have = theirs.get(name)
        if have is None or any(s in name for s in SKIPPED):
            fresh.append(name)
            continue
        bad = mismatch(spec, name, have.shape, t.shape)
        if bad:
            raise UserError(f"{source.path}: {name} is {bad}: the teacher's weights do not fit the student")
        copied.append(name)
    plan = [(n, tuple(mine[n].shape), torch.float32,
             (lambda n=n: (theirs[n] if n in copied else mine[n]).detach().to(torch.float32).contiguous()))
            for n in mine]
    skipped = sorted(set(theirs) - set(copied))
    with staged(out, overwrite) as tmp:
        files = write_sharded(tmp, plan, IMPORT_SHARD)
        (tmp / "spec.yaml").write_text(Path(dense).read_text())
        held = side_file(source.folders, TOKENIZER)  # the teacher's tokenizer, with its side files
        side = copy_side_files(held.parent, tmp, TOKENIZER_FILES) if held is not None else []
    return {"out": str(out), "copied": copied, "skipped": skipped, "fresh": fresh, "files": files, "side": side}


def init_summary(teacher, done: dict) -> str:
    """The one line ``moedsl distill-init`` prints."""
    def few(names):
        return ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")

    line = (f"distill-init {teacher} -> {done['out']}: copied {len(done['copied'])} teacher tensors; skipped "
            f"{len(done['skipped'])} (experts, routers: {few(done['skipped']) or 'none'})")
    if done["fresh"]:
        line += f"; {len(done['fresh'])} student tensors keep their own initialisation ({few(done['fresh'])})"
    return line
