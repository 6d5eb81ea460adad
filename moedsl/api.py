"""The public API: load a spec, compile it, build a ready model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from . import yamlload
from .errors import Issue, SpecError
from .spec import Spec

SpecLike = Union[str, os.PathLike, dict, Spec]


def _looks_like_path(src: str) -> bool:
    return "\n" not in src and (src.endswith((".yaml", ".yml", ".json")) or os.path.exists(src))


def load_spec(src: SpecLike, source: str | None = None) -> Spec:
    """Load and validate a spec from a path, YAML text, a dict, or a Spec (returned as is).

    Raises ``SpecError`` (with every issue, each with its place) for anything a user got wrong.
    """
    from . import schema
    from .validate import build_spec

    if isinstance(src, Spec):
        return src
    if isinstance(src, dict):
        located = yamlload.Located(src, {}, {}, source or "<dict>")
    elif isinstance(src, (os.PathLike, Path)) or (isinstance(src, str) and _looks_like_path(src)):
        name = source or str(src)
        located = yamlload.load(yamlload.read_text(src), name)
    elif isinstance(src, str):
        located = yamlload.load(src, source or "<string>")
    else:
        raise SpecError([Issue((), f"cannot load a spec from {type(src).__name__}: give a path, YAML text, "
                               "a dict or a Spec")], source or "<spec>")
    return build_spec(located.data, located, schema.check(located.data, located))


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


def load_model(src, checkpoint=None, device="cpu"):
    """A model with its weights, in eval mode (``model(input_ids).output``: logits [B, T, vocab]):
    ``src`` an import folder (``moedsl import``), a ``moedsl run`` output folder (its newest whole
    checkpoint), a checkpoint folder, or a spec with ``checkpoint`` (an import folder or a DCP
    checkpoint). Weights that do not fit the spec are refused naming the tensor, the spec's field
    and line, and both shapes (``UserError``). See ``moedsl.hf.weights``."""
    from .hf.weights import load_model as _load

    return _load(src, checkpoint=checkpoint, device=device)


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


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, attention_mask=None, timings: dict | None = None,
             graphs: str = "auto"):
    """Continue prompts with a KV cache: ids [B, T + max_new_tokens]. ``model`` from ``load_model``
    or ``build_model``; ``input_ids`` a tensor [B, T] (with a left-padding ``attention_mask``, as
    transformers' generate) or a list of prompts of any lengths (left-padded with id 0). Greedy at
    temperature 0, else sampled (``top_k``, ``top_p``, seeded by ``seed``). ``graphs``: decode
    through a captured CUDA graph ("auto": on a GPU, in one process; "on"; "off"); ``timings``:
    filled with prefill and decode seconds. See ``moedsl.runtime.generate.generate``."""
    from .runtime.generate import generate as _generate

    return _generate(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, attention_mask=attention_mask, timings=timings, graphs=graphs)


def evaluate(model, capacity_factor: float | None = None, *, checkpoint=None, data: str | None = None,
             batch: int | None = None) -> dict:
    """Evaluate a trained model on its held-out data with every capacity gate's evaluation capacity
    factor set to ``capacity_factor`` (V-MoE, Riquelme et al. 2021, §4.1: capacity lowered at
    inference). ``model``: a ``moedsl run`` output folder (its latest checkpoint), or a spec with
    ``checkpoint``. Returns loss, accuracy (image classifiers, else None) and the dropped fraction;
    see ``moedsl.runtime.evaluate.evaluate``."""
    from .runtime.evaluate import evaluate as run_eval

    return run_eval(model, capacity_factor, checkpoint=checkpoint, data=data, batch=batch)


def inspect(model, *, checkpoint=None, text: str | None = None, data: str | None = None, tokens: int = 65536,
            seq: int | None = None, batch: int | None = None, capacity_factor: float | None = None,
            top: int = 8) -> dict:
    """What the experts of a trained model learned, per MoE layer: the load of every expert (before
    and after drops), the share dropped, the tokens each takes most, and how often consecutive
    tokens keep their expert against chance (Mixtral, Jiang et al. 2024, §5). ``model``: a run
    folder, an import folder, or a spec with ``checkpoint``. See ``moedsl.runtime.inspect``."""
    from .runtime.inspect import inspect as run_inspect

    return run_inspect(model, checkpoint=checkpoint, text=text, data=data, tokens=tokens, seq=seq, batch=batch,
                       capacity_factor=capacity_factor, top=top)
