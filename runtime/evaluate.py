"""Held-out evaluation of a classifier over images, and ``moedsl eval``: a trained run's
checkpoint evaluated with every capacity gate's evaluation capacity factor set to C.

V-MoE (Riquelme et al. 2021, §4.1 and Figure 6) trains at one capacity and lowers it at
inference: with batch-prioritized routing the tokens dropped first are those the router
is least sure of, and accuracy degrades gracefully. The capacity of a token-choice gate is
a compute budget that never changes the weights (``ckpt_compat.training_only``), so a
checkpoint loads into a model whose gates have another ``eval_capacity_factor``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moedsl import dtypes
from moedsl.errors import UserError
from moedsl.kinds.gates import gate_type
from moedsl.spec_loader import load_spec

from .data import make_source
from .load import build
from .resolve import resolve
from .step import task_loss


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
    ``source`` (``eval_steps`` batches of ``batch`` images), summed over ranks. The rows past its
    end fill the last batch (wrapped around: every batch has the shape the routing groups and the
    other processes need) and count nowhere: not in the loss, and routed nowhere (``rows``), so
    they take no capacity and are not dropped."""
    device = torch.device(device)
    was = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss sum, correct, examples, dropped, assignments
    for step in range(source.eval_steps(batch)):
        b = source.batch(step, batch, spec.train.seq_len, rank, world, split="eval")
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):  # every rank passes rows
            out = model(b.inputs.to(device), b.mask.to(device))
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


def evaluate(model, capacity_factor: Optional[float] = None, checkpoint: Optional[str] = None,
             data: Optional[str] = None, batch: Optional[int] = None, seq: Optional[int] = None,
             batches: Optional[int] = None) -> dict:
    """Evaluate a trained model on its held-out data at inference capacity factor ``capacity_factor``.

    ``model``: a ``moedsl run`` output folder (its latest checkpoint; the spec stored with it), or
    a spec (path, YAML text or dict) with ``checkpoint``. Every capacity gate's
    ``eval_capacity_factor`` is set to ``capacity_factor`` (None: the spec's own). The held-out
    set is the run's own evaluation: its data, seed, batch, sequence length, number of eval
    batches and autocast dtype, as the checkpoint recorded them (meta.json "eval"); ``data``,
    ``batch``, ``seq`` and ``batches`` override them. On one process, as trained (the capacity
    factor left alone), the loss is the run's last ``eval_loss`` for that checkpoint: the same
    batches through the same forward, summed in the same order. A run of several processes
    evaluated each rank's share with a capacity of its own, which one process cannot repeat.
    Returns ``{"loss", "accuracy" (image classifiers, else None), "dropped", "examples",
    "capacity_factor", "gates", "checkpoint", "step", "data", "seq", "batch", "dtype"}``."""
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and
                                            math.isfinite(capacity_factor) and capacity_factor > 0):
        raise UserError(f"--capacity-factor {capacity_factor}: must be a finite number > 0")
    weights = resolve(model, checkpoint)
    meta, base = weights.meta, weights.spec
    if capacity_factor is None:
        spec, gates = base, 0
    else:
        spec_data, gates = with_eval_capacity(base, float(capacity_factor))
        spec = load_spec(spec_data, source=base.source)
    # the run's evaluation as recorded; a checkpoint from before that record: its trajectory, then the spec
    ran = {**(meta.get("train") or {}), **(meta.get("eval") or {})}
    seed = int(ran.get("seed", spec.train.seed))
    data = data or ran.get("data") or spec.train.data
    batch = batch or int(ran.get("batch", spec.train.batch_size))
    seq = seq or int(ran.get("seq", spec.train.seq_len))
    batches = batches or int(ran.get("eval_batches", spec.train.eval_batches))
    dtype = ran.get("dtype", spec.model.dtype)
    amp = dtypes.autocast_dtype(dtype)  # the Trainer's: float32 weights, the forward under autocast
    net = build(weights, spec, seed=seed, dtype=torch.float32)
    source = make_source(spec, data, seed)
    result = {"spec": spec.name, "capacity_factor": capacity_factor, "gates": gates, "checkpoint": str(weights.path),
              "step": int(meta.get("step", 0)), "data": data, "seq": seq, "batch": batch, "dtype": dtype}
    if spec.model.input == "image":
        h = held_out_images(net, spec, source, batch, amp=amp)
        result.update(loss=h.loss, accuracy=h.accuracy, dropped=h.dropped, examples=h.examples)
        return result
    result.update(_held_out_sequences(net, spec, source, batch, seq, batches, amp))
    return result


@torch.no_grad()
def _held_out_sequences(model, spec, source, batch: int, seq: int, batches: int, amp) -> dict:
    """Token or vector models: the mean held-out loss over ``batches`` batches of ``batch`` × ``seq``
    (``Trainer.evaluate`` on one process: the forward under autocast ``amp``, the loss in float32,
    the batches' losses summed in order), and the dropped fraction."""
    model.eval()
    total, dropped, assigned = 0.0, 0.0, 0.0
    for i in range(batches):
        b = source.batch(i, batch, seq, split="eval")
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            out = model(b.inputs)
        total += float(task_loss(spec, out, b.targets))
        for s in out.router_stats:
            dropped += float(s.dropped)
            assigned += float(s.assignments)
    return {"loss": total / max(batches, 1), "accuracy": None, "dropped": dropped / max(assigned, 1.0),
            "examples": batches * batch}
