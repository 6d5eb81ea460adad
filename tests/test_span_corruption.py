"""Span corruption (T5, Raffel et al. 2020, §3.1.4) and the encoder–decoder batches built from it
and from source/target pairs (runtime/span_corruption.py, runtime/seq2seq.py)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedsl
from encdec_helpers import tiny_encdec
from moedsl.errors import SpecError, UserError
from moedsl.runtime.data import Bytes, make_source, pack_problems, seeded_generator, source_problems
from moedsl.runtime.train import RunOptions, Trainer
from moedsl.spec import Spec
from moedsl.runtime.span_corruption import (SpanCorruption, Specials, corrupt, corrupted_lengths, lengths,
                                            noise_counts, noise_mask, shift_right)

ROOT = Path(__file__).resolve().parents[1]

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


# ----------------------------------------------------------------------------- specs, sources, errors

TEXT = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int = 0\n\n" * 40) * 8


def encdec_spec(tmp_path: Path, objective: str = "span_corruption", vocab: int = 384, ids=(256, 257, 256),
                extra: str = "", tokenizer: str = "") -> Spec:
    """The tiny encoder–decoder of tests/encdec_helpers.py as a spec file in ``tmp_path`` (its
    errors name the file and line), over bytes by default: vocab 384, pad 256, eos 257, start 256."""
    pad, eos, start = ids
    text = tiny_encdec(**{
        "vocab_size: 40": f"vocab_size: {vocab}" + (f", tokenizer: {tokenizer}" if tokenizer else ""),
        "pad_id: 0, eos_id: 1, decoder_start_id: 0": f"pad_id: {pad}, eos_id: {eos}, decoder_start_id: {start}",
        "seq_len: 12,": f"seq_len: 32, objective: {objective},{extra}"})
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return moedsl.load_spec(path)


def text_file(tmp_path: Path) -> str:
    path = tmp_path / "code.py"
    path.write_text(TEXT)
    return str(path)


def write_pairs(path: Path, pairs: list) -> str:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def test_span_corruption_on_a_decoder_only_spec_is_an_error_at_its_line(tmp_path):
    data = yaml.safe_load((ROOT / "specs" / "mixtral.yaml").read_text())
    data.setdefault("train", {})["objective"] = "span_corruption"
    path = tmp_path / "decoder-only.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError, match=rf"{path}:\d+:\d+: train.objective: objective span_corruption trains an "
                                        "encoder–decoder, and this spec is decoder-only"):
        moedsl.load_spec(path)


def test_an_encoder_decoder_defaults_to_seq2seq_and_refuses_objective_lm_at_its_line(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text(tiny_encdec(**{"seq_len: 12,": "seq_len: 12, objective: lm,"}))
    with pytest.raises(SpecError, match=rf"{path}:\d+:\d+: train.objective: objective lm is a decoder-only stack's "
                                        "next-token loss; an encoder–decoder learns span_corruption"):
        moedsl.load_spec(path)
    assert moedsl.load_spec(tiny_encdec()).train.objective == "seq2seq"


def test_synthetic_seq2seq_is_a_copy_task_over_the_ids_that_are_not_special(tmp_path):
    spec = moedsl.load_spec(tiny_encdec())  # vocab 40, pad 0, eos 1, start 0; data synthetic by default
    assert source_problems(spec, "synthetic", 12) == []
    src = make_source(spec, "synthetic", seed=0)
    b = src.batch(0, 8, 12)
    assert torch.equal(b.inputs, b.targets) and torch.equal(b.source_mask, b.loss_mask)
    for r in range(8):
        ids = b.inputs[r][b.source_mask[r]].tolist()
        assert ids[-1] == 1 and all(i > 1 for i in ids[:-1]) and 5 <= len(ids) <= 12
    assert torch.equal(b.decoder_inputs, shift_right(b.targets, 0))
    halves = [src.batch(0, 8, 12, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([h.inputs for h in halves]), b.inputs)
    assert not torch.equal(b.inputs, make_source(spec, "synthetic", seed=1).batch(0, 8, 12).inputs)


@pytest.mark.parametrize("field,ids", [("pad_id", (0, 257, 256)), ("eos_id", (256, 10, 256)),
                                       ("decoder_start_id", (256, 257, 255))])
def test_byte_text_refuses_special_ids_that_are_bytes_naming_the_field_and_its_line(tmp_path, field, ids):
    spec = encdec_spec(tmp_path, ids=ids)
    value = dict(zip(("pad_id", "eos_id", "decoder_start_id"), ids))[field]
    for data in ("pystdlib", text_file(tmp_path)):
        (found,) = source_problems(spec, data, 32)
        assert re.match(rf"{tmp_path / 'spec.yaml'}:\d+:\d+: model.{field}: {value} is byte {value} of the text", found)
    with pytest.raises(UserError, match=f"model.{field}"):
        make_source(spec, text_file(tmp_path), 0)


@pytest.mark.parametrize("seq", [32, 64])
def test_a_vocabulary_too_small_for_the_sentinels_is_refused_with_the_size_that_fits(tmp_path, seq):
    needed = lengths(seq, 0.15, 3.0).spans
    assert needed >= 2
    spec = encdec_spec(tmp_path, vocab=258 + needed - 1)  # pad 256, eos 257: one sentinel short
    (found,) = source_problems(spec, text_file(tmp_path), seq)
    assert f"model.vocab_size: {258 + needed - 1} has room for {needed - 1} sentinels" in found
    fits = int(re.search(r"use vocab_size >= (\d+)", found).group(1))
    assert fits == 258 + needed
    assert source_problems(encdec_spec(tmp_path, vocab=fits), text_file(tmp_path), seq) == []


def test_seq2seq_without_a_jsonl_file_is_refused(tmp_path):
    spec = encdec_spec(tmp_path, objective="seq2seq")
    for data in ("pystdlib", str(tmp_path / "missing.jsonl")):
        (found,) = source_problems(spec, data, 32)
        assert found.startswith(f"--data {data!r}: train.objective seq2seq reads a JSONL file")
    (found,) = source_problems(encdec_spec(tmp_path), write_pairs(tmp_path / "p.jsonl", [{"source": "a",
                                                                                         "target": "b"}] * 3), 32)
    assert "holds source/target pairs: train them with train.objective seq2seq" in found


@pytest.mark.parametrize("record,why", [({"source": "a"}, "no 'target'"), ({"target": "b"}, "no 'source'"),
                                        ({"source": "a", "target": 3}, "'target' is a JSON number, not a string")])
def test_a_jsonl_line_missing_source_or_target_names_the_file_and_line(tmp_path, record, why):
    spec = encdec_spec(tmp_path, objective="seq2seq")
    good = {"source": "x = 1", "target": "y = 2"}
    data = write_pairs(tmp_path / "pairs.jsonl", [good, good, record, good])
    (found,) = source_problems(spec, data, 32)
    assert found.startswith(f"{data}:3: {why}")
    with pytest.raises(UserError, match=re.escape(f"{data}:3: {why}")):
        make_source(spec, data, 0)


def test_seq2seq_pairs_become_padded_batches_with_the_loss_mask_false_exactly_on_padding(tmp_path):
    pairs = [{"source": "x" * (i % 7 + 1), "target": "yz" * (i % 5) + "é"} for i in range(60)]
    pairs[0] = {"source": "s" * 50, "target": "t" * 50}  # longer than seq: cut, eos kept
    spec = encdec_spec(tmp_path, objective="seq2seq")
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert source_problems(spec, data, 32) == []
    src = make_source(spec, data, seed=0)
    known = {(p["source"].encode(), p["target"].encode()) for p in pairs}
    for split in ("train", "eval"):
        b = src.batch(0, 8, 32, split=split)
        assert b.inputs.shape == b.source_mask.shape == (8, 32)
        assert b.targets.shape == b.loss_mask.shape == b.decoder_inputs.shape == (8, 32)
        for r in range(8):
            s, t = b.inputs[r][b.source_mask[r]].tolist(), b.targets[r][b.loss_mask[r]].tolist()
            assert s[-1] == t[-1] == 257  # eos ends both, also when cut
            assert (b.inputs[r][~b.source_mask[r]] == 256).all() and (b.targets[r][~b.loss_mask[r]] == 256).all()
            assert b.source_mask[r].tolist() == sorted(b.source_mask[r].tolist(), reverse=True)  # padding on the right
            assert b.loss_mask[r].tolist() == sorted(b.loss_mask[r].tolist(), reverse=True)
            whole = (bytes(s[:-1]), bytes(t[:-1]))
            assert whole in known or (whole == (b"s" * 31, b"t" * 31))
        assert torch.equal(b.decoder_inputs, shift_right(b.targets, 256))


def test_seq2seq_batches_are_a_function_of_seed_step_and_row_and_the_held_out_pairs_never_train(tmp_path):
    pairs = [{"source": f"s{i}", "target": f"t{i}"} for i in range(80)]
    spec = encdec_spec(tmp_path, objective="seq2seq")
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    a, b = make_source(spec, data, seed=1), make_source(spec, data, seed=1)
    whole = a.batch(3, 8, 16)
    assert torch.equal(whole.inputs, b.batch(3, 8, 16).inputs)
    halves = [a.batch(3, 8, 16, rank=r, world=2) for r in range(2)]
    for name in ("inputs", "targets", "decoder_inputs", "source_mask", "loss_mask"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name))
    assert not torch.equal(halves[0].inputs, halves[1].inputs)

    def sources(src, split, steps):
        return {bytes(row[m].tolist()[:-1]) for s in range(steps) for row, m in
                zip(src.batch(s, 8, 16, split=split).inputs, src.batch(s, 8, 16, split=split).source_mask)}

    held = sources(a, "eval", 1)
    assert held == sources(make_source(spec, data, seed=7), "eval", 1)  # whatever the training seed
    assert held and not held & sources(a, "train", 20)  # 20 steps of 8 rows: two epochs of the training pairs


def test_span_corruption_of_a_text_file_through_make_source_restores_each_window(tmp_path):
    spec = encdec_spec(tmp_path)
    data = text_file(tmp_path)
    assert source_problems(spec, data, 32) == []
    src = make_source(spec, data, seed=0)
    n = src.lengths(32)
    b = src.batch(1, 4, 32)
    window = src.text.rows(1, range(4), n.raw - 1, "train")
    text = torch.cat([window.inputs[:, :1], window.targets], 1)
    sentinels = list(range(383, 383 - n.spans, -1))
    for r in range(4):
        assert restore(b.inputs[r][b.source_mask[r]].tolist(), b.targets[r].tolist(), sentinels, 257) == \
            text[r].tolist()
    assert src.bytes_per_token(1, range(4), 32, "eval") is None


def test_packing_documents_is_refused_for_encoder_decoder_objectives(tmp_path):
    spec = encdec_spec(tmp_path)
    (found,) = pack_problems(spec, text_file(tmp_path), "documents")
    assert "train.objective span_corruption builds one example per row" in found


# ----------------------------------------------------------------------------- text through a tokenizer

def t5_like_tokenizer(folder: Path, extra_ids: int = 10) -> Path:
    """A word-level tokenizer.json laid out as T5's: <pad> 0, </s> 1, <unk> 2, the words, then
    ``extra_ids`` sentinels with <extra_id_0> the highest id (none: no sentinels of its own)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted(set(TEXT.split()) | {"hello", "world", "bonjour", "monde"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in reversed(range(extra_ids))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDSL_CACHE_DIR", str(tmp_path / "cache"))


def test_a_tokenizer_with_extra_ids_gives_its_sentinels_below_the_padded_vocabulary(tmp_path, cache):
    """T5's tokenizer names <extra_id_0> at its own vocabulary's top (32099), below the model's
    padded 32128: the sentinels are those tokens, as T5 pretrained with."""
    path = t5_like_tokenizer(tmp_path, extra_ids=10)
    top = int(json.loads(path.read_text())["added_tokens"][-1]["id"])  # <extra_id_0>
    spec = encdec_spec(tmp_path, vocab=top + 1 + 6, ids=(0, 1, 0), tokenizer="tokenizer.json")
    data = text_file(tmp_path)
    assert source_problems(spec, data, 32) == []
    src = make_source(spec, data, seed=0)
    n = src.lengths(32)
    b = src.batch(0, 4, 32)
    sentinels = list(range(top, top - n.spans, -1))
    assert b.targets[:, 0].tolist() == [top] * 4  # every target starts with <extra_id_0>
    window = src.text.rows(0, range(4), n.raw - 1, "train")
    text = torch.cat([window.inputs[:, :1], window.targets], 1)
    for r in range(4):
        assert restore(b.inputs[r][b.source_mask[r]].tolist(), b.targets[r].tolist(), sentinels, 1) == \
            text[r].tolist()
    (found,) = source_problems(spec, data, 200)  # 200 tokens need more than the tokenizer's 10 sentinels
    assert f"span corruption at seq_len 200 needs {lengths(200, 0.15, 3.0).spans} sentinels" in found
    assert "names 10 (<extra_id_0>..)" in found


def test_a_tokenizer_without_extra_ids_takes_sentinels_above_its_largest_id(tmp_path, cache):
    path = t5_like_tokenizer(tmp_path, extra_ids=0)
    largest = max(json.loads(path.read_text())["model"]["vocab"].values())
    k = lengths(32, 0.15, 3.0).spans
    spec = encdec_spec(tmp_path, vocab=largest + k, ids=(0, 1, 0), tokenizer="tokenizer.json")  # one short
    (found,) = source_problems(spec, text_file(tmp_path), 32)
    assert f"use vocab_size >= {largest + 1 + k}" in found
    spec = encdec_spec(tmp_path, vocab=largest + 1 + k, ids=(0, 1, 0), tokenizer="tokenizer.json")
    assert source_problems(spec, text_file(tmp_path), 32) == []
    b = make_source(spec, text_file(tmp_path), seed=0).batch(0, 2, 32)
    assert b.targets[:, 0].tolist() == [largest + k] * 2  # sentinel 0: vocab_size - 1


def test_a_pad_id_that_is_an_ordinary_token_of_the_tokenizer_is_refused(tmp_path, cache):
    t5_like_tokenizer(tmp_path)
    spec = encdec_spec(tmp_path, vocab=64, ids=(5, 1, 0), tokenizer="tokenizer.json")
    (found,) = source_problems(spec, text_file(tmp_path), 32)
    assert re.search(r"model.pad_id: 5 is an ordinary token of its tokenizer .*tokenizer.json", found)


def test_span_corruption_reads_a_prepared_folder_with_its_tokenizers_sentinels(tmp_path):
    from moedsl.runtime.prepare import prepare

    path = t5_like_tokenizer(tmp_path / "tok", extra_ids=10)
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    for f in files:
        f.write_text(TEXT)
    folder = prepare([str(f) for f in files], path, tmp_path / "prepared", held_out=0.5)  # a file a split
    top = int(json.loads(path.read_text())["added_tokens"][-1]["id"])
    spec = encdec_spec(tmp_path, vocab=top + 1, ids=(0, 1, 0))  # no tokenizer of its own: the folder's
    assert source_problems(spec, str(folder), 32) == []
    b = make_source(spec, str(folder), seed=0).batch(0, 2, 32)
    assert b.targets[:, 0].tolist() == [top] * 2


def test_seq2seq_tokenizes_source_and_target_with_the_models_tokenizer_then_eos(tmp_path):
    pytest.importorskip("tokenizers")
    path = t5_like_tokenizer(tmp_path)
    vocab = json.loads(path.read_text())["model"]["vocab"]
    spec = encdec_spec(tmp_path, objective="seq2seq", vocab=64 + len(vocab), ids=(0, 1, 0),
                       tokenizer="tokenizer.json")
    data = write_pairs(tmp_path / "pairs.jsonl", [{"source": "hello world", "target": "bonjour monde"}] * 30)
    assert source_problems(spec, data, 16) == []
    b = make_source(spec, data, seed=0).batch(0, 2, 16)
    assert b.inputs[0][b.source_mask[0]].tolist() == [vocab["hello"], vocab["world"], 1]
    assert b.targets[0][b.loss_mask[0]].tolist() == [vocab["bonjour"], vocab["monde"], 1]
    assert b.decoder_inputs[0, :3].tolist() == [0, vocab["bonjour"], vocab["monde"]]


# ----------------------------------------------------------------------------- end to end

def _eval_losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]


def test_moedsl_run_pretrains_a_tiny_encoder_decoder_with_span_corruption_on_pystdlib(tmp_path):
    """40 steps of the tiny Switch-shaped encoder–decoder over bytes (vocab 384): the held-out loss
    starts near ln 384 (5.95, uniform over the vocabulary) and falls by more than 0.8; ``moedsl
    eval`` of the run evaluates the same span-corrupted held-out batches to the run's last loss."""
    spec = encdec_spec(tmp_path, extra=" data: pystdlib, eval_every: 10, eval_batches: 2,")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "moedsl", "run", spec.source, "--out", str(out), "--steps", "40", "--lr",
                        "0.01", "--no-progress", "--ignore-memory-check"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    said = " ".join((r.stdout + r.stderr).split())  # as printed, wrapped to the terminal's width or not
    assert "span corruption (noise density 0.15, mean span 3): 34 tokens of text a row, 2 spans, inputs 32 of 32 " \
           "tokens, targets 8" in said
    losses = _eval_losses(out)
    assert [s for s, _ in losses] == [10, 20, 30, 40]
    assert abs(losses[0][1] - math.log(384)) < 0.6
    assert losses[-1][1] < losses[0][1] - 0.8
    held = moedsl.evaluate(str(out))
    assert held["loss"] == pytest.approx(losses[-1][1], rel=1e-6) and held["bits_per_byte"] is None


def test_the_trainer_learns_seq2seq_pairs_and_the_held_out_loss_falls(tmp_path):
    """A byte-level task (the target: the source's three words reversed): 60 steps of the Trainer bring
    the held-out loss down by more than 1 nat."""
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    pairs = []
    for _ in range(400):
        picked = [words[int(i)] for i in torch.randint(0, len(words), (3,), generator=g)]
        pairs.append({"source": " ".join(picked), "target": " ".join(reversed(picked))})
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    spec = encdec_spec(tmp_path, objective="seq2seq", extra=f" data: {data}, eval_every: 10, eval_batches: 2,")
    out = tmp_path / "run"
    Trainer(spec, RunOptions.from_spec(spec, steps=60, lr=0.01, out=str(out), progress=False)).fit()
    losses = _eval_losses(out)
    assert losses[-1][1] < losses[0][1] - 1.0  # measured: 5.37 at step 10, 3.44 at step 60
