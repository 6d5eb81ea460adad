"""``moedsl inspect``: what the experts of a trained model learned.

The model runs in eval mode over N tokens; a forward hook on each MoE layer's gate module
captures its ``Routing`` (and the gate's ``choose`` is wrapped, for the run only, to see each
token's choices in the router's order before any drop). Nothing in the model or the training
path changes. Per MoE layer it reports:

- the load of every expert: its share of the assignments the router made (before drops) and
  of those kept (after drops), and the share dropped at the evaluation capacity;
- the tokens each expert takes most often (its routed assignments), with how much of the
  expert's assignments they make up and the share of each token's occurrences routed there;
- the routing analysis of Mixtral (Jiang et al. 2024, "Mixtral of Experts", §5, Table 5):
  how often consecutive tokens (positions t and t+1 of one sequence) keep the same expert,
  at the first choice and, for k > 1, sharing at least one of their k choices, each against
  what chance gives.

Chance (``chance_rate``). Consecutive tokens routed independently, each drawing its set of
experts from the distribution of sets measured over all inspected tokens. For the first
choice that is Σ_e f_e², f_e the share of tokens whose first choice is e. For sets A, B of k
experts, by inclusion-exclusion over the experts they share,

    P(A ∩ B ≠ ∅) = Σ_{S ≠ ∅} (-1)^{|S|+1} q_S²,   q_S = share of tokens whose set contains S,

(q_{e} = f_e for k = 1; for k = 2: Σ_e q_e² − Σ_{e<e'} q_{ee'}²). With uniform loads this is
the paper's random baseline: 1/E at the first choice, 1 − C(E−k, k)/C(E, k) for the sets
(46% for E = 8, k = 2; ``uniform_rate``). Both are reported: "chance" given the measured
loads (an unbalanced router repeats itself more often by chance alone) and "uniform".

The first choice is position 0 of the router's choice (top-k lists its best first; with a
balancing bias, the best of score + bias); where a level is dense (softmax, its choices in
expert order) the highest weight. The k choices are the router's, before capacity drops and
before GShard's random dispatch of the second expert. Expert choice (Zhou et al. 2022): a
token has no first choice; its set is the experts that picked it (possibly none), and the
consecutive rate is that of "picked by at least one same expert".
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Optional

import torch
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moedsl.errors import UserError
from moedsl.hf.files import read_tokenizer, side_file
from moedsl.kinds.gates import gate_type
from moedsl.nn import moe_ops
from moedsl.validate import BatchError

from .data import HELD_OUT, data_items, make_source, pystdlib_bytes, source_problems
from .load import build
from .resolve import DCP, resolve
from .span_corruption import shift_right
from .tokens import is_token_folder

DEFAULT_TOKENS = 65536
MAX_SET = 10  # the chance over sets enumerates the 2^size subsets of a token's set


# ----------------------------------------------------------------------------- formulas

def consecutive_rate(sets: torch.Tensor) -> float:
    """Share of consecutive pairs (t, t+1 of one sequence) whose expert sets intersect.
    ``sets`` [B, T, E] bool: the experts of each token (one per token: the first choice)."""
    both = sets[:, :-1] & sets[:, 1:]  # [B, T-1, E]
    pairs = both.shape[0] * both.shape[1]
    return float(both.any(-1).sum()) / pairs if pairs else float("nan")


def chance_rate(sets: torch.Tensor) -> Optional[float]:
    """P(A ∩ B ≠ ∅) for A, B drawn independently from the sets of ``sets`` [N, E] bool (one row
    per token): Σ_{S≠∅} (-1)^{|S|+1} q_S² (see the module docstring). None when a set has more
    than MAX_SET experts (2^size subsets)."""
    N, E = sets.shape
    size = int(sets.sum(-1).max()) if N else 0
    if size > MAX_SET:
        return None
    # ids [N, size]: each row's experts in increasing order, padded with E
    ids = torch.where(sets, torch.arange(E), torch.full_like(sets, E, dtype=torch.int64)).sort(-1).values[:, :size]
    total = 0.0
    for s in range(1, size + 1):
        # every s-subset of every token's set (rows sorted, so one subset has one spelling): [M, s]
        subs = torch.cat([ids[:, list(cols)] for cols in combinations(range(size), s)])
        subs = subs[(subs < E).all(-1)]
        if subs.numel() == 0:
            break
        q = torch.unique(subs, dim=0, return_counts=True)[1].double() / N  # q_S of each subset S present
        total += (1.0 if s % 2 else -1.0) * float((q * q).sum())
    return total


def uniform_rate(experts: int, k: int) -> float:
    """Two independent uniform draws of k of E experts share one: 1 − C(E−k, k)/C(E, k)
    (Mixtral §5's random baseline; 1/E for k = 1)."""
    return 1.0 - math.comb(experts - k, k) / math.comb(experts, k)


def first_choice_chance(first: torch.Tensor, experts: int) -> float:
    """Σ_e f_e², f_e the share of the tokens ``first`` [N] whose first choice is e."""
    f = torch.bincount(first.reshape(-1), minlength=experts).double() / max(first.numel(), 1)
    return float((f * f).sum())


# ----------------------------------------------------------------------------- capture

class _Layer:
    """What one MoE layer's gate did over the inspected batches."""

    def __init__(self, name: str, gate, vocab: int):
        self.name, self.gate = name, gate
        self.E = gate.num_experts
        self.vocab = vocab
        self.routed = torch.zeros(self.E, dtype=torch.float64)  # the router's own expert_load, summed
        self.kept = torch.zeros(self.E, dtype=torch.float64)
        self.dropped = 0
        self.pairs = []  # per batch: token id · E + expert of each routed assignment [A]
        self.occurrences = torch.zeros(vocab, dtype=torch.int64)  # [V] how often each token was seen
        self.first, self.sets = [], []  # per batch: [B, T] int64, [B, T, E] bool
        self.k = None
        self.choice = None  # the last Choice of choose
        self.shape = None  # [B, T] of the current batch
        self.ids = None

    @property
    def expert_choice(self) -> bool:
        """The experts pick their tokens: no per-token top-k."""
        return gate_type(self.spec.type).experts_choose

    @property
    def dense_level(self) -> bool:
        """A level whose choices are all experts in expert order (softmax)."""
        h = getattr(self.gate, "h", None)
        levels = (self.spec,) if h is None else (self.spec, h.primary, h.secondary)
        return any(gate_type(level.type).dense for level in levels)

    def on_choose(self, choice):
        self.choice = choice
        return choice

    def on_route(self, r) -> None:
        B, T = self.shape
        E = self.E
        if self.expert_choice:
            routed = torch.ones_like(r.expert, dtype=torch.bool)
            member = torch.zeros(B * T, E, dtype=torch.bool)
            member[r.token, r.expert] = True
            self.sets.append(member.view(B, T, E))
            self.k = None
        else:
            c = self.choice
            expert = c.expert.reshape(B * T, -1)  # [S, k] the router's choices, its best first
            weight = c.weight.detach().reshape(B * T, -1)
            self.k = expert.shape[-1]
            pos = weight.argmax(-1, keepdim=True) if self.dense_level else torch.zeros(B * T, 1, dtype=torch.int64)
            self.first.append(expert.gather(1, pos).view(B, T))
            member = torch.zeros(B * T, E, dtype=torch.bool).scatter_(1, expert, True)
            self.sets.append(member.view(B, T, E))
            routed = torch.ones_like(r.expert, dtype=torch.bool) if r.routed is None else r.routed
        self.routed += r.expert_load.double().cpu()
        self.kept += r.tokens_per_expert().double().cpu()
        self.dropped += int(r.dropped)
        if self.vocab:
            self.occurrences += torch.bincount(self.ids.reshape(-1), minlength=self.vocab)
            tok = self.ids.reshape(-1)[r.token[routed]]
            self.pairs.append(tok * E + r.expert[routed])


def _gates(model) -> list:
    """(layer name, gate module) of each MoE layer, in graph order."""
    out = []
    for node in model.graph.nodes:
        if node.op == "call_module" and node.meta.get("role") == "route":
            out.append((node.meta["moe_layer"], model.get_submodule(node.target)))
    return out


def _padded(model) -> set:
    """MoE layers computing in the padded [E, C, d] buffers (they cannot be made dropless)."""
    return {n.meta["moe_layer"] for n in model.graph.nodes
            if n.meta.get("role") == "dispatch" and n.target is moe_ops.dispatch}


def capacity_factors(value) -> list:
    """The evaluation capacity factors ``moedsl eval`` and ``inspect`` take (one rule for both):
    ``value`` a number, a list of them, or the CLI's text ("2,1,0.5,0.25"); each finite and
    >= 0, 0 meaning dropless (V-MoE, Riquelme et al. 2021 §4.1, lowers the capacity at
    inference; 0 is the other end of that sweep: nothing dropped). None: ``[None]``, the spec's
    own. A bad one is a ``UserError`` naming --capacity-factor, the value and the item."""
    if value is None:
        return [None]
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        try:
            f = float(item.strip()) if isinstance(item, str) else item
        except ValueError:
            f = None
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
            raise UserError(f"--capacity-factor {value}: {item!r} is not a finite number >= 0 (0: dropless)")
        out.append(float(f))
    if not out:
        raise UserError(f"--capacity-factor {value!r}: no factor given")
    return out


def _dropless_refused(model, names) -> None:
    """Factor 0 (dropless) cannot be given to a layer computing in padded [E, C, d] buffers."""
    bad = sorted(_padded(model) & set(names))
    if bad:
        raise UserError(f"--capacity-factor 0: {bad[0]} computes in padded [E, C, d] buffers (a GPU layout): "
                        "load the model on the CPU to evaluate it dropless")


@contextmanager
def eval_capacity(model, factor: Optional[float]):
    """``model``'s token-choice gates at evaluation capacity factor ``factor`` (``with_capacity``)
    inside the block, as they were after it; yields how many MoE layers that changes. The weights
    are untouched: one loaded model evaluates a whole sweep of factors."""
    gates = [(name, g) for name, g in _gates(model)
             if factor is not None and gate_type(g.spec.type).capacity_is_budget]
    if factor == 0:
        _dropless_refused(model, [name for name, g in gates if g.spec.has_capacity])
    saved = [g.spec for _, g in gates]
    try:
        for _, g in gates:
            g.spec = _with_capacity(g.spec, factor)
        yield len(gates)
    finally:
        for (_, g), spec in zip(gates, saved):
            g.spec = spec


def _with_capacity(gate_spec, factor: Optional[float]):
    """The gate's spec with evaluation capacity factor ``factor`` (0: dropless; a dropless gate
    given a factor > 0 drops past that capacity). Expert choice (its factor is its k) and dense
    softmax gates are left as they are."""
    if factor is None or not gate_type(gate_spec.type).capacity_is_budget:
        return gate_spec
    if factor == 0:
        return replace(gate_spec, capacity_factor=None, eval_capacity_factor=None, expert_capacity=None,
                       eval_capacity_fraction=None, drop_policy="dropless")
    if not gate_spec.has_capacity:
        return replace(gate_spec, capacity_factor=float(factor), eval_capacity_factor=float(factor),
                       drop_policy="drop")
    return replace(gate_spec, eval_capacity_factor=float(factor), eval_capacity_fraction=None)


@torch.no_grad()
def capture(model, batches, vocab: int, capacity_factor: Optional[float] = None) -> list:
    """Run ``model`` (eval mode) over ``batches`` (token ids [B, T] each) and return one
    ``_Layer`` per MoE layer. ``capacity_factor`` overrides every token-choice gate's
    evaluation capacity factor for the run (0: dropless); the model is left as it was."""
    layers = [_Layer(name, gate, vocab) for name, gate in _gates(model)]
    if capacity_factor == 0:
        _dropless_refused(model, [l.name for l in layers if l.gate.spec.has_capacity])
    was = model.training
    saved, hooks = [], []
    try:
        model.eval()
        for l in layers:
            saved.append(l.gate.spec)
            l.gate.spec = l.spec = _with_capacity(l.gate.spec, capacity_factor)
            if not l.expert_choice:
                inner = l.gate.choose
                l.gate.choose = (lambda inner, l: lambda *a, **kw: l.on_choose(inner(*a, **kw)))(inner, l)
            hooks.append(l.gate.register_forward_hook(lambda m, args, out, l=l: l.on_route(out)))
        spec = getattr(model, "spec", None)
        encdec = spec is not None and spec.encoder_decoder
        for ids in batches:
            args = ()
            if encdec:  # the text is the source; the decoder reads it back, shifted right (its denoising target)
                args = (shift_right(ids, spec.model.decoder_start_id), None)
            for l in layers:
                decoder = encdec and spec.layers[int(l.name.split(".")[1])].stack == "decoder"
                l.shape, l.ids = tuple(ids.shape), args[0] if decoder else ids
            model(ids, *args)
    finally:
        for h in hooks:
            h.remove()
        for l, spec in zip(layers, saved):
            l.gate.spec = spec
            if "choose" in l.gate.__dict__:
                del l.gate.choose
        model.train(was)
    return layers


# ----------------------------------------------------------------------------- figures

def layer_figures(l: _Layer, top: int, decode) -> dict:
    """The figures of one layer (plain numbers and lists: JSON-able)."""
    E = l.E
    assigned = float(l.routed.sum())
    kept = float(l.kept.sum())
    sets = torch.cat(l.sets)  # [B, T, E]
    g = l.spec
    cap = None
    if g.has_capacity:
        cap = g.eval_capacity_factor or g.capacity_factor
    fig = {"layer": l.name, "gate": g.type, "experts": E, "k": l.k if l.k is not None else None,
           "capacity_factor": cap, "assignments": int(assigned), "dropped": l.dropped,
           "dropped_share": l.dropped / assigned if assigned else 0.0,
           "load": (l.routed / max(assigned, 1.0)).tolist(), "kept_load": (l.kept / max(kept, 1.0)).tolist(),
           "routed_counts": [int(x) for x in l.routed], "kept_counts": [int(x) for x in l.kept]}
    cons = {"pairs": sets.shape[0] * (sets.shape[1] - 1)}
    if l.expert_choice:
        cons["first"] = None
        cons["note"] = "expert choice: a token has no first choice; 'shared' is picked by at least one same expert"
        cons["shared"] = {"rate": consecutive_rate(sets), "chance": chance_rate(sets.flatten(0, 1)),
                          "uniform": None}
    else:
        first = torch.cat(l.first)  # [B, T]
        one = torch.zeros(*first.shape, E, dtype=torch.bool).scatter_(-1, first[..., None], True)
        cons["first"] = {"rate": consecutive_rate(one), "chance": first_choice_chance(first, E),
                         "uniform": 1.0 / E}
        if l.k is None or l.k <= 1:
            cons["shared"] = None
        elif l.k >= E:
            cons["shared"] = None
            cons["note"] = f"every token goes to all {E} experts (k = {l.k}): the top-k sets always share"
        else:
            cons["shared"] = {"k": l.k, "rate": consecutive_rate(sets), "chance": chance_rate(sets.flatten(0, 1)),
                              "uniform": uniform_rate(E, l.k)}
    fig["consecutive"] = cons
    fig["top_tokens"] = _top_tokens(l, top, decode) if l.vocab else None
    return fig


def _top_tokens(l: _Layer, top: int, decode) -> list:
    """Per expert: its ``top`` most frequent tokens (of its routed assignments), each with its count,
    its share of the expert's assignments and the share of the token's occurrences routed there
    (``of_token``; with k > 1 the shares of one token sum to k over the experts)."""
    # distinct (token, expert) pairs and their counts: memory by assignments, not vocabulary × experts
    keys, counts = torch.unique(torch.cat(l.pairs), return_counts=True)
    token, expert = keys // l.E, keys % l.E
    out = []
    for e in range(l.E):
        mine = expert == e
        ids, col = token[mine], counts[mine]
        total = int(col.sum())
        best = torch.topk(col, min(top, ids.numel())).indices.tolist() if ids.numel() else []
        toks = [{"id": int(ids[i]), "text": decode(int(ids[i])), "count": int(col[i]), "share": int(col[i]) / total,
                 "of_token": int(col[i]) / int(l.occurrences[ids[i]])} for i in best]
        out.append({"expert": e, "assignments": total, "distinct": ids.numel(),
                    "top_share": sum(x["share"] for x in toks), "tokens": toks})
    return out


# ----------------------------------------------------------------------------- tokens and text

def byte_piece(i: int) -> str:
    """A byte id as its piece, quoted so whitespace shows: printable ASCII as it is (``' '``, ``'a'``),
    the rest escaped (``'\\n'``, ``'\\x00'``, ``'\\xc8'``: half of a UTF-8 character)."""
    return repr(bytes([i]))[1:] if 0 <= i < 256 else f"#{i}"


def tokenizer_piece(tokenizer, i: int) -> str:
    """Token ``i`` of a ``tokenizers`` tokenizer as the text it stands for, quoted (``' the'``,
    ``'\\n'``). A SentencePiece word start (``▁the``) keeps its space, which the decoder drops at
    the start of a text; where the token is no text of its own (a byte-fallback ``<0xC3>``, half
    a character; a token the decoder drops) its vocabulary entry is shown instead."""
    raw = tokenizer.id_to_token(i)
    text = tokenizer.decode([i], skip_special_tokens=False)
    if raw is not None and raw.startswith("▁") and not text.startswith(" "):
        text = " " + text
    if not text or "\ufffd" in text:
        text = raw if raw is not None else f"#{i}"
    return repr(text)


# how the tokens of a vocabulary are shown: pieces of a tokenizer.json (with their ids), bytes, or ids
TOKENIZER, BYTES, IDS = "tokenizer", "bytes", "ids"


def _decoder(tokenizer, byte_level: bool):
    """id -> what the tables show of it: the tokenizer's piece, the byte, or the id itself."""
    if tokenizer is not None:
        return lambda i: tokenizer_piece(tokenizer, i)
    return byte_piece if byte_level else str


def _tokenizer(folder: Optional[Path]):
    """The ``tokenizers`` tokenizer of an import folder's tokenizer.json, or None (no file); one
    the library is missing to read is a ``UserError`` (``moedsl.hf.files.read_tokenizer``)."""
    return read_tokenizer([folder])


def _looks_like_path(value: str) -> bool:
    """A ``--text`` value meant as a file: one word with a folder or a suffix (``notes.txt``)."""
    return not any(c.isspace() for c in value) and ("/" in value or os.sep in value or Path(value).suffix != "")


def _text_of(value: str) -> tuple:
    """(the text, whether it came from a file) of ``--text``: a file read whole, or else the text
    itself; a value that names no file but reads as a path is refused as a missing file."""
    p = Path(value)
    if p.is_file():
        return p.read_bytes().decode("utf-8", errors="replace"), True
    if p.is_dir() or _looks_like_path(value):
        raise UserError(f"--text {value!r}: {'is a directory' if p.is_dir() else 'no such file'} "
                        "(give a text file, or the text itself)")
    return value, False


def _encode(text: str, tokenizer, vocab: int, what: str, need: Optional[int] = None) -> torch.Tensor:
    """The ids of ``text``: through ``tokenizer``, else its UTF-8 bytes (``vocab`` >= 256). ``need``:
    at least that many ids of its beginning are enough (a held-out part of 600 KB need not be
    encoded whole for 64K tokens). An id past the model's vocabulary is a ``UserError``."""
    if tokenizer is None:
        if vocab < 256:
            raise UserError(f"{what}: the model has no tokenizer.json and model.vocab_size = {vocab} < 256, so "
                            "the text cannot be read as bytes")
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    n = len(text) if need is None else 16 * need
    while True:
        ids = tokenizer.encode(text[:n]).ids
        if need is None or len(ids) >= need or n >= len(text):
            break
        n *= 4
    ids = torch.tensor(ids, dtype=torch.int64)
    if ids.numel() and int(ids.max()) >= vocab:
        raise UserError(f"{what}: the tokenizer.json gives id {int(ids.max())}, past model.vocab_size = {vocab}")
    return ids


def _text_ids(path: str, tokenizer, vocab: int) -> torch.Tensor:
    """The ids of ``--text`` (a file, or the text itself)."""
    return _encode(_text_of(path)[0], tokenizer, vocab, f"--text {path!r}")


def _held_out_text(data: str) -> str:
    """The held-out part of a text source, as ``moedsl run --data`` holds it out: pystdlib's held-out
    files, or a text file's last ``HELD_OUT``."""
    if data == "pystdlib":
        raw = pystdlib_bytes()[1]
    else:
        p = Path(data)
        if not p.is_file():
            raise UserError(f"--data {data!r}: {'is a directory' if p.is_dir() else 'no such file'} "
                            "(give a text file, synthetic or pystdlib)")
        raw = p.read_bytes()
        raw = raw[int(len(raw) * (1 - HELD_OUT)):]
    return raw.decode("utf-8", errors="replace")


def _batches_of(ids: torch.Tensor, batch: int, seq: int, tokens: int, what: str) -> list:
    """Consecutive windows of ``seq`` tokens of ``ids``, ``batch`` to a batch, up to ``tokens`` tokens
    (whole batches only: the routing groups split whole batches)."""
    windows = ids.numel() // seq
    n = min(windows // batch, max(tokens // (batch * seq), 1))
    if n == 0:
        raise UserError(f"{what}: {ids.numel()} tokens, fewer than one batch of {batch} × {seq} "
                        "(give more text, or a smaller --batch / --seq)")
    return list(ids[:n * batch * seq].view(n, batch, seq))


# ----------------------------------------------------------------------------- the whole

def inspect(model, *, checkpoint=None, text: Optional[str] = None, data: Optional[str] = None,
            tokens: int = DEFAULT_TOKENS, seq: Optional[int] = None, batch: Optional[int] = None,
            capacity_factor: Optional[float] = None, top: int = 8) -> dict:
    """The routing figures of a trained model (see the module docstring) as a dict.

    ``model``: a ``moedsl run`` output folder (its newest checkpoint), an import folder, or a
    spec with ``checkpoint``. ``text``: a file, read whole, or else the text itself; ``data``:
    ``synthetic``, ``pystdlib`` or a text file, its held-out part, as ``moedsl run --data``.
    Default: the run's data (the spec's train.data), except that a model with a tokenizer.json
    (an import; a run started from one) reads real text where that is synthetic: pystdlib's
    held-out part. Text goes through the tokenizer.json where there is one, else it is read as
    bytes (a byte-level run); the tables show each token as its piece (with its id for a
    tokenizer), and synthetic data's tokens without a tokenizer as ids.
    ``tokens`` inspected in sequences of ``seq`` (default the run's seq_len; a text given
    itself that is shorter than a batch of them is one sequence, unless ``seq`` or ``batch``
    is given), ``batch`` to a batch (default the run's: the routing groups and the capacity follow it).
    ``capacity_factor``: every token-choice gate's evaluation capacity factor (0: dropless; a
    dropless gate then drops past that capacity).
    ``top``: tokens shown per expert."""
    if text is not None and data is not None:
        raise UserError("give --text FILE or --data SOURCE, not both")
    for name, v in (("--tokens", tokens), ("--top", top)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} {v}: must be a whole number >= 1")
    factors = capacity_factors(capacity_factor)
    if len(factors) > 1:
        raise UserError(f"--capacity-factor {capacity_factor}: inspect takes one factor (moedsl eval sweeps several)")
    capacity_factor = factors[0]
    source = resolve(model, checkpoint)
    spec = source.spec
    if spec.model.input != "tokens":
        raise UserError(f"{spec.name}: inspect reads token models; this one has model.input: {spec.model.input}")
    if not spec.moe_layers:
        raise UserError(f"{spec.name}: the model has no MoE layer to inspect")
    meta_train = source.meta.get("train") or {}
    seq_given, batch_given = seq is not None, batch is not None
    seq = seq or int(meta_train.get("seq") or spec.train.seq_len)
    batch = batch or int(meta_train.get("batch") or spec.train.batch_size)
    if seq > spec.model.max_seq_len:
        raise UserError(f"--seq {seq}: longer than model.max_seq_len = {spec.model.max_seq_len}")
    if seq < 2:
        raise UserError(f"--seq {seq}: consecutive tokens need sequences of at least 2")
    # the import's tokenizer.json, or the one `run --init` copied beside a run started from an import
    tok = read_tokenizer(source.folders)
    vocab = spec.model.vocab_size
    if text is not None:
        body, from_file = _text_of(text)
        ids = _encode(body, tok, vocab, f"--text {text!r}")
        if not from_file and not (seq_given or batch_given) and ids.numel() < batch * seq:
            # a text given itself, shorter than a batch: read whole, as one sequence
            if ids.numel() < 2:
                raise UserError(f"--text {text!r}: {ids.numel()} token(s); consecutive tokens need at least 2")
            batch, seq = 1, min(ids.numel(), spec.model.max_seq_len)
        source_name = text if from_file else repr(text if len(text) <= 40 else text[:39] + "…")
        data_from = "--text, read whole" if from_file else "--text"
        batches = _batches_of(ids, batch, seq, tokens, f"--text {text!r}")
        shown = TOKENIZER if tok is not None else BYTES
    else:
        data_from = "--data"
        if data is None:
            data = meta_train.get("data") or spec.train.data
            data_from = "the run's data" if meta_train.get("data") else "the spec's train.data"
            if data == "synthetic" and tok is not None:
                data, data_from = "pystdlib", "default: the model has a tokenizer.json"
        prepared = data != "synthetic" and any(is_token_folder(it.path) for it in data_items(data))
        if data != "synthetic" and tok is not None and not prepared:  # text through the tokenizer, not bytes
            need = max(tokens, batch * seq)
            ids = _encode(_held_out_text(data), tok, vocab, f"--data {data!r}", need=need)
            batches = _batches_of(ids, batch, seq, tokens, f"--data {data!r} (its held-out part)")
            shown = TOKENIZER
        else:
            # prepared folders: their held-out windows, checked against the tokenizer the model has
            origin = source.origin  # as `moedsl eval` takes it
            found = source_problems(spec, data, seq, init=origin)
            if found:
                raise UserError(found[0])
            src = make_source(spec, data, int(meta_train.get("seed", spec.train.seed)), init=origin)
            n = max(tokens // (batch * seq), 1)
            batches = [src.batch(i, batch, seq, split="eval").inputs for i in range(n)]
            shown = TOKENIZER if tok is not None else IDS if data == "synthetic" else BYTES
        source_name = data
    net = build(source)
    try:
        layers = capture(net, batches, vocab, capacity_factor)
    except (ValueError, RuntimeError) as e:  # a batch the routing groups do not split (BatchError)
        if isinstance(e, BatchError):
            raise UserError(f"--batch {batch} × --seq {seq}: {e}") from None
        raise
    decode = _decoder(tok if shown == TOKENIZER else None, shown == BYTES)
    step = source.meta.get("step") if source.kind == DCP else None
    tok_file = side_file(source.folders, "tokenizer.json")
    return {"model": spec.name, "weights": str(source.path), "step": step,
            "run": str(source.run) if source.run else None,
            "data": source_name, "held_out": text is None and data != "synthetic", "data_from": data_from,
            "shown": shown,
            "tokenizer": str(tok_file) if shown == TOKENIZER else None,
            "tokens": sum(b.numel() for b in batches), "sequences": len(batches) * batch,
            "seq": seq, "batch": batch, "capacity_factor": capacity_factor,
            "layers": [layer_figures(l, top, decode) for l in layers]}


# ----------------------------------------------------------------------------- output

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_line(fig: dict) -> str:
    """One line per layer: gate, capacity, drops and the consecutive rates against chance."""
    cap = "dropless" if fig["capacity_factor"] is None else f"eval capacity factor {fig['capacity_factor']:g}"
    k = "" if fig["k"] is None else f", k = {fig['k']}"
    parts = [f"{fig['layer']} ({fig['gate']}, {fig['experts']} experts{k}, {cap}): "
             f"{_pct(fig['dropped_share'])} of assignments dropped"]
    c = fig["consecutive"]
    if c["first"] is not None:
        f = c["first"]
        parts.append(f"consecutive tokens keep the first choice {_pct(f['rate'])} (chance {_pct(f['chance'])}, "
                     f"uniform {_pct(f['uniform'])})")
    if c["shared"] is not None:
        s = c["shared"]
        what = f"share one of their top-{s['k']}" if "k" in s else "share a picking expert"
        parts.append(f"{what} {_pct(s['rate'])} (chance {_pct(s['chance'])}"
                     + (f", uniform {_pct(s['uniform'])})" if s.get("uniform") is not None else ")"))
    return "; ".join(parts)


PIPED_WIDTH = 80  # the width of the tables where stdout is no terminal (a pipe, a file)


def output_console(file=None) -> Console:
    """The rich Console inspect prints with: the terminal's width on a terminal; where stdout is
    piped, ``COLUMNS`` if set, else 80 (rich alone would take the width of a terminal on stdin
    or stderr, and a table piped from a wide terminal would be that wide)."""
    out = file if file is not None else sys.stdout
    tty = getattr(out, "isatty", lambda: False)()
    columns = os.environ.get("COLUMNS", "")
    return Console(file=file, width=None if tty else int(columns) if columns.isdigit() and int(columns) else
                   PIPED_WIDTH)


def wrap_between(entries: list, width: int, sep: str = "  ") -> str:
    """``entries`` joined by ``sep`` in lines of at most ``width`` cells, broken between entries only
    (an entry wider than a line has one to itself)."""
    lines = []
    for item in entries:
        if lines and cell_len(lines[-1] + sep + item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return "\n".join(lines)


def _entry(x: dict, shown: str) -> str:
    """One token of an expert's list: its piece (and id, for a tokenizer's), its count, the share of
    the token's occurrences that go to the expert."""
    what = f"{x['text']} #{x['id']}" if shown == TOKENIZER else x["text"]
    return f"{what} {x['count']} ({x['of_token']:.0%})"


def header_lines(result: dict) -> list:
    """What was inspected: the model, the text (or synthetic data) and why, the tokenizer (how the
    tokens are shown), how many tokens."""
    step = f" at step {result['step']}" if result["step"] is not None else ""
    what = "data" if result["data"] == "synthetic" else "text"
    held = ", its held-out part" if result.get("held_out") else ""
    shown = {TOKENIZER: f"tokenizer: {result['tokenizer']} (tokens shown as 'piece' #id)",
             BYTES: "tokenizer: none, the vocabulary is bytes (tokens shown as 'a', ' ', '\\n')",
             IDS: "tokenizer: none (tokens shown as ids: synthetic data is no text)"}[result.get("shown", IDS)]
    return [f"{result['model']}{step} ({result['weights']})",
            f"{what}: {result['data']}{held} ({result['data_from']})", shown,
            f"{result['tokens']:,} tokens in {result['sequences']} sequences of {result['seq']}"]


def print_tables(result: dict, console) -> None:
    """A rich table per MoE layer: each expert's load, kept load and most frequent tokens, sized to
    the console's width (the token lists wrap between entries)."""
    for line in header_lines(result):
        console.print(line, highlight=False, markup=False)
    shown = result.get("shown", IDS)
    for fig in result["layers"]:
        console.print(summary_line(fig), highlight=False, markup=False)
        # expert, load, kept, top-N: 6 cells each, 3 between columns (" │ ")
        width = max(console.width - 4 * 6 - 4 * 3, 16)
        t = Table(show_edge=False, pad_edge=False)
        for col in ("expert", "load", "kept", "top-N"):
            t.add_column(col, justify="right", width=6, no_wrap=True)
        t.add_column("its tokens: count (share of the token)", justify="left", width=width, no_wrap=True,
                     overflow="fold")
        tops = fig["top_tokens"] or [None] * fig["experts"]
        for e in range(fig["experts"]):
            top = tops[e]
            words = "-" if top is None else wrap_between([_entry(x, shown) for x in top["tokens"]], width)
            t.add_row(str(e), _pct(fig["load"][e]), _pct(fig["kept_load"][e]),
                      "-" if top is None else _pct(top["top_share"]), Text(words))
        console.print(t)


def _legend_beside(ax) -> None:
    """The axes' legend to the right of it, outside: inside (upper right) it covered the tallest
    bars, the last experts' load or the measured rate. ``tight_layout`` makes room for it."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def write_png(result: dict, path: Path) -> Path:
    """Per MoE layer: the load of each expert (routed and kept, uniform 1/E dashed) and the
    consecutive rates against chance and uniform. Written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = result["layers"]
    n = len(figs)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.1 * n + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, f in zip(axes, figs):
        E = f["experts"]
        ax = row[0]
        x = torch.arange(E).tolist()
        w = 0.4
        ax.bar([i - w / 2 for i in x], f["load"], w, label="routed")
        ax.bar([i + w / 2 for i in x], f["kept_load"], w, label="kept")
        ax.axhline(1.0 / E, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("share")
        ax.set_title(f"{f['layer']} ({f['gate']}): load per expert, {_pct(f['dropped_share'])} dropped", fontsize=9)
        if E <= 32:
            ax.set_xticks(x)
        ax.tick_params(labelsize=7)
        _legend_beside(ax)
        ax = row[1]
        c = f["consecutive"]
        groups = [(name, c[key]) for name, key in (("first choice", "first"), ("shared top-k", "shared"))
                  if c.get(key) is not None]
        for j, (name, v) in enumerate(groups):
            vals = [v["rate"], v["chance"] or 0.0, v.get("uniform") or 0.0]
            ax.bar([j - 0.27, j, j + 0.27], vals, 0.25, color=["C0", "C1", "C7"],
                   label=["measured", "chance (loads)", "uniform"] if j == 0 else None)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("consecutive tokens, same expert", fontsize=9)
        ax.tick_params(labelsize=7)
        _legend_beside(ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80, bbox_inches="tight")  # the legends beside the axes are in the image
    plt.close(fig)
    os.replace(tmp, path)
    return path


def default_out(model, result: dict) -> Path:
    """MODEL/inspect for a run folder, else ./inspect-NAME."""
    return Path(result["run"]) / "inspect" if result.get("run") else Path(f"inspect-{result['model']}")
