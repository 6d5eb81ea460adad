"""T5's span corruption (Raffel et al. 2020, §3.1.4 and §3.3.4; Switch Transformer's and ST-MoE's
pretraining objective), and the sequence-to-sequence batches an encoder–decoder trains on.

A text of ``L`` tokens is corrupted as the reference implementation does (t5.data.preprocessors
``random_spans_noise_mask``, ``noise_span_to_unique_sentinel``, ``nonnoise_span_to_unique_sentinel``):

- ``round(L · noise_density)`` tokens are noise (at least 1, at most L − 1), in
  ``round(noise / mean_span)`` spans (at least 1). Rounding is Python's, half to even, as
  ``tf.round``'s. One guard beyond T5: never more spans than non-noise tokens (T5's segmentation
  fails there; it happens only at densities far above 0.5).
- The noise tokens and the non-noise tokens are each cut into that many non-empty spans by a
  uniformly random segmentation (T5's ``_random_segmentation``: k − 1 cut points drawn without
  replacement from the n − 1 gaps), interleaved non-noise first: the text always starts with a
  non-noise span and ends with a noise span.
- inputs: the text with noise span i replaced by sentinel i, then eos; targets: sentinel i
  followed by noise span i, for each span in order, then eos (both end with eos, as T5's
  pipeline appends one to each feature). Sentinel i is ``vocab_size − 1 − i`` (T5's
  ``<extra_id_i>``; a tokenizer naming ``<extra_id_i>`` tokens gives their ids instead, which for
  T5's own is the same rule over its tokenizer's vocabulary).

Every count depends on L alone, so every row of a batch has the same input and target lengths.
``lengths`` picks L from the encoder length as T5's ``random_spans_helper`` does from
``inputs_length``: the longest raw text whose corrupted inputs (with eos) fit in ``seq_len``; the
decoder length is then that text's targets (with eos). At seq_len 512, density 0.15, mean span 3
that is T5's 568 raw tokens and 114 targets. Where the inputs come out shorter than seq_len (by
one token at most, from rounding), they are padded, the padding outside ``source_mask``.

Batches of encoder–decoder data (``seq2seq_batch``), the contract of runtime/data.py ``Batch``:
``inputs`` [B, S] source ids padded with ``pad_id``; ``source_mask`` [B, S] bool, True on real
tokens; ``targets`` [B, T] labels padded with ``pad_id``; ``loss_mask`` [B, T] bool, True exactly
on the labels (padding is not); ``decoder_inputs`` [B, T]: the targets shifted right with
``decoder_start_id`` first (T5's ``_shift_right``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moedsl.errors import MoedslError

from .data import Batch, Source, seeded_generator


# ----------------------------------------------------------------------------- the corruption

def noise_counts(length: int, density: float, mean_span: float) -> tuple:
    """(noise tokens, noise spans) of a text of ``length`` tokens (module docstring)."""
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, min(spans, length - noise)


@dataclass(frozen=True)
class Lengths:
    raw: int  # tokens of text corrupted into one row
    inputs: int  # corrupted inputs with their eos (<= the encoder length)
    targets: int  # targets with their eos: the decoder length
    spans: int  # noise spans per row: sentinels used


def corrupted_lengths(raw: int, density: float, mean_span: float) -> Lengths:
    """The lengths of a text of ``raw`` tokens once corrupted: inputs keep the non-noise tokens
    and one sentinel per span, targets the noise tokens and one sentinel per span; each adds eos."""
    noise, spans = noise_counts(raw, density, mean_span)
    return Lengths(raw, raw - noise + spans + 1, noise + spans + 1, spans)


def lengths(seq: int, density: float, mean_span: float) -> Lengths:
    """T5's ``random_spans_helper``: the longest raw text whose corrupted inputs fit in ``seq``
    tokens (the encoder length), and the targets' length it gives. The inputs' length never falls
    as the text grows (each token adds 1 − Δnoise + Δspans >= 0), so the search stops at the first
    text too long. T5 starts from inputs_length − 1, which always fits (spans <= noise)."""
    if seq < 3:
        raise MoedslError(f"span corruption needs sequences of at least 3 tokens (a token, a sentinel, eos), "
                          f"not {seq}")
    raw = seq - 1
    while corrupted_lengths(raw + 1, density, mean_span).inputs <= seq:
        raw += 1
    return corrupted_lengths(raw, density, mean_span)


def segmentation(items: int, segments: int, g: torch.Generator) -> torch.Tensor:
    """[segments] int64: ``items`` cut into ``segments`` non-empty parts at random, every
    segmentation equally likely (T5's ``_random_segmentation``: shuffle segments − 1 ones among
    the items − 1 gaps)."""
    cuts = torch.randperm(items - 1, generator=g)[:segments - 1].sort().values + 1  # first item of parts 2..k
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([items])])
    return bounds.diff()


def noise_mask(length: int, density: float, mean_span: float, g: torch.Generator) -> torch.Tensor:
    """[length] bool, True on noise: non-noise span 0, noise span 0, non-noise span 1, ...
    (T5's ``random_spans_noise_mask``; the noise spans drawn first, then the non-noise ones)."""
    noise, spans = noise_counts(length, density, mean_span)
    noise_lengths = segmentation(noise, spans, g)
    plain_lengths = segmentation(length - noise, spans, g)
    interleaved = torch.stack([plain_lengths, noise_lengths], 1).flatten()  # [2k]
    starts = interleaved.cumsum(0)[:-1]  # where spans 1..2k−1 start
    span = torch.zeros(length, dtype=torch.int64).index_fill_(0, starts, 1).cumsum(0)
    return span % 2 == 1


def _spans_to_sentinels(tokens: torch.Tensor, spans: torch.Tensor, sentinels: torch.Tensor) -> torch.Tensor:
    """T5's ``noise_span_to_unique_sentinel`` on rows: each run of True in ``spans`` [B, L] becomes
    one token, sentinel i for the row's i-th run. Rows of equal counts (``noise_counts``) give
    [B, L'] with one L' for all."""
    before = torch.nn.functional.pad(spans[:, :-1], (1, 0))
    first, later = spans & ~before, spans & before
    which = (first.cumsum(1) - 1).clamp(min=0)
    marked = torch.where(first, sentinels[which], tokens)
    return marked[~later].view(tokens.shape[0], -1)


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, sentinels: torch.Tensor, eos: int) -> tuple:
    """(inputs [B, S'], targets [B, T']) of ``tokens`` [B, L] with noise ``mask`` [B, L] (rows of
    one length, so one S' and T'): the noise spans replaced by sentinels in the inputs, the
    non-noise spans in the targets (so sentinel i precedes noise span i), each then eos."""
    end = torch.full((tokens.shape[0], 1), eos, dtype=tokens.dtype)
    inputs = _spans_to_sentinels(tokens, mask, sentinels)
    targets = _spans_to_sentinels(tokens, ~mask, sentinels)
    return torch.cat([inputs, end], 1), torch.cat([targets, end], 1)


# ----------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class Specials:
    """The ids an encoder–decoder's data adds to its text: padding, end of sequence, the decoder's
    first input, and the sentinels ``sentinel(i)`` (i = 0, 1, ...) available to span corruption."""

    pad: int
    eos: int
    start: int
    sentinels: tuple = ()  # the sentinel ids in order, as many as the vocabulary has room for

    def sentinel_ids(self, k: int) -> torch.Tensor:
        """[k] int64: sentinels 0..k−1."""
        if k > len(self.sentinels):
            raise MoedslError(f"span corruption needs {k} sentinels here, the vocabulary has room for "
                              f"{len(self.sentinels)}")
        return torch.tensor(self.sentinels[:k], dtype=torch.int64)


def shift_right(targets: torch.Tensor, start: int) -> torch.Tensor:
    """[B, T]: ``targets`` [B, T] shifted one to the right, ``start`` first (T5's ``_shift_right``):
    the decoder's input at t is the label at t − 1."""
    return torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], 1)


def seq2seq_batch(sources: list, targets: list, seq: int, target_len: int, ids: Specials) -> Batch:
    """One encoder–decoder ``Batch`` of rows (``sources``, ``targets``: 1-d int64 tensors, each at
    most ``seq`` and ``target_len`` long), padded with ``ids.pad`` (module docstring)."""
    B = len(sources)
    inputs = torch.full((B, seq), ids.pad, dtype=torch.int64)
    labels = torch.full((B, target_len), ids.pad, dtype=torch.int64)
    source_mask = torch.zeros(B, seq, dtype=torch.bool)
    loss_mask = torch.zeros(B, target_len, dtype=torch.bool)
    for r, (s, t) in enumerate(zip(sources, targets)):
        inputs[r, :len(s)], source_mask[r, :len(s)] = s, True
        labels[r, :len(t)], loss_mask[r, :len(t)] = t, True
    return Batch(inputs, labels, loss_mask=loss_mask, decoder_inputs=shift_right(labels, ids.start),
                 source_mask=source_mask)


class SpanCorruption(Source):
    """Span corruption of another source's text: row r of step s corrupts the window of ``raw``
    tokens that ``text`` gives for that row (``lengths(seq)``), with the noise mask drawn from
    ``seeded_generator(seed, "span_corruption", split, s, r)`` (held-out rows: seed 0, one held-out set
    whatever the training seed, as the text's own held-out windows)."""

    def __init__(self, text: Source, ids: Specials, density: float, mean_span: float, seed: int):
        self.text, self.ids, self.density, self.mean_span, self.seed = text, ids, density, mean_span, seed
        self.name, self.tokenizer = text.name, text.tokenizer

    def lengths(self, seq: int) -> Lengths:
        return lengths(seq, self.density, self.mean_span)

    def notes(self, seq: int) -> list:
        n = self.lengths(seq)
        return self.text.notes(n.raw - 1) + [
            f"span corruption (noise density {self.density:g}, mean span {self.mean_span:g}): {n.raw} tokens of text "
            f"a row, {n.spans} spans, inputs {n.inputs} of {seq} tokens, targets {n.targets}"]

    def rows(self, step, rows, seq, split):
        n = self.lengths(seq)
        window = self.text.rows(step, rows, n.raw - 1, split)  # inputs and targets overlap: raw tokens
        tokens = torch.cat([window.inputs[:, :1], window.targets], 1)  # [B, raw]
        seed = self.seed if split == "train" else 0
        mask = torch.stack([noise_mask(n.raw, self.density, self.mean_span,
                                       seeded_generator(seed, "span_corruption", split, step, row)) for row in rows])
        inputs, targets = corrupt(tokens, mask, self.ids.sentinel_ids(n.spans), self.ids.eos)
        return seq2seq_batch(list(inputs), list(targets), seq, n.targets, self.ids)

    def bytes_per_token(self, step, rows, seq, split) -> Optional[torch.Tensor]:
        return None  # the targets are a sample of the text plus sentinels: not a text's bits per byte
