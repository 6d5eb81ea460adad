"""Span corruption (T5, Raffel et al. 2020, §3.1.4) and the encoder–decoder batches built from it
and from source/target pairs (runtime/span_corruption.py, runtime/seq2seq.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.runtime.data import Bytes, seeded_generator
from moedsl.runtime.span_corruption import (SpanCorruption, Specials, corrupt, corrupted_lengths, lengths,
                                            noise_counts, noise_mask, shift_right)

VOCAB = 384
BYTE_IDS = Specials(pad=256, eos=257, start=256, sentinels=tuple(range(VOCAB - 1, 257, -1)))


def runs(mask: torch.Tensor) -> list:
    """[(is_noise, length)] of the runs of ``mask`` [L], in order."""
    starts = torch.cat([torch.tensor([0]), (mask[1:] != mask[:-1]).nonzero().flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([mask.numel()])])
    return list(zip(mask[starts].tolist(), (ends - starts).tolist()))


def restore(inputs: list, targets: list, sentinels: list, eos: int) -> list:
    """The text ``corrupt`` was given, from its inputs and targets: each sentinel of the inputs
    replaced by what follows the same sentinel in the targets, up to the next sentinel or eos."""
    assert inputs[-1] == eos and targets[-1] == eos
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in sentinels else [t])
    return out


def composition_part(n: int, k: int, j: int) -> float:
    """P(a given part has length j) when n items are cut into k non-empty parts, every cut equally
    likely: C(n − j − 1, k − 2) / C(n − 1, k − 1)."""
    if k == 1:
        return float(j == n)
    return math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)


# ----------------------------------------------------------------------------- the noise


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 5.0), (0.5, 2.0)])
def test_noise_fraction_and_mean_span_length_match_their_parameters_over_many_draws(density, mean_span):
    """Measured on the masks themselves, over 10 draws at each length 40..600. Per text, noise =
    round(L·d) is within 1/2 of L·d, so the fraction within 1/(2L) of d; spans = round(noise / μ)
    is within 1/2 of noise / μ, so the mean span (noise / spans) within μ / (2·spans) of μ."""
    fractions, spans_seen, noise_seen = [], 0, 0
    for length in range(40, 601, 7):
        for draw in range(10):
            mask = noise_mask(length, density, mean_span, seeded_generator(0, "stats", length, draw))
            noise = int(mask.sum())
            spans = int((mask[1:] & ~mask[:-1]).sum())  # runs of noise: the text starts plain
            assert abs(noise / length - density) <= 1 / (2 * length) + 1e-12
            assert abs(noise / spans - mean_span) <= mean_span / (2 * spans) + 1e-12
            fractions.append(noise / length)
            spans_seen, noise_seen = spans_seen + spans, noise_seen + noise
    assert abs(sum(fractions) / len(fractions) - density) < 0.005
    assert abs(noise_seen / spans_seen - mean_span) < 0.05 * mean_span


def test_span_lengths_are_a_uniformly_random_segmentation_over_many_draws():
    """T5 cuts the noise tokens (and the plain ones) into spans at uniformly random points: each
    span's length then follows C(n − j − 1, k − 2) / C(n − 1, k − 1). Over 4,000 texts of 100
    tokens (15 noise tokens in 5 spans, 85 plain in 5), the measured lengths are within 0.03 in
    total variation of that law (the sampling error of 20,000 lengths is about 0.01); spans
    of fixed length 3 would be 0.7 away."""
    length, density, mean_span = 100, 0.15, 3.0
    noise, k = noise_counts(length, density, mean_span)
    assert (noise, k) == (15, 5)
    counted = {True: {}, False: {}}
    for draw in range(4000):
        mask = noise_mask(length, density, mean_span, seeded_generator(1, "lengths", draw))
        spans = runs(mask)
        assert [is_noise for is_noise, _ in spans] == [False, True] * k  # plain first, then alternating
        for is_noise, n in spans:
            counted[is_noise][n] = counted[is_noise].get(n, 0) + 1
    for is_noise, items in ((True, noise), (False, length - noise)):
        total = sum(counted[is_noise].values())
        tv = 0.5 * sum(abs(counted[is_noise].get(j, 0) / total - composition_part(items, k, j))
                       for j in range(1, items - k + 2))
        assert tv < 0.03, (is_noise, tv)


def test_t5s_helper_lengths_at_512_are_568_raw_tokens_and_114_targets():
    """t5.data.preprocessors.random_spans_helper(512, 0.15, 3, 1, 1) gives tokens_length 568 and
    targets_length 114: the lengths T5's span corruption pretrained with."""
    n = lengths(512, 0.15, 3.0)
    assert (n.raw, n.inputs, n.targets) == (568, 512, 114)


@given(seq=st.integers(3, 3000), density=st.floats(0.01, 0.9), mean_span=st.floats(1.0, 20.0))
@settings(max_examples=300, deadline=None)
def test_the_raw_length_is_the_longest_whose_corrupted_inputs_fit_seq(seq, density, mean_span):
    n = lengths(seq, density, mean_span)
    assert n.inputs <= seq
    assert corrupted_lengths(n.raw + 1, density, mean_span).inputs > seq
    assert n == corrupted_lengths(n.raw, density, mean_span)


@given(length=st.integers(2, 600), density=st.floats(0.01, 0.95), mean_span=st.floats(1.0, 12.0),
       seed=st.integers(0, 2**32), rows=st.integers(1, 3))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_inputs_plus_targets_reconstruct_the_original_text_exactly(length, density, mean_span, seed, rows):
    g = torch.Generator().manual_seed(seed)
    n = corrupted_lengths(length, density, mean_span)
    sentinels = torch.arange(1000, 1000 - n.spans, -1)
    tokens = torch.randint(0, 500, (rows, length), generator=g)  # text ids below every sentinel (at most 300)
    mask = torch.stack([noise_mask(length, density, mean_span, g) for _ in range(rows)])
    inputs, targets = corrupt(tokens, mask, sentinels, eos=5000)
    assert inputs.shape == (rows, n.inputs) and targets.shape == (rows, n.targets)
    for r in range(rows):
        assert restore(inputs[r].tolist(), targets[r].tolist(), sentinels.tolist(), 5000) == tokens[r].tolist()
        # sentinel i stands for span i: they come in order in both
        assert [t for t in inputs[r].tolist() if t in sentinels] == sentinels.tolist()
        assert [t for t in targets[r].tolist() if t in sentinels] == sentinels.tolist()


# ----------------------------------------------------------------------------- the source


def _pystdlib_like(n: int = 20_000) -> bytes:
    return bytes((i * 7 + i // 13) % 251 for i in range(n))


def _span_source(seed: int = 0, density: float = 0.15, mean_span: float = 3.0) -> SpanCorruption:
    text = _pystdlib_like()
    return SpanCorruption(Bytes(text[:18_000], text[18_000:], VOCAB, seed, "bytes"), BYTE_IDS, density, mean_span,
                          seed)


def test_batches_are_a_function_of_seed_step_and_row_and_ranks_get_different_rows():
    src = _span_source(seed=3)
    whole = src.batch(5, 4, 48)
    again = _span_source(seed=3).batch(5, 4, 48)
    for name in ("inputs", "targets", "loss_mask", "decoder_inputs", "source_mask"):
        assert torch.equal(getattr(whole, name), getattr(again, name))
    halves = [src.batch(5, 4, 48, rank=r, world=2) for r in range(2)]
    for name in ("inputs", "targets", "decoder_inputs", "source_mask", "loss_mask"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name))
    assert not torch.equal(halves[0].inputs, halves[1].inputs)
    assert not torch.equal(whole.inputs, src.batch(6, 4, 48).inputs)
    assert not torch.equal(whole.targets, _span_source(seed=4).batch(5, 4, 48).targets)
    # held out: one set whatever the training seed
    assert torch.equal(src.batch(0, 4, 48, split="eval").targets,
                       _span_source(seed=4).batch(0, 4, 48, split="eval").targets)


def test_a_span_batch_restores_its_text_window_and_its_decoder_reads_the_targets_shifted_right():
    src = _span_source(seed=1)
    seq = 40
    n = src.lengths(seq)
    b = src.batch(2, 3, seq)
    window = src.text.rows(2, range(3), n.raw - 1, "train")
    text = torch.cat([window.inputs[:, :1], window.targets], 1)
    sentinels = list(BYTE_IDS.sentinels[:n.spans])
    assert b.inputs.shape == (3, seq) and b.targets.shape == (3, n.targets)
    for r in range(3):
        real = b.inputs[r][b.source_mask[r]].tolist()
        assert len(real) == n.inputs and (b.inputs[r][~b.source_mask[r]] == BYTE_IDS.pad).all()
        assert restore(real, b.targets[r].tolist(), sentinels, BYTE_IDS.eos) == text[r].tolist()
    assert torch.equal(b.decoder_inputs[:, 0], torch.full((3,), BYTE_IDS.start))
    assert torch.equal(b.decoder_inputs[:, 1:], b.targets[:, :-1])
    assert torch.equal(shift_right(b.targets, BYTE_IDS.start), b.decoder_inputs)
    assert b.loss_mask.all()  # every row's targets have one length: no padding to leave out
