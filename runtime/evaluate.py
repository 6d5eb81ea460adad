"""Held-out evaluation of a classifier over images, and ``moedsl eval``: a trained run's
checkpoint evaluated with every token-choice gate's evaluation capacity factor set to C, or to
each of a sweep of factors in turn on one loaded model (0: dropless).

V-MoE (Riquelme et al. 2021, §4.1 and Figure 6) trains at one capacity and lowers it at
inference: with batch-prioritized routing the tokens dropped first are those the router
is least sure of, and accuracy degrades gracefully. The capacity of a token-choice gate is
a compute budget that never changes the weights (``ckpt_compat.training_only``), so the gates
of one loaded model take each factor in turn (``inspect.eval_capacity``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moedsl import dtypes
from moedsl.errors import UserError

from .data import make_source, pack_problems, packed, source_problems, spec_data
from .inspect import capacity_factors, eval_capacity
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

def evaluate(model, capacity_factor=None, checkpoint: Optional[str] = None,
             data: Optional[str] = None, batch: Optional[int] = None, seq: Optional[int] = None,
             batches: Optional[int] = None, pack: Optional[str] = None):
    """Evaluate a trained model on its held-out data at inference capacity factor ``capacity_factor``.

    ``model``: a ``moedsl run`` output folder (its latest checkpoint; the spec stored with it), an
    import folder, or a spec (path, YAML text or dict) with ``checkpoint``. Every token-choice
    gate's evaluation capacity factor is set to ``capacity_factor`` (``inspect.capacity_factors``,
    the rule ``moedsl inspect`` follows too: None the spec's own, 0 dropless, a dropless gate given
    a factor > 0 drops past it). A list of factors is a sweep: the model is loaded once and
    evaluated at each in turn, and a list of results comes back. The held-out set is the run's
    own evaluation: its data, seed, batch, sequence length, number of eval batches, packing
    (``pack``: documents, each row's documents attended apart) and autocast dtype, as the
    checkpoint recorded them (meta.json "eval"); ``data``, ``batch``, ``seq``, ``batches`` and
    ``pack`` override them. An import has no run, so no held-out data of its own: it is
    evaluated on the held-out part of its spec's ``train.data`` ("data_from": "spec"). On one
    process, as trained (the capacity factor left alone), the loss is the run's last
    ``eval_loss`` for that checkpoint: the same batches through the same forward, summed in the
    same order. A run of several processes evaluated each rank's share with a capacity of its
    own, which one process cannot repeat. Text (a prepared folder, text as bytes) also gives bits
    per byte, which compares models whose tokenizers differ. Returns ``{"loss", "bits_per_byte"
    (None where the tokens are not text), "accuracy" (image classifiers, else None), "dropped",
    "examples", "capacity_factor", "gates", "checkpoint", "step", "data", "data_from", "seq",
    "batch", "dtype"}`` (a list of them for a list of factors)."""
    factors = capacity_factors(capacity_factor)
    weights = resolve(model, checkpoint)
    meta, spec = weights.meta, weights.spec
    # the run's evaluation as recorded; a checkpoint from before that record: its trajectory, then the spec
    ran = {**(meta.get("train") or {}), **(meta.get("eval") or {})}
    seed = int(ran.get("seed", spec.train.seed))
    data_from = "option" if data else "run" if ran.get("data") else "spec"
    data = data or ran.get("data") or spec_data(spec)
    batch = batch or int(ran.get("batch", spec.train.batch_size))
    seq = seq or int(ran.get("seq", spec.train.seq_len))
    batches = batches or int(ran.get("eval_batches", spec.train.eval_batches))
    dtype = ran.get("dtype", spec.model.dtype)
    pack = pack or ran.get("pack", spec.train.pack)
    amp = dtypes.autocast_dtype(dtype)  # the Trainer's: float32 weights, the forward under autocast
    origin = weights.origin  # where the tokenizer.json is when the spec names none, and the import the run came from
    found = source_problems(spec, data, seq, init=origin) + pack_problems(spec, data, pack, origin)
    if found:
        raise UserError(found[0])
    net = build(weights, spec, seed=seed, dtype=torch.float32)
    source = make_source(spec, data, seed, init=origin)
    results = []
    for factor in factors:
        with eval_capacity(net, factor) as gates:
            result = {"spec": spec.name, "capacity_factor": factor, "gates": gates, "checkpoint": str(weights.path),
                      "step": int(meta.get("step", 0)), "data": data, "data_from": data_from, "seq": seq,
                      "batch": batch, "dtype": dtype}
            if spec.model.input == "image":
                h = held_out_images(net, spec, source, batch, amp=amp)
                result.update(loss=h.loss, bits_per_byte=None, accuracy=h.accuracy, dropped=h.dropped,
                              examples=h.examples)
            else:
                result.update(_held_out_sequences(net, spec, source, batch, seq, batches, amp, pack))
        results.append(result)
    return results if isinstance(capacity_factor, (list, tuple)) or len(results) > 1 else results[0]


@torch.no_grad()
def _held_out_sequences(model, spec, source, batch: int, seq: int, batches: int, amp, pack: str = "none") -> dict:
    """Token or vector models: the mean held-out loss over ``batches`` batches of ``batch`` × ``seq``
    (``Trainer.evaluate`` on one process: the forward under autocast ``amp``, the loss in float32,
    the batches' losses summed in order), the dropped fraction, and for text the bits per byte:
    the nats of every row over ln 2 and the UTF-8 bytes its tokens stand for (a row of a prepared
    folder: seq × the eval split's bytes / tokens, from its manifest; text as bytes: seq). For one
    folder that is loss × tokens / (bytes · ln 2); a mixture weighs each folder by the rows drawn
    from it. ``pack`` documents: each batch's documents passed."""
    model.eval()
    total, dropped, assigned, nats, text_bytes = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(batches):
        b = source.batch(i, batch, seq, split="eval")
        documents = packed(b, pack, source)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            out = model(b.inputs, *b.model_args(), *(() if documents is None else (documents,)))
        total += float(task_loss(spec, out, b.targets, b.loss_mask))  # instruction data: the answers' tokens
        per_token = source.bytes_per_token(i, range(batch), seq, "eval")  # [B] bytes per token of each row
        if per_token is not None:
            logits = out.output.float()  # [B, T, V]
            nats += float(F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="sum"))
            text_bytes += float(per_token.sum()) * b.targets.shape[1]
        for s in out.router_stats:
            dropped += float(s.dropped)
            assigned += float(s.assignments)
    bpb = nats / (text_bytes * math.log(2)) if text_bytes else None
    return {"loss": total / max(batches, 1), "bits_per_byte": bpb, "accuracy": None,
            "dropped": dropped / max(assigned, 1.0), "examples": batches * batch}
