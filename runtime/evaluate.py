"""Held-out evaluation of a classifier over images, and ``moedsl eval``: a trained run's
checkpoint evaluated with every capacity gate's evaluation capacity factor set to C.

V-MoE (Riquelme et al. 2021, §4.1 and Figure 6) trains at one capacity and lowers it at
inference: with batch-prioritized routing the tokens dropped first are those the router
is least sure of, and accuracy degrades gracefully. The capacity of a token-choice gate is
a compute budget that never changes the weights (``checkpoint.training_only``), so a
checkpoint loads into a model whose gates have another ``eval_capacity_factor``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moedsl.errors import UserError
from moedsl.kinds.gates import gate_type


@dataclass
class HeldOut:
    loss: float  # mean task loss over the held-out examples
    accuracy: Optional[float]  # classification: fraction of held-out images classified right
    dropped: float  # assignments dropped past capacity / assignments made, over every MoE layer
    examples: int  # held-out examples counted (the whole held-out set, once)


@torch.no_grad()
def held_out_images(model, spec, source, batch: int, rank: int = 0, world: int = 1, device="cpu",
                    amp=None) -> HeldOut:
    """Loss, accuracy and dropped fraction of ``model`` over the whole held-out set of an image
    ``source`` (``eval_steps`` batches of ``batch`` images; the rows past its end are masked),
    summed over ranks."""
    device = torch.device(device)
    was = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss sum, correct, examples, dropped, assignments
    for step in range(source.eval_steps(batch)):
        b = source.batch(step, batch, spec.train.seq_len, rank, world, split="eval")
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(b.inputs.to(device))
        logits, labels, mask = out.output.float().cpu(), b.targets, b.mask
        loss = F.cross_entropy(logits, labels, reduction="none")
        sums[0] += float(loss[mask].sum())
        sums[1] += float((logits.argmax(-1) == labels)[mask].sum())
        sums[2] += float(mask.sum())
        for s in out.router_stats:
            sums[3] += float(s.dropped)
            sums[4] += float(s.assignments)
    model.train(was)
    if world > 1:
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    n = max(float(sums[2]), 1.0)
    return HeldOut(loss=float(sums[0]) / n, accuracy=float(sums[1]) / n,
                   dropped=float(sums[3]) / max(float(sums[4]), 1.0), examples=int(sums[2]))


# ----------------------------------------------------------------------------- moedsl eval

def with_eval_capacity(spec, factor: float) -> tuple[dict, int]:
    """A copy of ``spec``'s data with ``eval_capacity_factor: factor`` in the gate (or hierarchy) of
    every MoE layer that has a capacity, and how many MoE layers that changes (a repeated item counts once
    per repetition). Expert choice is left
    alone: its capacity factor is its k (Zhou et al. 2022, §3.1), not a budget."""
    import copy

    data = copy.deepcopy(spec.data)
    done, layers = set(), 0
    for layer in spec.moe_layers:
        g = layer.config.gate
        if not g.has_capacity or not gate_type(g.type).capacity_is_budget:
            continue
        layers += 1
        if layer.path in done:
            continue
        node = data
        for part in layer.path:
            node = node[part]
        moe = node["moe"]
        moe["hierarchy" if "hierarchy" in moe else "gate"]["eval_capacity_factor"] = factor
        done.add(layer.path)
    return data, layers


def find_checkpoint(model: str, checkpoint: Optional[str]) -> tuple[Path, dict]:
    """The checkpoint to evaluate and its meta data: ``checkpoint`` if given, else the latest whole
    one of the run directory ``model``.

    Which folders of ``checkpoints/`` count and which of them is the newest whole one is
    ``checkpoint.newest_whole``, the rule ``moedsl.hf.weights.dcp_checkpoint`` uses too. What the
    two accept differs, so neither calls the other: here ``model`` is a run folder and only its
    ``checkpoints/`` is searched, and a named ``checkpoint`` must itself be a whole checkpoint
    folder, checked now (a user's mistake: exit 2). ``dcp_checkpoint`` also takes a run's
    ``checkpoints/`` folder or a checkpoint folder in place of a run, leaves a named checkpoint's
    wholeness to the load, and answers None rather than an error, so that its callers can try an
    import folder next."""
    from . import checkpoint as ckpt

    if checkpoint is not None:
        path = Path(checkpoint)
    else:
        run = Path(model)
        if not run.is_dir():
            raise UserError(f"{model}: not a run directory (give a `moedsl run` output folder, or a spec with "
                            "--checkpoint PATH)")
        path = ckpt.newest_whole(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        if path is None:
            raise UserError(f"{model}: no checkpoint under {run / 'checkpoints'}")
    why = ckpt.problem(path)
    if why is not None:
        raise UserError(f"checkpoint {path}: {why}")
    return path, ckpt.read_meta(path)


def evaluate(model, capacity_factor: Optional[float] = None, checkpoint: Optional[str] = None,
             data: Optional[str] = None,
             batch: Optional[int] = None) -> dict:
    """Evaluate a trained model on its held-out data at inference capacity factor ``capacity_factor``.

    ``model``: a ``moedsl run`` output folder (its latest checkpoint; the spec stored with it), or
    a spec (path, YAML text or dict) with ``checkpoint``. Every capacity gate's
    ``eval_capacity_factor`` is set to ``capacity_factor`` (None: the spec's own). ``data`` and
    ``batch`` default to the run's. Returns ``{"loss", "accuracy" (image
    classifiers, else None), "dropped", "examples", "capacity_factor", "gates", "checkpoint",
    "step"}``."""
    from moedsl.api import build_model, load_spec

    from . import checkpoint as ckpt
    from .data import make_source

    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and
                                            math.isfinite(capacity_factor) and capacity_factor > 0):
        raise UserError(f"--capacity-factor {capacity_factor}: must be a finite number > 0")
    is_run = isinstance(model, (str, Path)) and Path(model).is_dir()
    if not is_run and checkpoint is None:
        raise UserError(f"{model}: give a `moedsl run` output folder, or a spec with --checkpoint PATH")
    path, meta = find_checkpoint(str(model), checkpoint)
    base = load_spec(meta["spec_data"]) if is_run else load_spec(model)
    if capacity_factor is None:
        spec, gates = base, 0
    else:
        spec_data, gates = with_eval_capacity(base, float(capacity_factor))
        spec = load_spec(spec_data, source=base.source)
    train = meta.get("train") or {}
    seed = int(train.get("seed", spec.train.seed))
    data = data or train.get("data") or spec.train.data
    batch = batch or int(train.get("batch", spec.train.batch_size))
    net = build_model(spec, seed=seed, dtype=torch.float32)
    ckpt.load(path, net, None, spec)
    source = make_source(spec, data, seed)
    result = {"spec": spec.name, "capacity_factor": capacity_factor, "gates": gates, "checkpoint": str(path),
              "step": int(meta.get("step", 0)), "data": data}
    if spec.model.input == "image":
        h = held_out_images(net, spec, source, batch)
        result.update(loss=h.loss, accuracy=h.accuracy, dropped=h.dropped, examples=h.examples)
        return result
    batches = int(train.get("eval_batches", spec.train.eval_batches))
    result.update(_held_out_sequences(net, spec, source, batch, batches))
    return result


@torch.no_grad()
def _held_out_sequences(model, spec, source, batch: int, batches: int) -> dict:
    """Token or vector models: the mean held-out loss over ``batches`` batches, and the dropped fraction."""
    from .step import task_loss

    model.eval()
    total, dropped, assigned = 0.0, 0.0, 0.0
    for i in range(batches):
        b = source.batch(i, batch, spec.train.seq_len, split="eval")
        out = model(b.inputs)
        total += float(task_loss(spec, out, b.targets))
        for s in out.router_stats:
            dropped += float(s.dropped)
            assigned += float(s.assignments)
    return {"loss": total / max(batches, 1), "accuracy": None, "dropped": dropped / max(assigned, 1.0),
            "examples": batches * batch}
