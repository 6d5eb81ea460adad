"""``torch.compile`` (TorchInductor) over the dense parts of a compiled model's graph.

moedsl owns its fx graph, so it compiles only what inductor can trace with static shapes:

    embedding, norms, attention, residual adds, shared experts, head     -> compiled segments
    routing, dispatch, experts, combine, collectives, router statistics  -> eager, as built

The MoE layer's nodes stay eager because their shapes depend on the routing (dropless rows
per expert), they call the CPU kernel through ctypes (moedsl/nn/cpu_gemm.py) and the
collectives' split sizes are host values; TorchDynamo would break the graph at each of them,
once per layer (and the gates keep state in buffers: rng_step, load_acc). The rest of the
graph is partitioned into maximal runs of dense nodes (each dense node moved as late as its
eager users allow, never across a collective, so a run spans from one MoE layer's combine to
the next one's router); each run becomes an fx GraphModule over the model's own modules
(shared, not copied) compiled with ``fullgraph=True``. The model's graph, parameter names and
state dict are unchanged: only its ``forward`` runs the partitioned graph.

Compiled segments run when autograd records (training); without gradients (evaluation,
inference) the same segments run eagerly, so a run compiles each segment once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from moedsl.compiler.collectives import COLLECTIVE_ROLES
from moedsl.errors import MoedslError

MODES = ("auto", "on", "off")
# nodes of an MoE layer (meta "moe_layer") that are dense computations on every token
DENSE_MOE_ROLES = frozenset({"shared", "shared_gate", "moe_out", "unflatten"})
# modules whose functions a segment never calls: data-dependent shapes, ctypes, collectives
_EAGER_MODULES = ("moedsl.nn.moe_ops", "moedsl.compiler.collectives", "compiler.collectives")


def is_dense(node: fx.Node) -> bool:
    """Whether inductor may compile ``node``: a computation outside the MoE layers' routing,
    dispatch, experts and combine, and not a collective."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    if "moe_layer" in node.meta and node.meta.get("role") not in DENSE_MOE_ROLES:
        return False
    module = getattr(node.target, "__module__", None) or ""
    return not module.startswith(_EAGER_MODULES)


def is_collective(gm: nn.Module, node: fx.Node) -> bool:
    """A collective node (its module or function from moedsl.compiler.collectives, or one of its
    ``COLLECTIVE_ROLES``): dense nodes never move across it, so where the compiler put computation
    to overlap with communication stays as it is."""
    target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
    module = getattr(target, "__module__", None) or getattr(type(target), "__module__", "") or ""
    return module.startswith(_EAGER_MODULES[1:]) or node.meta.get("role") in COLLECTIVE_ROLES


def schedule(gm: fx.GraphModule) -> list:
    """The graph's nodes in an order where dense nodes run as late as the eager nodes that need
    them allow (a valid topological order; collectives keep their place relative to everything)."""
    order, pending = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or is_dense(node):
            (order if node.op == "placeholder" else pending).append(node)
            continue
        if node.op == "output" or (node.op != "get_attr" and is_collective(gm, node)):
            order.extend(pending)
            pending = []
        else:
            needed, stack, waiting = set(), list(node.all_input_nodes), set(pending)
            while stack:
                n = stack.pop()
                if n in waiting and n not in needed:
                    needed.add(n)
                    stack.extend(n.all_input_nodes)
            order.extend(n for n in pending if n in needed)
            pending = [n for n in pending if n not in needed]
        order.append(node)
    return order


@dataclass
class Segment:
    """A run of dense nodes: ``inputs`` (nodes defined before it) -> ``outputs`` (used after it)."""

    nodes: list
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def segments(order: list) -> list:
    """Maximal runs of consecutive dense nodes in ``order``; a run without a module call (a lone
    add or view) is not worth a compilation and stays eager."""
    runs, run = [], []
    for node in order:
        if node.op != "placeholder" and is_dense(node):
            run.append(node)
            continue
        if run:
            runs.append(run)
        run = []
    if run:
        runs.append(run)
    out = []
    for nodes in runs:
        if not any(n.op == "call_module" for n in nodes):
            continue
        out.append(segment(nodes))
    return out


def segment(nodes: list) -> Segment:
    """``nodes`` (consecutive in an order the graph may run in) as a Segment: its inputs, the
    nodes outside it that it reads, and its outputs, its nodes read outside it."""
    inside = set(nodes)
    inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return Segment(nodes, inputs, outputs)


def segment_module(root: nn.Module, seg: Segment) -> fx.GraphModule:
    """``forward(*inputs) -> tuple(outputs)`` over ``root``'s own submodules (not copies)."""
    g = fx.Graph()
    env = {a: g.placeholder(a.name) for a in seg.inputs}
    for n in seg.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in seg.outputs))
    return fx.GraphModule(root, g, class_name="DenseSegment")


class CompiledSegment(nn.Module):
    """One dense segment: compiled when autograd records, else eager. The first compiled call
    compiles; where the compiled call fails and the eager one does not (an error of the
    computation itself is raised as it is), every segment runs eager from then on (``auto``), or
    the run stops (``on``)."""

    def __init__(self, eager: fx.GraphModule, state: "CompileState", index: int):
        super().__init__()
        self.eager, self.state, self.index = eager, state, index
        self.compiled = torch.compile(eager, fullgraph=True, dynamic=False)

    def forward(self, *args):
        st = self.state
        if st.failed or not torch.is_grad_enabled():
            return self.eager(*args)
        first = self.index not in st.compiled
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compile failure: fall back, or fail in `on` mode
            out = self.eager(*args)  # an error of the computation itself is raised here, as eagerly
            st.fail(e, self.index)
            return out
        if first:
            st.compiled.add(self.index)
            st.seconds += time.perf_counter() - t0
        return out


@dataclass
class CompileState:
    mode: str
    say: Callable[[str], None]
    segments: int = 0
    compiled: set = field(default_factory=set)
    seconds: float = 0.0  # time spent in first (compiling) calls
    failed: Optional[str] = None

    def fail(self, e: Exception, index: int) -> None:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        if self.mode == "on":
            raise MoedslError(f"--compile on: torch.compile of dense segment {index} failed ({why})") from e
        self.failed = why
        self.say(f"torch.compile failed ({why}); running eager")


def compile_model(gm: fx.GraphModule, mode: str = "on", say: Optional[Callable[[str], None]] = None) -> CompileState:
    """Make ``gm`` run its dense segments compiled (see the module docstring). ``gm.graph``,
    its modules and state dict stay as they are; ``gm.forward`` runs the partitioned graph.
    Returns the state (segments, compile seconds, a failure) also kept as ``gm.compile_state``."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}, not {mode!r}")
    state = CompileState(mode=mode, say=say or (lambda msg: None))
    order = schedule(gm)
    segs = segments(order)
    state.segments = len(segs)
    runner = partitioned(gm, order, segs, lambda i, seg: (f"dense_{i}", CompiledSegment(segment_module(gm, seg),
                                                                                          state, i)), "Compiled")
    gm.__dict__["compile_state"] = state
    gm.__dict__["_compiled_runner"] = runner
    gm.forward = runner.forward
    return state


def partitioned(gm: fx.GraphModule, order: list, segs: list, make: Callable, suffix: str) -> fx.GraphModule:
    """A GraphModule running ``gm``'s nodes in ``order``, each segment of ``segs`` as one call of
    the module ``make(i, seg)`` returns (with its name), the other nodes as they are, over
    ``gm``'s own modules: what ``gm.forward`` becomes while its graph, parameter names and state
    dict stay as they are (here, and ``train.recompute: layers`` in runtime/recompute.py)."""
    g = fx.Graph()
    env: dict = {}
    root: dict = {}
    where = {n: (i, seg) for i, seg in enumerate(segs) for n in seg.nodes}
    done = set()
    for node in order:
        if node in where:
            i, seg = where[node]
            if i in done:
                continue
            done.add(i)
            name, module = make(i, seg)
            root[name] = module
            call = g.call_module(name, tuple(env[a] for a in seg.inputs))
            for j, out in enumerate(seg.outputs):
                env[out] = g.call_function(_item, (call, j))
                env[out].name = out.name
            continue
        new = g.node_copy(node, lambda a: env[a])
        env[node] = new
        if node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr":
            root[node.target] = _get_attr(gm, node.target)
    return fx.GraphModule(root, g, class_name=type(gm).__name__ + suffix)


def _item(t: tuple, i: int):
    return t[i]


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ``auto`` on a CPU, from measurements on a 2-core machine (README, "Compiled steps"): the dense
# segments save about SAVED_S seconds per step per (token of the rank's batch × d_model × dense
# module of the graph), and their first call compiles for up to WARMUP_S seconds (a cold inductor
# cache; a warm one, on a second run of the same shapes, takes a few seconds). ``auto`` compiles
# when the projected saving over the run is at least twice that.
SAVED_S = 2.2e-9
WARMUP_S = 60.0


def dense_modules(gm: fx.GraphModule) -> int:
    """Module calls (embedding, norms, attention, shared experts, head) in the dense segments."""
    return sum(n.op == "call_module" for seg in segments(schedule(gm)) for n in seg.nodes)


def projected_saving(gm: fx.GraphModule, tokens: int, d_model: int, steps: int) -> float:
    """Seconds the compiled segments would save over ``steps`` steps of ``tokens`` tokens per rank
    (before the compilation's own time)."""
    return steps * SAVED_S * tokens * d_model * dense_modules(gm)


def decide(mode: str, device, model: Optional[fx.GraphModule] = None, tokens: int = 0, steps: int = 0) -> bool:
    """Whether a run compiles its dense segments: ``on``/``off`` as said. ``auto``: on a CPU when
    ``projected_saving`` is at least 2 × WARMUP_S; never on a GPU (not measured there; a static
    graph's step is captured as a CUDA graph instead)."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type != "cpu" or model is None:
        return False
    d_model = model.spec.model.d_model if hasattr(model, "spec") else 0
    return projected_saving(model, tokens, d_model, steps) >= 2 * WARMUP_S


def use_compile(model: fx.GraphModule, options, device, say, world: int = 1) -> bool:
    """The Trainer's switch (``RunOptions.compile``): compile ``model``'s dense segments when
    ``decide`` says so; True when it did (a failure at the first step still falls back, in ``auto``)."""
    tokens = options.batch // max(world, 1) * options.seq
    if not decide(options.compile, device, model, tokens, options.steps):
        return False
    state = compile_model(model, options.compile, say.once)
    say.once(f"torch.compile on: {state.segments} dense segments (the MoE layers stay eager) compile at the "
             "first step")
    return True
