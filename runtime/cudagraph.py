"""CUDA-graph capture of a whole training step, and of the inference forward.

A graph the compiler marked static (every MoE layer with a capacity, routed per rank) has
shapes fixed by the batch shape, no host syncs and only static collectives, so one step
(forward, backward, gradient sync, clipping, AdamW, the balancing bias, the loss scale) is
captured once and replayed. The step is runtime/step.py's ``TrainStep``, the code eager
mode runs: a non-finite gradient skips the update inside the graph as it does eagerly.
"""
from __future__ import annotations

import torch

from moedsl.nn.grouped import static_shapes

from .optim import prime_optimizer


def _snapshot(model, opt, loss_scale=None) -> dict:
    state = {("p", n): p.detach().clone() for n, p in model.named_parameters()}
    if loss_scale is not None:
        state.update({("s", k): v.clone() for k, v in loss_scale.state().items()})
    state.update({("b", n): b.detach().clone() for n, b in model.named_buffers()})
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                state[("o", i, k)] = v.detach().clone()
    return state


@torch.no_grad()
def _restore(model, opt, loss_scale, state: dict) -> None:
    if loss_scale is not None:
        for k, v in loss_scale.state().items():
            v.copy_(state[("s", k)])
    for n, p in model.named_parameters():
        p.copy_(state[("p", n)])
    for n, b in model.named_buffers():
        b.copy_(state[("b", n)])
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v) and ("o", i, k) in state:
                v.copy_(state[("o", i, k)])


class GraphedTrainStep:
    """A ``TrainStep`` (runtime/step.py) captured once and replayed: ``graphed(inputs, targets,
    loss_mask)`` copies the batch into static buffers, replays, and returns the captured
    ``StepOutputs``. A step captured with a loss mask replays with one (instruction data: every
    batch has one), a step captured without, without.
    The caller sets the learning-rate tensor before each call, as in eager mode.

    Warm-up steps run on a side stream first (as capture requires); the weights, buffers,
    optimizer state and loss scale are restored afterwards, so the graphed run follows the
    eager one's trajectory. ``capture`` raises what made capture fail."""

    WARMUP = 3

    def __init__(self, step, example_inputs: torch.Tensor, example_targets: torch.Tensor, example_mask=None):
        self.step = step
        self.static_in = example_inputs.clone()
        self.static_tgt = example_targets.clone()
        self.static_mask = None if example_mask is None else example_mask.clone()
        model, opt = step.model, step.opt
        prime_optimizer(opt)  # the snapshot must hold the optimizer's state as it is before any step
        saved = _snapshot(model, opt, step.loss_scale)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    opt.zero_grad(set_to_none=True)
                    step(self.static_in, self.static_tgt, self.static_mask)
            torch.cuda.current_stream().wait_stream(side)
            opt.zero_grad(set_to_none=True)  # backward in the graph then writes (not adds) the grads
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(self.static_in, self.static_tgt, self.static_mask)
        finally:
            _restore(model, opt, step.loss_scale, saved)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, loss_mask=None):
        self.static_in.copy_(inputs, non_blocking=True)
        self.static_tgt.copy_(targets, non_blocking=True)
        if self.static_mask is not None:
            self.static_mask.copy_(loss_mask, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphedForward:
    """The inference forward of a static graph, captured for one input shape and replayed."""

    def __init__(self, model, example: torch.Tensor, amp=None):
        self.model = model
        self.static_in = example.clone()
        model.eval()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._forward(amp)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.outputs = self._forward(amp)
        self.amp = amp

    def _forward(self, amp):
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            return self.model(self.static_in)

    def __call__(self, inputs: torch.Tensor):
        if inputs.shape != self.static_in.shape:
            raise ValueError(f"captured for inputs {tuple(self.static_in.shape)}, got {tuple(inputs.shape)}")
        self.static_in.copy_(inputs, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphedDecodeStep:
    """One decode step (B new tokens at one cache slot) of a static decode graph
    (``moedsl.runtime.generate.decode_module(model, static=True)`` over a static
    ``DecodeCache``), captured once and replayed for every later slot:
    ``step(tokens [B, 1], slot) -> logits [B, V]`` copies the tokens and the slot into the
    graph's input buffers and replays. The slot is a device tensor inside the graph: the keys and
    values go to it with ``index_copy_`` and attention masks the slots not yet written, so
    nothing in the step depends on a host value; the experts' rows are padded to the step's
    B·k assignments (``moedsl.nn.grouped.static_shapes``).

    Built right after the prefill, with the first new tokens at the first free slot: the
    warm-up calls (on a side stream, as capture requires) write those tokens' keys and values
    at that slot, which the first replay writes again, the same values."""

    WARMUP = 2

    def __init__(self, dec, cache, tokens: torch.Tensor, slot: int):
        if not cache.static:
            raise ValueError("GraphedDecodeStep needs a static DecodeCache (static=True)")
        self.tokens = tokens.clone()
        self.slot = torch.full((), slot, dtype=torch.int64, device=tokens.device)
        with static_shapes():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    dec(self.tokens, cache, self.slot)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = dec(self.tokens, cache, self.slot).output[:, -1]

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits
