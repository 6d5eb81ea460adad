"""Lowering: a Spec becomes an ``fx.Graph`` built node by node, plus the modules it calls.

The graph is the single-process model. Every MoE layer is explicit nodes,

    layers_i_route (gate) -> layers_i_dispatch -> layers_i_experts -> layers_i_combine

plus the pre-norm, the residual add, the shared experts and the aux loss. Experts
modules are not made here: the placement pass makes them, holding only the experts
its rank hosts. Nothing here knows about ranks or collectives.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from moedsl import spec as S
from moedsl.nn import layers as L
from moedsl.nn import moe_ops
from moedsl.nn.experts import DenseFFN
from moedsl.nn.gates import make_gate
from moedsl.validate import BatchError


@dataclass
class MoEInfo:
    """What later passes need to know of one MoE layer."""

    name: str  # "layers.3"
    index: int  # expanded layer index
    moe_index: int
    config: S.MoE
    layout: str  # capacity | packed
    groups: int  # routing groups in the whole batch


@dataclass
class Lowered:
    graph: fx.Graph
    modules: dict  # qualified name -> nn.Module
    moe: list = field(default_factory=list)  # [MoEInfo]
    input_kind: str = "tokens"
    graph_only: bool = False  # no modules made (to check another rank's graph cheaply)
    d_model: int = 0


def _node_name(layer: str, what: str) -> str:
    return f"{layer.replace('.', '_')}_{what}"


def lower(spec: S.Spec, device: torch.device | str = "cpu", seed: int = 0, graph_only: bool = False,
          static: bool = True) -> Lowered:
    """``static``: capacity layers use the padded [E, C, d] buffer (fixed shapes, capturable as a
    CUDA graph); otherwise they compute only their kept rows, grouped by expert (less work,
    data-dependent shapes). The routing, drops included, is the same either way."""
    device = torch.device(device)
    m = spec.model
    g = fx.Graph()
    modules: dict[str, nn.Module] = {}
    low = Lowered(graph=g, modules=modules, input_kind=m.input, graph_only=graph_only, d_model=m.d_model)

    def module(name: str, make) -> str:
        if not graph_only:
            modules[name] = make()
        return name

    def call_module(target: str, args: tuple, name: str, **meta) -> fx.Node:
        node = g.create_node("call_module", target, args, {}, name=name)
        node.meta.update(meta)
        return node

    def call_function(fn, args: tuple, name: str, **meta) -> fx.Node:
        node = g.create_node("call_function", fn, args, {}, name=name)
        node.meta.update(meta)
        return node

    # dense weights come from the global RNG: seed it, without disturbing the caller's state
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if m.input == "tokens":
            tokens = g.placeholder("tokens")
            tokens.meta["doc"] = "[B, T] int64 token ids"
            h = tokens
        else:
            tokens = None
            h = g.placeholder("x")
            h.meta["doc"] = "[B, T, d_model] input vectors"
        token_ids = None
        aux, stats = [], []
        for layer in spec.layers:
            name, cfg, kind = f"layers.{layer.index}", layer.config, layer.kind
            if kind == "embedding":
                module("embedding", lambda: L.Embedding(m.vocab_size, m.d_model, m.max_seq_len, cfg.positions, m.init_std))
                h = call_module("embedding", (h,), "embedding")
                continue
            if kind == "head":
                tied = modules.get("embedding") if m.tie_embeddings else None
                module("head", lambda: L.Head(m.d_model, m.vocab_size, cfg.bias, m.init_std, tied=tied))
                args = (h, g.get_attr("embedding.weight")) if m.tie_embeddings else (h,)
                h = call_module("head", args, "head")
                continue
            if kind == "norm":
                module(f"{name}.norm", lambda: L.make_norm(cfg.type, m.d_model, cfg.eps))
                h = call_module(f"{name}.norm", (h,), _node_name(name, "norm"))
                continue
            # residual sublayers: attention, lstm, ffn, moe
            x = h
            if cfg.prenorm:
                module(f"{name}.norm", lambda: L.make_norm(m.norm, m.d_model, m.norm_eps))
                x = call_module(f"{name}.norm", (x,), _node_name(name, "norm"))
            if kind == "attention":
                module(f"{name}.attention", lambda: L.Attention(m.d_model, cfg.heads, cfg.kv_heads, cfg.positions,
                                                       cfg.rope_theta, cfg.causal, cfg.dropout, cfg.bias,
                                                       m.init_std))
                y = call_module(f"{name}.attention", (x,), _node_name(name, "attention"))
            elif kind == "lstm":
                module(f"{name}.lstm", lambda: L.LSTMBlock(m.d_model, cfg.layers, cfg.dropout))
                y = call_module(f"{name}.lstm", (x,), _node_name(name, "lstm"))
            elif kind == "ffn":
                module(f"{name}.ffn", lambda: DenseFFN(m.d_model, cfg.hidden, cfg.activation, cfg.bias, cfg.dropout,
                                              m.init_std))
                y = call_module(f"{name}.ffn", (x,), _node_name(name, "ffn"))
            else:  # moe
                if token_ids is None and tokens is not None and cfg.gate.type == "hash":
                    token_ids = call_function(torch.flatten, (tokens,), "tokens_flat")
                y, a, st = _lower_moe(spec, layer, x, token_ids if cfg.gate.type == "hash" else None,
                                      module, call_module, call_function, low, seed, static)
                aux.append(a)
                stats.append(st)
            if m.dropout:
                module(f"{name}.dropout", lambda: nn.Dropout(m.dropout))
                y = call_module(f"{name}.dropout", (y,), _node_name(name, "dropout"))
            h = call_function(operator.add, (h, y), _node_name(name, "residual")) if cfg.residual else y
        out = call_function(moe_ops.model_output, (h, tuple(aux), tuple(stats)), "model_output")
        g.output(out)
    return low


def routing_tokens(x: torch.Tensor, gate: str, groups: int, world: int) -> torch.Tensor:
    """x [B, T, d] -> the tokens [B·T, d] the gate routes. The tokens of the global batch (B·T on
    each of ``world`` ranks) split into ``groups`` equal routing groups: refuse a batch whose do not,
    naming the gate, before the gate's reshape fails on it."""
    B, T = x.shape[0], x.shape[1]
    if (B * T * world) % groups:
        ranks = f"{world} ranks × " if world > 1 else ""
        raise BatchError(f"{gate}.routing_groups = {groups} does not divide the batch of {ranks}{B} sequences "
                         f"× {T} tokens ({B * T * world} tokens)")
    return torch.flatten(x, 0, 1)


def _lower_moe(spec, layer, x, token_ids, module, call_module, call_function, low: Lowered, seed: int,
               static: bool):
    m, cfg = spec.model, layer.config
    name = f"layers.{layer.index}"
    meta = dict(moe_layer=name)
    # a dense softmax layer is uniform (every expert takes every token): always the batched buffer
    layout = "capacity" if (cfg.gate.type == "softmax" or (cfg.gate.has_capacity and static)) else "packed"
    low.moe.append(MoEInfo(name=name, index=layer.index, moe_index=layer.moe_index, config=cfg,
                           layout=layout, groups=cfg.gate.routing_groups))
    module(f"{name}.gate", lambda: make_gate(cfg, m.d_model, m.router_dtype, seed, layer.index, m.init_std,
                                             m.vocab_size))
    owner = "hierarchy" if cfg.hierarchy is not None else "gate"
    flat = call_function(routing_tokens, (x, f"{name}.moe.{owner}", cfg.gate.routing_groups, 1),
                         _node_name(name, "tokens"), **meta, role="tokens")
    route = call_module(f"{name}.gate", (flat, token_ids, 0, cfg.gate.routing_groups), _node_name(name, "route"),
                        **meta, role="route")
    if layout == "capacity":
        disp = call_function(moe_ops.dispatch, (flat, route), _node_name(name, "dispatch"), **meta, role="dispatch")
        ye = call_module(f"{name}.experts", (disp,), _node_name(name, "experts"), **meta, role="experts")
        y = call_function(moe_ops.combine, (ye, route), _node_name(name, "combine"), **meta, role="combine")
    else:
        disp = call_function(moe_ops.dispatch_packed, (flat, route), _node_name(name, "dispatch"),
                             **meta, role="dispatch")
        rows = call_function(getattr, (disp, "rows"), _node_name(name, "rows"), **meta, role="rows")
        sizes = call_function(getattr, (disp, "sizes"), _node_name(name, "sizes"), **meta, role="sizes")
        ye = call_module(f"{name}.experts", (rows, sizes), _node_name(name, "experts"), **meta, role="experts")
        y = call_function(moe_ops.combine_packed, (ye, disp, route), _node_name(name, "combine"),
                          **meta, role="combine")
    e = cfg.experts
    if e.shared is not None:  # shared experts: one FFN of count × hidden (the sum of count FFNs)
        module(f"{name}.shared", lambda: DenseFFN(m.d_model, e.shared.count * e.shared.hidden, e.activation, e.bias,
                                          e.dropout, m.init_std))
        sh = call_module(f"{name}.shared", (flat,), _node_name(name, "shared"), **meta, role="shared")
        y = call_function(operator.add, (y, sh), _node_name(name, "moe_out"), **meta, role="moe_out")
    y = call_function(torch.Tensor.view_as, (y, x), _node_name(name, "unflatten"), **meta, role="unflatten")
    aux = call_function(getattr, (route, "aux_loss"), _node_name(name, "aux_loss"), **meta, role="aux")
    st = call_function(moe_ops.router_stats, (route, name), _node_name(name, "router_stats"), **meta, role="stats")
    return y, aux, st


def make_experts(spec: S.Spec, info: MoEInfo, expert_ids, device, seed: int, init: bool = True):
    from moedsl.nn.experts import Experts

    e, m = info.config.experts, spec.model
    with torch.device(device):
        return Experts(m.d_model, e.hidden, e.activation, expert_ids, bias=e.bias, dropout=e.dropout,
                       init_scale=e.init_scale, seed=seed, layer=info.index, init=init)
