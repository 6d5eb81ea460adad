"""CUDA-graph capture of a whole training step, and of the inference forward.

A graph the compiler marked static (every MoE layer with a capacity, routed per rank) has
shapes fixed by the batch shape, no host syncs and only static collectives, so one step
(forward, backward, gradient sync, clipping, AdamW, the balancing bias) is captured once
and replayed: each step copies its batch into the static input buffers and sets the
learning rate tensor. Warm-up steps run on a side stream first (as capture requires);
the weights, buffers and optimizer state are restored afterwards, so the graphed run
follows exactly the trajectory of the eager one.
"""
from __future__ import annotations

import torch

from moedsl.errors import MoedslError


def _snapshot(model, opt) -> dict:
    state = {("p", n): p.detach().clone() for n, p in model.named_parameters()}
    state.update({("b", n): b.detach().clone() for n, b in model.named_buffers()})
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                state[("o", i, k)] = v.detach().clone()
    return state


@torch.no_grad()
def _restore(model, opt, state: dict) -> None:
    for n, p in model.named_parameters():
        p.copy_(state[("p", n)])
    for n, b in model.named_buffers():
        b.copy_(state[("b", n)])
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v) and ("o", i, k) in state:
                v.copy_(state[("o", i, k)])


class GraphedTrainStep:
    """``step(batch, lr) -> (loss, aux, grad norm, router stats)``, replaying a captured graph."""

    WARMUP = 3

    def __init__(self, model, spec, opt, sync, gates, o, world, amp, example, device, say, fallback):
        from .train import _balance_bias, task_loss

        self.model, self.opt, self.fallback, self.say = model, opt, fallback, say
        self.static_in = example.inputs.to(device).clone()
        self.static_tgt = example.targets.to(device).clone()
        self.lr = torch.tensor(o.lr, dtype=torch.float32, device=device)
        for g in opt.param_groups:
            g["lr"] = self.lr

        def body():
            model.train()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(self.static_in)
                loss = task_loss(spec, out, self.static_tgt)
            ((loss + out.aux_loss) / world).backward()
            sync()
            norm = sync.clip(o.grad_clip)
            opt.step()
            _balance_bias(gates, world)
            return loss.detach(), out.aux_loss.detach(), norm, out.router_stats

        self.graph = None
        saved = _snapshot(model, opt)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    opt.zero_grad(set_to_none=True)
                    body()
            torch.cuda.current_stream().wait_stream(side)
            opt.zero_grad(set_to_none=True)  # backward in the graph then writes (not adds) the grads
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = body()
            _restore(model, opt, saved)
            self.graph = graph
            say.once("CUDA graphs on: the training step is captured and replayed")
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back, or fail in `on` mode
            if o.cuda_graphs == "on":
                raise MoedslError(f"--cuda-graphs on: capturing the training step failed: {e}") from e
            _restore(model, opt, saved)
            say.once(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); running eager")

    def __call__(self, batch, lr: float):
        if self.graph is None:
            return self.fallback(batch, lr)
        self.static_in.copy_(batch.inputs, non_blocking=True)
        self.static_tgt.copy_(batch.targets, non_blocking=True)
        self.lr.fill_(lr)
        self.graph.replay()
        loss, aux, norm, stats = self.outputs
        return float(loss), float(aux), float(norm), stats


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
