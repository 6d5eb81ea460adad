"""A model from a ``ModelSource`` (``moedsl.runtime.resolve``): the one loader.

``fill`` puts a source's weights into a model already built (one rank's share: each rank reads
only the experts it holds, from an import's safetensors or a checkpoint's DCP shards);
``build`` compiles the spec for a rank and fills it; ``load_model`` is ``build`` of what a path
resolves to, in eval mode.
"""
from __future__ import annotations

from typing import Optional

from moedsl.compiler import compile_graph
from moedsl.dtypes import torch_dtype
from moedsl.hf.files import read_generation_config
from moedsl.hf.weights import load_weights

from .ckpt_format import load as load_checkpoint
from .process_groups import bind_model
from .resolve import IMPORT, ModelSource, resolve


def fill(model, source: ModelSource, spec=None) -> None:
    """Fill ``model`` with ``source``'s weights, checked against ``spec`` (default the source's):
    an import's shapes (``moedsl.hf.weights.load_weights``), a checkpoint's architecture
    (``ckpt_compat.compare``: training-only changes pass)."""
    spec = spec or source.spec
    if source.kind == IMPORT:
        load_weights(model, source.path, spec)
    else:
        load_checkpoint(source.path, model, None, spec)


def build(source: ModelSource, spec=None, *, device="cpu", dtype=None, rank: int = 0, world: int = 1,
          seed: int = 0):
    """``spec`` (default the source's) compiled for ``rank`` of ``world`` on ``device``, filled
    with ``source``'s weights, cast to ``dtype`` (default the spec's), in eval mode; with
    ``world > 1`` its collectives are bound to process groups of the spec's mesh."""
    spec = spec or source.spec
    compiled = compile_graph(spec, rank, world, device=device, seed=seed, init=False, verify_ranks=False)
    gm = compiled.module
    fill(gm, source, spec)
    gm.to(dtype=dtype or torch_dtype(spec.model.dtype))
    gm.compiled = compiled
    gm.spec = spec  # what moedsl.generate lowers the decode graph from
    gm.generation_config = read_generation_config(source.folders)  # moedsl.generate's eos and sampling defaults
    if world > 1:
        bind_model(gm, compiled.mesh, rank)
    return gm.eval()


def load_model(src, checkpoint=None, device="cpu", dtype: Optional[object] = None):
    """A model with its weights, in eval mode (``model(input_ids).output``: logits [B, T, vocab]):
    ``src`` an import folder (``moedsl import``), a ``moedsl run`` output folder (its newest whole
    checkpoint), a checkpoint folder, or a spec (path, text, dict, Spec) with ``checkpoint`` (an
    import folder, a run or a checkpoint). Weights that do not fit the spec are refused naming the
    tensor, the spec's field and line, and both shapes (``UserError``)."""
    return build(resolve(src, checkpoint), device=device, dtype=dtype)
