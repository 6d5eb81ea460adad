"""What a rank holds during training, measured from its tensors: the check of the plan's
per-rank memory (``moedsl.compiler.memory_plan``).

- ``held_bytes(model, optimizer)``: the bytes of the parameters, their gradients and the
  optimizer's state on this rank, counted from the tensors themselves. A DTensor (a sharded
  parameter or state, FSDP2's or a distributed optimizer's) counts its local piece
  (``to_local()``); a storage is counted once however many tensors view it (tied weights,
  gradients that are views of one flat buffer), with all of its bytes (a padded shard's too).
- ``step_peak(step, model, optimizer)``: the memory of one training step at its peak, by
  category, from torch's ``MemTracker`` (torch.distributed._tools.mem_tracker): a
  TorchDispatchMode that sees every tensor an op makes, follows each storage's lifetime
  through a weak reference, and sorts it as parameter, gradient, optimizer state, activation
  (made in the forward) or temporary (made in the backward). Chosen over counting what
  ``saved_tensors_hooks`` packs: those hooks do not see the tensors held inside a
  ``torch.utils.checkpoint`` region nor what its recomputation makes during the backward,
  exactly what ``train.recompute`` changes; the tracker sees the live bytes at every op, on
  a CPU as on a GPU, unlike the allocator's statistics (CUDA only).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Held:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict:
        return asdict(self)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's piece on this rank; any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _count(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` not in ``seen`` (which they join)."""
    n = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        st = _local(t).untyped_storage()
        key = (st.device, st.data_ptr())
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        n += st.nbytes()
    return n


def held_bytes(model: torch.nn.Module, optimizer=None, where=None) -> Held:
    """This rank's parameter, gradient and optimizer-state bytes, each storage once; ``where(name)``:
    only the parameters (and their gradients and states) whose name it accepts."""
    seen: set = set()
    params = [q for name, q in model.named_parameters() if where is None or where(name)]
    p = _count(params, seen)
    g = _count((q.grad for q in params), seen)
    o = 0
    if optimizer is not None:
        o = _count((v for q in params for v in optimizer.state.get(q, {}).values()), seen)
    return Held(params=p, grads=g, optimizer=o)


@dataclass
class StepPeak:
    """Bytes live at the peak of a training step, by category (``MemTracker``'s)."""

    params: int
    grads: int
    optimizer: int
    activations: int  # made in the forward and alive at the peak
    temporary: int  # made in the backward (a recomputed layer's activations among them)
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


def step_peak(step, model: torch.nn.Module, optimizer, device=None) -> StepPeak:
    """Run ``step()`` (a whole training step) under torch's MemTracker and return the bytes at
    its peak. ``model`` and ``optimizer`` are registered first, so their tensors are sorted as
    parameters, gradients and optimizer state."""
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(device or next(model.parameters()).device)
    mt = MemTracker()
    mt.track_external(model, optimizer)
    with mt:
        step()
    snap = mt.get_tracker_snapshot("peak").get(device, {})
    by = {getattr(k, "name", str(k)).lower(): int(v) for k, v in snap.items()}  # _MemRefType.ACT -> act
    return StepPeak(params=by.get("param", 0), grads=by.get("grad", 0), optimizer=by.get("opt", 0),
                    activations=by.get("act", 0), temporary=by.get("temp", 0), total=by.get("total", 0))


__all__ = ["Held", "held_bytes", "StepPeak", "step_peak"]
