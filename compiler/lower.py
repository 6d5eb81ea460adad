"""Lowering: a Spec becomes an ``fx.Graph`` built node by node, plus the modules it calls.

The graph is the single-process model; each layer's nodes come from its kind's ``lower``
(``moedsl.kinds``). Every MoE layer is explicit nodes,

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
from moedsl.errors import UserError, format_path
from moedsl.kinds import layer_kind
from moedsl.kinds.moe import MOE
from moedsl.nn import decode as decode_ops
from moedsl.nn import documents as documents_ops
from moedsl.nn import layers as L
from moedsl.nn import moe_ops


@dataclass
class MoEInfo:
    """What later passes need to know of one MoE layer."""

    name: str  # "layers.3"
    index: int  # expanded layer index
    moe_index: int
    config: S.MoE
    layout: str  # capacity | packed
    groups: int  # routing groups in the whole batch
    per_token: bool = False  # a decode graph's: every token its own routing group (the route's groups is a node)
    per_sequence: bool = False  # routing_groups: sequence: every row its own routing group (a node, too)


@dataclass
class Lowered:
    graph: fx.Graph
    modules: dict  # qualified name -> nn.Module
    moe: list = field(default_factory=list)  # [MoEInfo]
    input_kind: str = "tokens"
    graph_only: bool = False  # no modules made (to check another rank's graph cheaply)
    d_model: int = 0
    decode: bool = False  # a decode graph: forward(tokens, cache, start) (+ memory, source_mask)
    part: str = "all"  # an encoder-decoder's graph of both stacks, or of its "encoder" only


def _node_name(layer: str, what: str) -> str:
    return f"{layer.replace('.', '_')}_{what}"


class LowerContext:
    """What a layer kind's ``lower`` builds with: the graph under construction, the modules
    it calls, and the state shared between layers (the token ids, the aux losses, the router
    statistics)."""

    def __init__(self, spec: S.Spec, low: Lowered, seed: int, static: bool, tokens: Optional[fx.Node],
                 decode: Optional[tuple] = None, rows: Optional[fx.Node] = None,
                 documents: Optional[fx.Node] = None):
        self.spec, self.model, self.low = spec, spec.model, low
        # a decode graph's (cache, start, positions) nodes: see moedsl.nn.decode
        self.decode = decode is not None
        self.cache, self.start, self.positions = decode if decode is not None else (None, None, None)
        self.graph, self.modules = low.graph, low.modules
        self.seed, self.static = seed, static
        self.tokens = tokens  # the [B, T] token ids placeholder (None for input: vectors)
        self._token_ids: Optional[fx.Node] = None
        self.rows = rows  # the [B] rows-that-count placeholder (images only; its value may be None)
        self._token_mask: Optional[fx.Node] = None
        self._padding_flat: dict = {}  # padding node -> its [B·T] flattening (``padding_mask``)
        self.documents = documents  # the [B, T] documents placeholder (token training graphs; its value may be None)
        self._document_nodes: dict = {}
        self.aux: list = []  # each MoE layer's aux loss node
        self.stats: list = []  # each MoE layer's router statistics node
        # the stack being lowered ("" for a spec's layers; an encoder-decoder's "encoder" / "decoder")
        self.stack = None
        self.stack_tokens: Optional[fx.Node] = tokens  # its [B, T] token ids
        self._stack_anchor: Optional[fx.Node] = None
        self._stack_nodes: dict = {}
        self.memory: Optional[fx.Node] = None  # an encoder-decoder's encoder output [B, S, d] (the decoder's)
        self.source_mask: Optional[fx.Node] = None  # its [B, S] bool real source tokens (its value may be None)

    def begin_stack(self, stack: str, tokens: Optional[fx.Node]) -> None:
        """The layers that follow are stack ``stack``'s, over the token ids ``tokens``: the nodes it
        shares (``stack_node``) start anew, before its first layer's."""
        self.stack, self.stack_tokens, self.tokens = stack, tokens, tokens
        self._token_ids = None
        self._stack_anchor = next(reversed(self.graph.nodes))
        self._stack_nodes = {}

    def stack_node(self, name: str, make) -> fx.Node:
        """The node ``make()`` makes, made once per stack and shared by its layers (T5's relative
        position bias), placed before the stack's first layer: outside every sublayer's block."""
        if name not in self._stack_nodes:
            with self.graph.inserting_after(self._stack_anchor):
                node = self._stack_nodes[name] = make()
            self._stack_anchor = node
        return self._stack_nodes[name]

    def padding(self, layer) -> Optional[fx.Node]:
        """The [B, T] bool mask of the real tokens of ``layer``'s input, where its stack's rows may be
        padded with keys a query must not see: an encoder's source (right-padded). A decoder's rows
        are right-padded too, but its causal queries never see what comes after them."""
        return self.source_mask if layer.stack == "encoder" else None

    def module(self, name: str, make) -> str:
        """Register the module ``make()`` under ``name`` (not made for a graph-only lowering); a
        module already registered (one that two layers share) is not made again."""
        if not self.low.graph_only and name not in self.modules:
            self.modules[name] = make()
        return name

    def call_module(self, target: str, args: tuple, name: str, kwargs: Optional[dict] = None, **meta) -> fx.Node:
        node = self.graph.create_node("call_module", target, args, kwargs or {}, name=name)
        node.meta.update(meta)
        return node

    def call_function(self, fn, args: tuple, name: str, **meta) -> fx.Node:
        node = self.graph.create_node("call_function", fn, args, {}, name=name)
        node.meta.update(meta)
        return node

    @staticmethod
    def node_name(layer, what: str) -> str:
        return _node_name(f"layers.{layer.index}", what)

    def token_ids(self) -> Optional[fx.Node]:
        """The token ids flattened to [B·T] (made once, where first needed); None without tokens."""
        if self._token_ids is None and self.tokens is not None:
            self._token_ids = self.call_function(torch.flatten, (self.tokens,), "tokens_flat")
        return self._token_ids

    def token_mask(self, x: fx.Node) -> Optional[fx.Node]:
        """The tokens that count [B·T] of x [B, T, d], from the rows that count (made once, where
        first needed; its value None when every row counts); None in a graph without ``rows``."""
        if self._token_mask is None and self.rows is not None:
            self._token_mask = self.call_function(moe_ops.token_mask, (self.rows, x), "token_mask")
        return self._token_mask

    def padding_mask(self, layer) -> Optional[fx.Node]:
        """``padding(layer)`` flattened to [B·T] in the order a gate sees the tokens (made once per
        mask, where first needed; its value None when nothing is padding); None where the layer's
        rows have no padding mask. A gate with ``route_padding: false`` routes only these."""
        mask = self.padding(layer)
        if mask is None:
            return None
        if mask not in self._padding_flat:
            self._padding_flat[mask] = self.call_function(moe_ops.padding_tokens, (mask,), f"{mask.name}_flat")
        return self._padding_flat[mask]

    def document_positions(self) -> Optional[fx.Node]:
        """Each token's position within its document [B, T] (``moedsl.nn.documents``; made once,
        where first needed; its value None without documents); None in a graph without them."""
        return self._document_node("document_positions", documents_ops.document_positions)

    def document_mask(self) -> Optional[fx.Node]:
        """The packed rows' attention mask (``moedsl.nn.documents.document_mask``; made once, where
        first needed, shared by every attention layer; its value None without documents); None in a
        graph without them."""
        return self._document_node("document_mask", documents_ops.document_mask)

    def _document_node(self, name: str, fn) -> Optional[fx.Node]:
        if self.documents is None:
            return None
        if name not in self._document_nodes:
            self._document_nodes[name] = self.call_function(fn, (self.documents,), name)
        return self._document_nodes[name]

    def add_moe(self, **info) -> None:
        self.low.moe.append(MoEInfo(**info))

    def decode_state(self, layer, key: str) -> tuple:
        """What a layer with state across positions gets after x in a decode graph: the cache, the
        new tokens' positions [B, t], the slot of the first, and its own key in the cache."""
        return (self.cache, self.positions, self.start, key)

    def cannot_decode(self, layer, why: str):
        """Refuse to decode ``layer``, in one line naming it (``UserError``)."""
        path = tuple(layer.path) + (layer.kind,)
        line = self.spec.located.where(path)[0] if self.spec.located is not None else None
        where = f"{self.spec.source}:{line}" if line else self.spec.source
        raise UserError(f"{where}: {format_path(path)} (layers.{layer.index}): {why}")


PARTS = ("all", "encoder")


def lower(spec: S.Spec, device: torch.device | str = "cpu", seed: int = 0, graph_only: bool = False,
          static: bool = True, decode: bool = False, part: str = "all") -> Lowered:
    """``static``: capacity layers use the padded [E, C, d] buffer (fixed shapes, capturable as a
    CUDA graph); otherwise they compute only their kept rows, grouped by expert (less work,
    data-dependent shapes). The routing, drops included, is the same either way.

    Each layer is lowered by its kind (``moedsl.kinds``); a residual sublayer is wrapped here in
    its pre-norm, dropout and residual add.

    A graph over tokens (not decoding) takes ``documents`` [B, T] after the tokens, None by
    default (``moedsl.nn.documents``): given, every layer keeps to each document of a packed row
    (its kind's ``document_kwargs``: one mask and one positions node, shared by every layer);
    None, the graph computes what it computed without them.

    ``decode``: the graph that decodes a few tokens at a time, ``forward(tokens [B, t], cache,
    start)`` (``moedsl.nn.decode``): a layer with state across positions (attention, a recurrent layer) gets
    the cache, the tokens' positions and ``start`` as extra arguments (its kind's
    ``decode_args``), and every MoE layer routes each token as its own group. Its modules'
    names are the training graph's, so a GraphModule over it shares a trained model's.

    An encoder-decoder (``spec.encoder_decoder``): both stacks in one graph, ``forward(tokens
    [B, S], decoder_tokens [B, T], source_mask=None)``, the source's ids, the decoder's input
    ids and the source's real tokens [B, S] bool (None: all real); the encoder's output is what
    the decoder's cross-attention reads; the output is the decoder's (logits [B, T, V]), the aux
    losses and router statistics both stacks'. ``part="encoder"``: the encoder alone,
    ``forward(tokens, source_mask=None)``, its output [B, S, d]. ``decode``: the decoder alone,
    ``forward(tokens [B, t], cache, start, memory [B, S, d], source_mask)``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    device = torch.device(device)
    m = spec.model
    g = fx.Graph()
    encdec = spec.encoder_decoder
    if part != "all" and not encdec:
        raise UserError(f"{spec.source}: part={part!r} is for an encoder-decoder; this spec has one stack")
    if part != "all" and decode:
        raise ValueError("an encoder graph does not decode")
    low = Lowered(graph=g, modules={}, input_kind=m.input, graph_only=graph_only, d_model=m.d_model,
                  decode=decode, part=part)
    if decode and m.input != "tokens":
        raise UserError(f"{spec.source}: model.input: {m.input}: only a model over tokens generates")
    # dense weights come from the global RNG: seed it, without disturbing the caller's state
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        rows = documents = None
        decoder_tokens = source_mask = None
        if m.input == "tokens":
            tokens = g.placeholder("tokens")
            tokens.meta["doc"] = "[B, T] int64 token ids" if not encdec else \
                "[B, t] int64 the decoder's new token ids" if decode else "[B, S] int64 the source's token ids"
            h = tokens
            if encdec and not decode:
                if part == "all":
                    decoder_tokens = g.placeholder("decoder_tokens")
                    decoder_tokens.meta["doc"] = "[B, T] int64 the decoder's input ids (the labels shifted right)"
                source_mask = g.placeholder("source_mask", default_value=None)
                source_mask.meta["doc"] = "[B, S] bool or None: the real source tokens (None: all; False: padding)"
            elif not decode:  # packed rows (--pack documents): attention and positions keep to each document
                documents = g.placeholder("documents", default_value=None)
                documents.meta["doc"] = ("[B, T] int64 or None: each token's document within its row, from 0 "
                                         "(None: each row one sequence)")
        elif m.input == "image":
            tokens = None
            h = g.placeholder("images")
            h.meta["doc"] = "[B, H, W, C] float images (a patch_embed makes them [B, T, d_model])"
            # held-out evaluation fills its last batch with wrapped-around images: a fixed batch, as
            # the routing groups and the other processes need; those rows are routed nowhere
            rows = g.placeholder("rows", default_value=None)
            rows.meta["doc"] = "[B] bool or None: the images that count (None: all); the others take no slot"
        else:
            tokens = None
            h = g.placeholder("x")
            h.meta["doc"] = "[B, T, d_model] input vectors"
        state = None
        if decode:
            cache, start = g.placeholder("cache"), g.placeholder("start")
            cache.meta["doc"] = "moedsl.nn.decode.DecodeCache: per-layer keys, values, recurrent states"
            start.meta["doc"] = "int: the cache slot of tokens[:, 0]"
            memory = None
            if encdec:
                memory = g.placeholder("memory")
                memory.meta["doc"] = "[B, S, d_model] the encoder's output (the cross-attention's keys and values)"
                source_mask = g.placeholder("source_mask", default_value=None)
                source_mask.meta["doc"] = "[B, S] bool or None: the real source tokens"
            pos = g.create_node("call_function", decode_ops.positions, (tokens, cache, start), {}, name="positions")
            state = (cache, start, pos)
        ctx = LowerContext(spec, low, seed, static, tokens, decode=state, rows=rows, documents=documents)
        ctx.source_mask = source_mask
        if decode and encdec:
            ctx.memory = memory
        layers = spec.layers
        if encdec and (decode or part == "encoder"):
            layers = spec.stack("decoder" if decode else "encoder")
        for layer in layers:
            if layer.stack != ctx.stack:  # a stack begins: the decoder's reads the encoder's output
                if layer.stack == "decoder" and not decode:
                    ctx.memory, h = h, decoder_tokens
                ctx.begin_stack(layer.stack, h if m.input == "tokens" else None)
            kind, cfg, name = layer_kind(layer.kind), layer.config, f"layers.{layer.index}"
            if not kind.sublayer:
                h = kind.lower(ctx, layer, h)
                continue
            before = next(reversed(g.nodes))  # the sublayer's nodes come after it
            x = h
            if cfg.prenorm:
                ctx.module(f"{name}.norm", lambda: L.make_norm(m.norm, m.d_model, m.norm_eps))
                x = ctx.call_module(f"{name}.norm", (x,), _node_name(name, "norm"))
            y = kind.lower(ctx, layer, x)
            if m.dropout:
                ctx.module(f"{name}.dropout", lambda: nn.Dropout(m.dropout))
                y = ctx.call_module(f"{name}.dropout", (y,), _node_name(name, "dropout"))
            h = ctx.call_function(operator.add, (h, y), _node_name(name, "residual")) if cfg.residual else y
            _mark_block(before, name)
        out = ctx.call_function(moe_ops.model_output, (h, tuple(ctx.aux), tuple(ctx.stats)), "model_output")
        g.output(out)
    return low


def _mark_block(before: fx.Node, name: str) -> None:
    """The nodes after ``before`` are sublayer ``name``'s (meta ``block``): the unit that
    ``train.recompute: layers`` recomputes in backward (runtime/recompute.py). Nodes a pass
    inserts between them later belong to it too."""
    node = before.next
    while node.op != "root":
        node.meta["block"] = name
        node = node.next


def make_experts(spec: S.Spec, info: MoEInfo, expert_ids, device, seed: int, init: bool = True):
    """The experts module of MoE layer ``info`` holding ``expert_ids`` (the placement pass's call)."""
    with torch.device(device):
        return MOE.experts_module(info.config, spec.model, expert_ids, seed=seed, layer=info.index, init=init)
