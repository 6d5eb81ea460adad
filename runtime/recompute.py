"""Activation recomputation (``train.recompute``): what backward recomputes instead of keeping
it from forward, with ``torch.utils.checkpoint`` (non-reentrant).

    none     every activation backward needs is kept from forward
    experts  each MoE layer's experts keep only their input rows and recompute their hidden
             activations [.., h] (and a GLU's gate) in backward: the memory saving of Shazeer et
             al. 2017; routing, dispatch and combine keep theirs and are not recomputed
    layers   each sublayer (its norm, attention / MoE / FFN, dropout and residual add) keeps only
             its inputs and recomputes the rest in backward (Chen et al. 2016, "Training Deep Nets
             with Sublinear Memory Cost", one checkpoint per layer)

A recomputation computes what the forward computed. Dropout draws again from the RNG state
``checkpoint`` saved (``preserve_rng_state``). The routing's draws (noisy top-k's noise, Switch's
jitter, GShard's random second expert) are keyed by each gate's counter ``rng_step``, which the
forward advanced, and by the micro-batch it routed (``Gate.share``): while backward recomputes a
sublayer its gates get back the counter and share the forward saw, and the balancing load they
count again is put back as it was. So the routing is not redrawn, and the gradients are those of
the step without recomputation, bit for bit where the ops are deterministic.

``layers`` runs a partitioned copy of the graph, as runtime/compile.py does: each sublayer (the
nodes ``compiler.lower`` marks with its ``block``) is an fx GraphModule over the model's own
modules, called under ``checkpoint``; the model's graph, parameter names and state dict are
unchanged. A sublayer's collectives (all-to-alls, the gathered routing) run again when it is
recomputed, on every rank in backward's order, and the recomputation is never stopped early
(``early_stop=False``): where it could stop depends on a rank's own routing, and a rank that
skipped a collective the others ran would hang them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moedsl.nn.experts import Experts
from moedsl.nn.gates import Gate

from .compile import partitioned, segment, segment_module

MODES = ("none", "experts", "layers")


def apply_recompute(model: fx.GraphModule, mode: str) -> None:
    """Make ``model``'s training forward recompute what ``mode`` says in backward (see the module
    docstring); ``none`` leaves it as it is. Evaluation and inference (no autograd) are unchanged."""
    if mode not in MODES:
        raise ValueError(f"recompute must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "experts":
        for m in model.modules():
            if isinstance(m, Experts):
                m.recompute = True
    elif mode == "layers":
        order = list(model.graph.nodes)
        blocks = sublayers(order)
        runner = partitioned(model, order, blocks,
                             lambda i, seg: (f"recompute_{i}", Recomputed(model, seg)), "Recomputed")
        model.__dict__["_recompute_runner"] = runner
        model.forward = runner.forward


def sublayers(order: list) -> list:
    """The Segments of the sublayers in ``order`` (a graph's nodes): from the first node marked
    with a block to its last one, the nodes a pass put between them included."""
    first, last = {}, {}
    for i, node in enumerate(order):
        name = node.meta.get("block")
        if name is not None:
            first.setdefault(name, i)
            last[name] = i
    segs, end = [], -1
    for name in sorted(first, key=first.get):
        lo, hi = first[name], last[name]
        if lo <= end:  # the lowering makes each sublayer's nodes after the one before it
            raise ValueError(f"sublayer {name}'s nodes are interleaved with another's: cannot recompute it alone")
        segs.append(segment(order[lo:hi + 1]))
        end = hi
    return segs


class Recomputed(nn.Module):
    """One sublayer, run under ``checkpoint`` when autograd records (``train.recompute: layers``),
    as it is otherwise."""

    def __init__(self, root: fx.GraphModule, seg):
        super().__init__()
        self.block = segment_module(root, seg)
        # its gates: their draws' counters are put back while backward recomputes it (not submodules here)
        self.__dict__["gates"] = [root.get_submodule(n.target) for n in seg.nodes if n.op == "call_module"
                                  and isinstance(root.get_submodule(n.target), Gate)]

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.block(*args)
        replay = RoutingReplay(self.gates)
        return checkpoint(self.block, *args, use_reentrant=False, context_fn=replay.contexts, early_stop=False)


class RoutingReplay:
    """The routing state a checkpointed forward saw, put back while backward recomputes it: each
    gate's draw counter ``rng_step`` and micro-batch ``share`` (the forward advanced the counter
    after drawing), and afterwards the balancing load ``load_acc`` as it was before the
    recomputation counted it again. ``contexts`` is ``checkpoint``'s ``context_fn``."""

    def __init__(self, gates: list):
        self.gates = gates
        self.seen: list = []

    def contexts(self):
        return self._forward(), self._recompute()

    @contextlib.contextmanager
    def _forward(self):
        self.seen = [(g.rng_step.clone(), g.share) for g in self.gates]
        yield

    @contextlib.contextmanager
    def _recompute(self):
        now = [(g.rng_step.clone(), g.share, _load(g)) for g in self.gates]
        self._put([(step, share, None) for step, share in self.seen])
        try:
            yield
        finally:
            self._put(now)

    @torch.no_grad()
    def _put(self, states: list) -> None:
        for g, (step, share, load) in zip(self.gates, states):
            g.rng_step.copy_(step)
            g.share = share
            if load is not None:
                g.load_acc.copy_(load)


def _load(gate: Gate):
    load = getattr(gate, "load_acc", None)
    return None if load is None else load.clone()
