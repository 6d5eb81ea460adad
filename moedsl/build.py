"""A spec into a graph: ``compile`` (the GraphModule and its plan, on the meta device by
default) and ``build_model`` (a ready module with initialised weights)."""
from __future__ import annotations

from .spec_loader import SpecLike, load_spec


def compile(spec: SpecLike, rank: int = 0, world_size: int | None = None, *, device="meta", seed: int = 0,
            batch: tuple | None = None, layout: str = "auto", target=None):
    """Compile a spec for one rank: returns ``(GraphModule, Plan)``.

    ``world_size`` defaults to the spec's mesh (else 1). ``device="meta"`` (the default)
    allocates no weights, so any spec compiles; use ``build_model`` for a module to run.
    ``batch`` = (global batch, sequence length) for the static shapes and the plan.
    ``layout`` (auto, static, grouped) and ``target`` (the device the graph is for, default
    ``device``): which graph, as in ``moedsl.compiler.compile_graph``; ``target="cpu"`` gives
    the packed layout a CPU run executes, ``"cuda"`` the padded one."""
    from .compiler import compile_graph
    from .compiler.plan import make_plan

    spec = load_spec(spec)
    compiled = compile_graph(spec, rank, world_size, device=device, seed=seed, batch=batch, layout=layout,
                             target=target)
    return compiled.module, make_plan(spec, compiled)


def build_model(spec: SpecLike, *, device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0, dtype=None,
                layout: str = "auto", init: bool = True, compile: bool = False):
    """A ready ``nn.Module`` for ``spec`` (a torch.fx GraphModule).

    ``model(tokens)`` (or ``model(x)`` for input: vectors) returns a ``ModelOutput`` with
    ``.output`` (logits or hidden states), ``.aux_loss`` and ``.router_stats``. Weights are
    a function of ``seed`` alone, whatever ``world_size``: expert e has the same values on
    any rank. ``dtype`` defaults to the spec's. With ``world_size > 1`` (in a torchrun job
    with torch.distributed initialised) the model holds this rank's experts and its
    collectives are bound to process groups made from the spec's mesh. ``layout``: how capacity
    layers compute (see ``moedsl.compiler.compile_graph``): by default the padded static
    buffers on a GPU (CUDA-graph capturable) and only the kept rows on a CPU. ``init=False``
    leaves the experts' weights uninitialised (for weights loaded next). ``compile=True``: the dense
    segments of the graph (embedding, norms, attention, residuals, head: everything but the MoE
    layers' routing, dispatch, experts, combine and collectives) run through ``torch.compile``
    when autograd records, compiled at the first such call (``moedsl.runtime.compile``); the
    graph, parameters and state dict are the same."""
    from .compiler import compile_graph
    from .dtypes import torch_dtype

    spec = load_spec(spec)
    compiled = compile_graph(spec, rank, world_size, device=device, seed=seed, layout=layout, init=init)
    gm = compiled.module
    dtype = dtype or torch_dtype(spec.model.dtype)
    gm.to(dtype=dtype)
    gm.compiled = compiled
    gm.spec = spec  # what moedsl.generate lowers the decode graph from
    if world_size > 1:
        from .runtime.process_groups import bind_model

        bind_model(gm, compiled.mesh, rank)
    if compile:
        from .runtime.compile import compile_model

        compile_model(gm, "on")
    return gm
