"""The decode graph: a built model's spec compiled for incremental decoding over its own modules.

    lower(decode=True)  -> placement -> collective insertion   the MoE layers as training has them
                                                               (all-to-alls where the experts split)
    -> share token keys                                        one routing-key node for every layer
    -> fuse decode MoE                                         a layer on one process: one call
    -> GraphModule over the model's modules, flat names        no weight copied

``forward(tokens [B, t], cache, start)`` (``moedsl.nn.decode``): the prompt in one call, then a
token a step. Every MoE layer routes each token as its own routing group, so a token's experts
depend neither on the other rows nor on how the sequence is split into steps.

An encoder-decoder's decode graph is its decoder's, ``forward(tokens, cache, start, memory,
source_mask)``; its encoder graph (``compile_encoder``: lower(part="encoder") -> placement ->
collective insertion) computes ``memory`` once per batch of sources, routing as training does.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from moedsl import spec as S

from .lower import lower
from .passes.insert_collectives import insert_collectives
from .passes.fuse_decode_moe import fuse_decode_moe
from .passes.placement import placement_pass
from .passes.share_token_keys import share_token_keys


def compile_decode(spec: S.Spec, compiled, model: nn.Module, static: bool = False) -> fx.GraphModule:
    """The decode ``GraphModule`` of ``model``, built by ``compile_graph`` as ``compiled`` (its mesh,
    rank and layout) from ``spec``; its nodes call ``model``'s own submodules. ``static``: capacity
    layers through their fixed [E, C, d] buffers (a static cache, CUDA-graph capture), as they are
    anyway where the model's layout is static. Collectives come unbound: bind them to the
    model's process groups (``moedsl.compiler.collectives.bind``)."""
    low = lower(spec, device="meta", graph_only=True, static=static or compiled.layout == "static", decode=True)
    placements = placement_pass(low, spec, compiled.mesh, compiled.rank, "meta", 0, False)
    modules = _with_collectives(low, spec, compiled, placements, model)
    share_token_keys(low.graph)
    fuse_decode_moe(low.graph, modules)
    return fx.GraphModule(_flat(modules, low.graph), low.graph, class_name="Decode")


def compile_encoder(spec: S.Spec, compiled, model: nn.Module) -> fx.GraphModule:
    """An encoder-decoder's encoder ``GraphModule`` over ``model``'s own submodules (built by
    ``compile_graph`` as ``compiled``): ``forward(tokens [B, S], source_mask [B, S] or None)`` ->
    ``model_output`` whose output is the encoder's [B, S, d]; its MoE layers route as in training
    (the batch's routing groups, capacity). Collectives come unbound, as ``compile_decode``'s."""
    low = lower(spec, device="meta", graph_only=True, static=compiled.layout == "static", part="encoder")
    placements = placement_pass(low, spec, compiled.mesh, compiled.rank, "meta", 0, False)
    modules = _with_collectives(low, spec, compiled, placements, model)
    return fx.GraphModule(_flat(modules, low.graph), low.graph, class_name="Encode")


def _with_collectives(low, spec, compiled, placements, model: nn.Module) -> dict:
    """The collectives put into ``low``'s graph (their modules, no weights, made for it), and every
    module its nodes call: those, else ``model``'s own."""
    low.graph_only = False
    insert_collectives(low, spec, compiled.mesh, compiled.rank, placements)
    modules = dict(low.modules)
    for node in low.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in modules:
            modules[node.target] = _resolve(model, node.target)
    return modules


def _resolve(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flat(modules: dict, graph: fx.Graph) -> dict:
    """The graph's modules under flat names ("layers.2.gate" -> "m_layers_2_gate"), its
    call_module and get_attr nodes retargeted: the generated code then reaches each module with
    one attribute lookup instead of one per dotted part (a decode step makes ~30 module calls,
    each of which went through 3-4 ``nn.Module.__getattr__``)."""
    names, flat = {}, {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            name = names.get(node.target)
            if name is None:
                name = names[node.target] = "m_" + node.target.replace(".", "_")
                flat[name] = modules[node.target]
            node.target = name
    return flat
