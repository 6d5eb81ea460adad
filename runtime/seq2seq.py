"""Encoder–decoder data: ``train.objective`` span_corruption and seq2seq (runtime/span_corruption.py
builds the rows and batches).

- ``span_corruption``: any text moedsl reads as a language model's (pystdlib, a text file, a
  prepared folder or a mixture; read as bytes by a model with a byte vocabulary and no tokenizer,
  else as its tokenizer's ids), each row's window corrupted as T5 corrupts it.
- ``seq2seq`` (an encoder–decoder's default): ``synthetic``, a copy task (``CopyPairs``), or a
  JSONL file of ``{"source": str, "target": str}`` records, one example a row: the
  source and the target each tokenized with the model's tokenizer (without its added special
  tokens), or as UTF-8 bytes for a byte model, each then ``model.eos_id`` (T5 appends eos to both
  features). A source or target longer than ``seq`` is cut to ``seq − 1`` tokens and keeps its
  eos (seqio's ``append_eos_after_trim``); ``notes`` counts the cut ones. The decoder length is
  ``seq`` too. One record in 20 is held out by the hash of its line (runtime/instruct.py
  ``held_out``), and training batch s, row r is example s·B + r of an endless stream of epochs
  seeded by (seed, epoch), so batches are a function of (seed, step, rank's rows).

The ids the data adds to the text (``Specials``): ``model.pad_id``, ``model.eos_id``,
``model.decoder_start_id``, and span corruption's sentinels. Sentinel i is the tokenizer's
``<extra_id_i>`` where it names those (T5's and Switch's tokenizers: their ids are that
tokenizer's vocabulary size − 1 − i, below the model's padded vocabulary), else id
``vocab_size − 1 − i``, which must lie above every id of the text (bytes: 255; a tokenizer: its
largest id) and differ from the pad, eos and start ids. Text read as bytes owns ids 0..255, so a
byte model's pad, eos and start ids lie above 255 too (e.g. vocab_size 384, pad_id 256, eos_id 257,
decoder_start_id 256); a tokenizer's pad and eos are its special tokens or ids above its largest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moedsl.errors import UserError, format_path

from .data import (Epochs, Source, data_items, is_prepared, not_bytes, seeded_generator, text_problems, text_source,
                   vocabulary_not_bytes)
from .instruct import PAIRS, SNIFF_BYTES, held_out, kind_of, read_records
from .span_corruption import Specials, SpanCorruption, lengths, seq2seq_batch
from .tokenizer_train import load_tokenizer
from .tokens import TOKENIZER, model_tokenizer, open_tokens, tokenizer_entries, tokenizer_max_id

BYTES = 256  # text read as bytes: ids 0..255
SPECIAL_FIELDS = ("pad_id", "eos_id", "decoder_start_id")


def _at(spec, path: tuple, message: str) -> str:
    """``message`` about the spec's value at ``path``, located as a spec error is (FILE:LINE:COL)."""
    located = getattr(spec, "located", None)
    if located is None:
        return f"{spec.source}: {format_path(path)}: {message}"
    return located.issue(path, message).format(spec.source)


def encoder_decoder_data(spec) -> bool:
    """Whether ``spec`` trains on encoder–decoder batches (runtime/data.py sends its data here):
    an encoder–decoder, whose objective is span_corruption or seq2seq (validate.py)."""
    return spec.model.input == "tokens" and spec.train.objective != "lm"


# ----------------------------------------------------------------------------- the special ids

def _text_ids(spec, data: str, init) -> tuple:
    """(what the text's ids are, for messages; the tokenizer.json they come from or None for
    bytes): the model's tokenizer, else that of the prepared folders of ``data``."""
    tokenizer = model_tokenizer(spec, init)
    if tokenizer is not None:
        return f"its tokenizer {tokenizer}", Path(tokenizer)
    items = data_items(data) if spec.train.objective == "span_corruption" else []
    if items and all(is_prepared(it.path) for it in items):
        folder = open_tokens(items[0].path).path
        return f"the tokenizer {folder / TOKENIZER} --data was prepared with", folder / TOKENIZER
    return "text read as bytes", None


def specials(spec, data: str, init=None) -> Specials:
    """The ids ``spec``'s encoder–decoder data adds to the text of ``data`` (module docstring); a
    ``UserError`` naming the model field where one collides with the text."""
    m = spec.model
    what, tokenizer = _text_ids(spec, data, init)
    ids = {name: getattr(m, name) for name in SPECIAL_FIELDS}  # each < vocab_size (validate.py)
    top = _top(tokenizer)
    if tokenizer is None:
        for name, i in ids.items():
            if i <= top:
                raise UserError(_at(spec, ("model", name), f"{i} is byte {i} of the text (--data {data} is read as "
                                    "bytes, ids 0..255): put pad_id, eos_id and decoder_start_id above 255 (e.g. "
                                    "vocab_size 384, pad_id 256, eos_id 257, decoder_start_id 256)"))
    else:
        named = _named_ids(tokenizer)
        for name, i in ids.items():
            if i <= top and i not in named.special:
                raise UserError(_at(spec, ("model", name), f"{i} is an ordinary token of {what}: use one of its "
                                    f"special tokens ({sorted(named.special)[:8]}) or an id above its largest, {top}"))
        if named.extra:
            return Specials(ids["pad_id"], ids["eos_id"], ids["decoder_start_id"], named.extra)
    taken = set(ids.values())
    sentinels = []
    for i in range(m.vocab_size - 1, top, -1):  # vocab_size - 1 - k for k = 0, 1, ... while free
        if i in taken:
            break
        sentinels.append(i)
    return Specials(ids["pad_id"], ids["eos_id"], ids["decoder_start_id"], tuple(sentinels))


@dataclass(frozen=True)
class _Named:
    special: frozenset  # the ids of the tokenizer's special tokens
    extra: tuple  # the ids of <extra_id_0>, <extra_id_1>, ... (T5's sentinels), as many as it names in a row


def _named_ids(tokenizer: Path) -> _Named:
    """The special tokens and T5 sentinels of ``tokenizer`` (a tokenizer.json), read once."""
    entries, added = tokenizer_entries(tokenizer)
    named = {**{token: i for token, i in entries if token is not None}, **{a.get("content"): a["id"] for a in added}}
    extra = []
    while f"<extra_id_{len(extra)}>" in named:
        extra.append(named[f"<extra_id_{len(extra)}>"])
    return _Named(frozenset(a["id"] for a in added if a.get("special")), tuple(extra))


def _top(tokenizer: Optional[Path]) -> int:
    """The largest id of the text: 255 for bytes, else the tokenizer's largest."""
    return BYTES - 1 if tokenizer is None else tokenizer_max_id(tokenizer)


def sentinel_problem(spec, ids: Specials, needed: int, seq: int, data: str, init=None) -> Optional[str]:
    """Why ``ids`` has too few sentinels for span corruption at ``seq`` (None: enough)."""
    if needed <= len(ids.sentinels):
        return None
    m = spec.model
    what, tokenizer = _text_ids(spec, data, init)
    if tokenizer is not None and _named_ids(tokenizer).extra:  # the tokenizer's <extra_id_i>
        return _at(spec, ("train", "span_corruption"), f"span corruption at seq_len {seq} needs {needed} sentinels, "
                   f"and {what} names {len(ids.sentinels)} (<extra_id_0>..): a shorter seq_len or a lower "
                   "noise_density")
    return _at(spec, ("model", "vocab_size"), f"{m.vocab_size} has room for {len(ids.sentinels)} sentinels (ids "
               f"{m.vocab_size - 1} down, above the ids of {what} and the pad, eos and start ids); span corruption "
               f"at seq_len {seq} needs {needed} (ids {m.vocab_size - 1}..{m.vocab_size - needed}): use vocab_size "
               f">= {max(_top(tokenizer), ids.pad, ids.eos, ids.start) + 1 + needed}")


# ----------------------------------------------------------------------------- problems and sources

def problems(spec, data: str, seq: int, init=None) -> list:
    """``source_problems`` of an encoder–decoder's data (runtime/data.py): one message per problem."""
    if spec.train.objective == "seq2seq":
        return _pair_problems(spec, data, seq, init)
    refused = _not_text(data)
    if refused:
        return [refused]
    sc = spec.train.span_corruption
    if seq < 3:
        return [f"--seq {seq}: span corruption needs at least 3 tokens (a token, a sentinel, eos)"]
    n = lengths(seq, sc.noise_density, sc.mean_span)
    found = text_problems(spec, data, n.raw - 1, init=init)  # windows of n.raw tokens
    if found:
        return found
    try:
        ids = specials(spec, data, init)
        problem = sentinel_problem(spec, ids, n.spans, seq, data, init)
    except UserError as e:
        return [str(e)]
    return [problem] if problem else []


def _not_text(data: str) -> Optional[str]:
    if data == "synthetic":
        return ("--data synthetic: span corruption corrupts text: give pystdlib, a text file or a prepared folder "
                "(the synthetic tasks use the whole vocabulary, sentinels included)")
    if kind_of(data):
        return (f"--data {data!r} is instruction data (prompt/completion or messages): span corruption corrupts "
                "plain text; pairs of source and target text train with train.objective seq2seq")
    if _is_pairs(data):
        return f"--data {data!r} holds source/target pairs: train them with train.objective seq2seq"
    return None


def _is_pairs(data: str) -> bool:
    """Whether ``data`` is a JSONL file whose first record is an object with 'source' or 'target'."""
    try:
        with open(data, "rb") as f:
            if f.read(1) != b"{":
                return False
            f.seek(0)
            first = json.loads(f.readline(SNIFF_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and ("source" in first or "target" in first)


def _pair_problems(spec, data: str, seq: int, init) -> list:
    """``problems`` of train.objective seq2seq: a JSONL file of source/target records, sound; or
    the synthetic copy task, with two ids besides the pad, eos and start ids to copy."""
    if data == "synthetic":
        free = spec.model.vocab_size - len({getattr(spec.model, name) for name in SPECIAL_FIELDS})
        return [] if free >= 2 else [_at(spec, ("model", "vocab_size"), f"{spec.model.vocab_size} leaves {free} "
                                         "ids besides pad_id, eos_id and decoder_start_id: the copy task needs 2")]
    if not Path(data).is_file():
        return [f"--data {data!r}: train.objective seq2seq reads a JSONL file of {{\"source\": ..., \"target\": ...}} "
                "records (or synthetic)" + ("" if Path(data).exists() or data == "pystdlib" else ": no such file")]
    try:
        _encoder(spec, data, init)
        specials(spec, data, init)
        read_records(data, PAIRS)
    except UserError as e:
        return [str(e)]
    return []


def _encoder(spec, data: str, init):
    """texts -> [[ids]]: the model's tokenizer (no added special tokens), or UTF-8 bytes."""
    tokenizer = model_tokenizer(spec, init)
    if tokenizer is None:
        why = vocabulary_not_bytes(spec, init)
        if why or spec.model.vocab_size < BYTES:
            raise UserError(not_bytes(data, why or f"model.vocab_size {spec.model.vocab_size} < 256"))
        return lambda texts: [list(t.encode("utf-8")) for t in texts]
    tok = load_tokenizer(tokenizer)
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def make(spec, data: str, seed: int, init=None) -> Source:
    """The source of an encoder–decoder's ``data`` (``problems`` has refused what cannot work)."""
    refused = _not_text(data) if spec.train.objective == "span_corruption" else None
    if refused:
        raise UserError(refused)
    if spec.train.objective == "seq2seq" and data == "synthetic":
        m = spec.model
        return CopyPairs(m.vocab_size, Specials(m.pad_id, m.eos_id, m.decoder_start_id), seed)
    ids = specials(spec, data, init)
    if spec.train.objective == "seq2seq":
        return Pairs(data, ids, _encoder(spec, data, init), spec.model.vocab_size, seed, model_tokenizer(spec, init))
    sc = spec.train.span_corruption
    return SpanCorruption(text_source(spec, data, seed, init=init), ids, sc.noise_density, sc.mean_span, seed)


class Pairs(Source):
    """train.objective seq2seq: the source/target records of one JSONL file, a row each (module
    docstring)."""

    def __init__(self, path, ids: Specials, encode, vocab: int, seed: int, tokenizer: Optional[Path] = None):
        self.path, self.ids, self.seed, self.tokenizer = Path(path), ids, seed, tokenizer
        self.name = self.path.name
        records = read_records(self.path, PAIRS)
        sources = encode([r.value["source"] for r in records])
        targets = encode([r.value["target"] for r in records])
        examples = []
        for r, s, t in zip(records, sources, targets):
            hi = max(s + t, default=-1)
            if hi >= vocab:
                raise UserError(f"{self.path}:{r.line}: token id {hi} is outside model.vocab_size {vocab}")
            examples.append((np.asarray(s + [ids.eos], dtype=np.int64), np.asarray(t + [ids.eos], dtype=np.int64)))
        self.examples = held_out(records, examples)
        self._epochs = Epochs(len(self.examples["train"]), seed, "seq2seq-epoch")
        self._notes = (f"{self.name}: {len(records)} source/target pairs ({len(self.examples['eval'])} held out), "
                       + (f"tokenized with {tokenizer}" if tokenizer is not None else "as UTF-8 bytes"),)

    def notes(self, seq: int) -> list:
        every = self.examples["train"] + self.examples["eval"]
        cut = sum(1 for s, t in every if s.size > seq or t.size > seq)
        return list(self._notes) + [f"{self.name}: {cut} of {len(every)} pairs cut to {seq} tokens (eos kept)"]

    def _cut(self, ids: np.ndarray, seq: int) -> torch.Tensor:
        """``ids`` (ending with eos) in at most ``seq`` tokens: the first seq − 1, then eos."""
        if ids.size > seq:
            ids = np.append(ids[:seq - 1], self.ids.eos)
        return torch.from_numpy(ids)

    def batch(self, step, batch, seq, rank=0, world=1, split="train"):
        n = len(self.examples[split])
        index = [self._epochs.order(i) if split == "train" else i % n for i in Epochs.stream(step, batch, rank, world)]
        pairs = [self.examples[split][i] for i in index]
        return seq2seq_batch([self._cut(s, seq) for s, _ in pairs], [self._cut(t, seq) for _, t in pairs], seq, seq,
                             self.ids)


class CopyPairs(Source):
    """``--data synthetic`` for train.objective seq2seq: the copy task. Row r of step s is a source
    of n ids (n uniform in [seq/2 − 1, seq − 1], at least 1) drawn uniformly from the vocabulary
    less the pad, eos and start ids, from ``seeded_generator(seed, "copy", split, s, r)`` (held
    out: seed 0); source and target are those ids, then eos."""

    name = "synthetic-copy"

    def __init__(self, vocab: int, ids: Specials, seed: int):
        self.ids, self.seed = ids, seed
        taken = {ids.pad, ids.eos, ids.start}
        self.free = torch.tensor([i for i in range(vocab) if i not in taken], dtype=torch.int64)
        self._notes = (f"synthetic copy task: the target is the source, ids from {len(self.free)} of {vocab}",)

    def rows(self, step, rows, seq, split):
        seed = self.seed if split == "train" else 0
        end = torch.tensor([self.ids.eos])
        sources = []
        for row in rows:
            g = seeded_generator(seed, "copy", split, step, row)
            n = int(torch.randint(max(1, seq // 2 - 1), max(2, seq), (1,), generator=g))
            sources.append(torch.cat([self.free[torch.randint(0, len(self.free), (n,), generator=g)], end]))
        return seq2seq_batch(sources, sources, seq, seq, self.ids)
