"""Training on prepared token folders (runtime/tokens.py): random windows that are the corpus's
documents as written, mixtures by weight, the same batches on 1 and 2 processes and across a
resume, every refusal one line before a model is built, and held-out loss with bits per byte."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import moedsl
from moedsl.cli import main
from moedsl.hf.reference import tiny_reference
from moedsl.runtime.data import Tokens, data_items, make_source, spec_data
from moedsl.runtime.tokens import ShardWriter, open_tokens, token_dtype, tokenizer_sha256, write_manifest

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
EOS = 0
SEQ = 16
RUN = ["--batch", "4", "--seq", str(SEQ), "--eval-batches", "2", "--no-progress", "--ignore-memory-check"]


def save_tokenizer(path: Path, vocab: int, word: str = "w") -> Path:
    """A WordLevel tokenizer over ``{word}0 .. {word}{vocab-1}`` (``{word}0``: eos and unknown)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"{word}{i}": i for i in range(vocab)},
                                                          unk_token=f"{word}0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def documents(seed: int, count: int, low: int = 1, high: int = 64) -> list:
    """``count`` documents of 4..40 ids in [low, high), each ending with eos."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(low, high, rng.integers(4, 41)), EOS) for _ in range(count)]


def prepare(folder: Path, train: list, held: list, vocab: int = 64, word: str = "w", shard_tokens: int = 1 << 20):
    """A prepared folder written as `moedsl data prepare` writes one: shards of ``shard_tokens``,
    a tokenizer.json and the manifest last. A document's text is its words joined by spaces."""
    folder.mkdir(parents=True)
    tok = save_tokenizer(folder / "tokenizer.json", vocab, word)
    splits = {}
    for name, docs in (("train", train), ("eval", held)):
        w = ShardWriter(folder, name, token_dtype(vocab), shard_tokens=shard_tokens)
        for d in docs:
            w.add(d, len(" ".join(f"{word}{i}" for i in d[:-1]).encode()))
        splits[name] = w.close()
    write_manifest(folder, tokenizer_sha256=tokenizer_sha256(tok), vocab_size=vocab, eos_id=EOS,
                   dtype=token_dtype(vocab), splits=splits, sources=[], options={}, key=folder.name)
    return folder


def write_spec(folder: Path, vocab: int = 64, **train) -> Path:
    """A tiny hand-written spec (no tokenizer of its own unless one is put beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"moedsl": 1, "name": "tiny-tokens", "model": {"vocab_size": vocab, "d_model": 32, "max_seq_len": 32},
            "layers": [{"embedding": {}}, {"attention": {"heads": 2}},
                       {"moe": {"experts": {"count": 4, "hidden": 32}, "gate": {"type": "topk", "k": 2}}},
                       {"norm": {}}, {"head": {}}],
            "train": {"batch_size": 4, "seq_len": SEQ, "steps": 2, "lr": 1e-3, "warmup": 0, "min_lr": 1.0,
                      "eval_every": 2, "eval_batches": 2, **train}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def corpus(tmp_path):
    return prepare(tmp_path / "corpus", documents(1, 60), documents(2, 12))


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: the data is checked first."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    import moedsl.api
    import moedsl.runtime.train

    monkeypatch.setattr(moedsl.api, "build_model", refuse)
    monkeypatch.setattr(moedsl.runtime.train, "build_model", refuse)


def refused(capsys, *argv) -> str:
    """``moedsl run argv`` exits 2 with one line and no traceback; returns the line."""
    assert main(["run", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- windows

def test_windows_are_the_concatenated_documents_at_the_drawn_starts_with_their_document_numbers(tmp_path):
    train, held = documents(1, 60), documents(2, 12)
    folder = prepare(tmp_path / "c", train, held, shard_tokens=100)  # windows cross shard ends
    spec = moedsl.load_spec(write_spec(tmp_path / "s"))
    src = make_source(spec, str(folder), seed=3)
    assert isinstance(src, Tokens)
    crossed = 0
    for split, docs in (("train", train), ("eval", held)):
        flat = np.concatenate(docs)
        doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
        shard_ends = set(np.cumsum([sh["tokens"] for sh in src.folders[0].manifest["splits"][split]["shards"]]))
        for step in range(4):
            b = src.batch(step, 8, SEQ, split=split)
            assert b.inputs.shape == b.targets.shape == b.documents.shape == (8, SEQ)
            for x, y, d in zip(b.inputs.numpy(), b.targets.numpy(), b.documents.numpy()):
                window = np.append(x, y[-1])
                assert np.array_equal(window[1:], y)
                starts = [s for s in range(len(flat) - SEQ) if np.array_equal(flat[s:s + SEQ + 1], window)]
                assert starts, "a window that is not the documents back to back"
                s = starts[0]
                assert np.array_equal(d, doc_of[s:s + SEQ] - doc_of[s])  # 0 at the window's first token
                crossed += any(s < e < s + SEQ for e in shard_ends)
    assert crossed > 0


def test_eval_windows_do_not_depend_on_the_training_seed_and_training_windows_do(corpus, tmp_path):
    spec = moedsl.load_spec(write_spec(tmp_path / "s"))
    a, b = make_source(spec, str(corpus), seed=3), make_source(spec, str(corpus), seed=4)
    assert torch.equal(a.batch(1, 8, SEQ, split="eval").inputs, b.batch(1, 8, SEQ, split="eval").inputs)
    assert not torch.equal(a.batch(1, 8, SEQ).inputs, b.batch(1, 8, SEQ).inputs)
    assert not torch.equal(a.batch(0, 8, SEQ, split="eval").inputs, a.batch(1, 8, SEQ, split="eval").inputs)


def test_a_mixture_draws_each_folder_as_often_as_its_weight(tmp_path):
    """Folder a holds ids below 32, b ids from 32 (eos aside): a row's ids say which it came from.
    3,200 rows at weight 0.7: the fraction's standard deviation is 0.008; the seed is fixed."""
    a = prepare(tmp_path / "a", documents(1, 40, 1, 32), documents(2, 10, 1, 32))
    b = prepare(tmp_path / "b", documents(3, 40, 32, 64), documents(4, 10, 32, 64))
    spec = moedsl.load_spec(write_spec(tmp_path / "s"))
    src = make_source(spec, f"{a}:0.7,{b}:0.3", seed=0)
    for split in ("train", "eval"):
        rows = torch.cat([src.batch(step, 64, SEQ, split=split).inputs for step in range(50)])
        from_a = (rows.masked_fill(rows == EOS, 0) < 32).all(1)
        assert ((rows >= 32).any(1) ^ from_a).all()  # every row from one folder
        assert abs(from_a.double().mean().item() - 0.7) < 0.03
    # bits per byte of a mixture weighs each row by its own folder's bytes per token
    first = src.batch(0, 64, SEQ, split="eval").inputs
    ratio = {f.path: f.bytes_per_token("eval") for f in src.folders}
    assert ratio[a] != ratio[b]
    want = [ratio[a] if (row[row != EOS] < 32).all() else ratio[b] for row in first]
    assert src.bytes_per_token(0, range(64), SEQ, "eval").tolist() == want
    same = make_source(spec, f"{a}:7,{b}:3", seed=0)  # weights are normalised
    assert torch.equal(same.batch(5, 16, SEQ).inputs, src.batch(5, 16, SEQ).inputs)
    assert data_items(f"{a},{b}")[0].weight == 0.5


def test_two_processes_take_the_single_process_batch_split_in_two(corpus, tmp_path):
    spec = moedsl.load_spec(write_spec(tmp_path / "s"))
    src = make_source(spec, str(corpus), seed=7)
    for split in ("train", "eval"):
        whole = src.batch(3, 8, SEQ, split=split)
        halves = [src.batch(3, 8, SEQ, rank=r, world=2, split=split) for r in range(2)]
        for field in ("inputs", "targets", "documents"):
            assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(whole, field))


def test_a_run_on_two_processes_has_the_losses_of_one(corpus, tmp_path):
    spec = write_spec(tmp_path / "s")
    losses = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        res = subprocess.run([sys.executable, "-m", "moedsl", "run", str(spec), "--data", str(corpus), "--nproc",
                              str(n), "--out", str(out), "--steps", "2", *RUN], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        losses[n] = metrics(out)
    assert len(losses[1]) == len(losses[2]) == 2
    for one, two in zip(losses[1], losses[2]):
        assert abs(one["loss"] - two["loss"]) < 1e-5
    assert abs(losses[1][-1]["eval_loss"] - losses[2][-1]["eval_loss"]) < 1e-5


def test_a_resumed_run_sees_the_same_batches_and_losses_as_an_uninterrupted_one(corpus, tmp_path, monkeypatch,
                                                                                  capsys):
    """6 steps at once, and 3 steps then a resume to 6 (a constant learning rate: the schedule does
    not depend on --steps); float32, so the losses are equal bit for bit."""
    spec = write_spec(tmp_path / "s")
    seen: dict = {}
    rows = Tokens.rows

    def recording(self, step, rows_, seq, split):
        b = rows(self, step, rows_, seq, split)
        seen.setdefault(current, {})[(split, step)] = b.inputs.clone()
        return b

    monkeypatch.setattr(Tokens, "rows", recording)
    base = ["run", str(spec), "--data", str(corpus), *RUN, "--eval-every", "3"]
    current = "whole"
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "whole")]) == 0
    current = "resumed"
    assert main([*base, "--steps", "3", "--out", str(tmp_path / "resumed")]) == 0
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in whole] == [r["loss"] for r in resumed]
    assert [r.get("eval_loss") for r in whole] == [r.get("eval_loss") for r in resumed]
    assert ("train", 5) in seen["resumed"] and seen["whole"].keys() == seen["resumed"].keys()
    for key, inputs in seen["whole"].items():
        assert torch.equal(inputs, seen["resumed"][key]), key


# ----------------------------------------------------------------------------- --data, train.data

def test_a_bad_weight_or_a_missing_folder_is_one_line_naming_the_item(corpus, tmp_path, capsys, no_model):
    spec = write_spec(tmp_path / "s")
    out = ["--out", tmp_path / "run", "--steps", "1"]
    assert "item 'b:x': the weight 'x' is not a number > 0" in refused(capsys, spec, "--data", f"{corpus}:0.5,b:x",
                                                                          *out)
    assert "item 'b:-1'" in refused(capsys, spec, "--data", f"{corpus}:0.5,b:-1", *out)
    line = refused(capsys, spec, "--data", f"{corpus}:0.5,{tmp_path / 'none'}:0.5", *out)
    assert f"item '{tmp_path / 'none'}:0.5': no such file or folder" in line
    line = refused(capsys, spec, "--data", f"{corpus}:0.5,{corpus}", *out)
    assert f"item '{corpus}' has no weight" in line
    assert not (tmp_path / "run").exists()


def test_train_data_in_a_spec_is_read_from_the_specs_folder_and_data_on_the_command_line_from_the_cwd(
        tmp_path, monkeypatch, capsys):
    prepare(tmp_path / "s" / "corpus", documents(1, 60), documents(2, 12))
    spec = write_spec(tmp_path / "s", data="corpus:2,corpus:1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = moedsl.load_spec(spec)
    assert spec_data(loaded) == f"{tmp_path / 's' / 'corpus'}:{2 / 3!r},{tmp_path / 's' / 'corpus'}:{1 / 3!r}"
    assert main(["run", str(spec), *RUN, "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    assert f"data {tmp_path / 's' / 'corpus'} (weight 0.667)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "s")
    assert main(["run", "spec.yaml", "--data", "corpus", *RUN, "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert metrics(tmp_path / "b")[0]["step"] == 1


def test_the_runs_first_lines_name_the_folder_its_tokens_and_the_tokenizer_with_its_hash(corpus, tmp_path, capsys):
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "1", "--out",
                 str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    m = json.loads((corpus / "manifest.json").read_text())
    tr, ev = m["splits"]["train"], m["splits"]["eval"]
    assert (f"moedsl: data {corpus}: train {tr['tokens']:,} tokens in {tr['documents']:,} documents, eval "
            f"{ev['tokens']:,} tokens in {ev['documents']:,} documents") in text
    assert f"tokenizer {corpus / 'tokenizer.json'} (sha256 {m['tokenizer']['sha256'][:12]})" in text
    assert "the model has none of its own" in text


# ----------------------------------------------------------------------------- refusals

def test_a_folder_prepared_with_another_tokenizer_than_the_models_is_refused_naming_both(corpus, tmp_path, capsys,
                                                                                          no_model):
    spec = write_spec(tmp_path / "m")
    theirs = save_tokenizer(tmp_path / "m" / "tokenizer.json", 64, word="v")  # the model's, beside its spec
    line = refused(capsys, spec, "--data", corpus, "--steps", "1", "--out", tmp_path / "run")
    assert f"prepared with the tokenizer {corpus / 'tokenizer.json'}" in line and str(theirs) in line
    assert tokenizer_sha256(theirs)[:12] in line and tokenizer_sha256(corpus / "tokenizer.json")[:12] in line


def test_folders_prepared_with_different_tokenizers_are_not_mixed_for_a_model_without_one(corpus, tmp_path, capsys,
                                                                                           no_model):
    other = prepare(tmp_path / "other", documents(1, 60), documents(2, 12), word="v")
    line = refused(capsys, write_spec(tmp_path / "s"), "--data", f"{corpus}:1,{other}:1", "--steps", "1", "--out",
                   tmp_path / "run")
    assert f"{corpus}:1 and {other}:1 were prepared with different tokenizers" in line


def test_token_ids_the_models_vocabulary_lacks_are_refused_naming_the_id_and_the_vocab(tmp_path, capsys, no_model):
    wide = prepare(tmp_path / "wide", documents(1, 60, 1, 100), documents(2, 12, 1, 100), vocab=128)
    top = max(int(d.max()) for d in documents(1, 60, 1, 100) + documents(2, 12, 1, 100))
    line = refused(capsys, write_spec(tmp_path / "s"), "--data", wide, "--steps", "1", "--out", tmp_path / "run")
    assert f"token id {top} >= model.vocab_size 64" in line


@pytest.mark.parametrize("damage", ["truncated shard", "manifest that does not match"])
def test_a_damaged_folder_is_refused_in_one_line_naming_the_file(corpus, tmp_path, capsys, no_model, damage):
    if damage == "truncated shard":
        shard = corpus / "train-00000.bin"
        shard.write_bytes(shard.read_bytes()[:-6])
        want = "train-00000.bin"
    else:
        m = json.loads((corpus / "manifest.json").read_text())
        m["splits"]["eval"]["tokens"] += 1
        (corpus / "manifest.json").write_text(json.dumps(m))
        want = "the eval split says"
    line = refused(capsys, write_spec(tmp_path / "s"), "--data", corpus, "--steps", "1", "--out", tmp_path / "run")
    assert line.startswith(f"moedsl: error: --data {corpus}: ") and want in line


def test_a_split_shorter_than_a_sequence_and_its_target_is_refused(tmp_path, capsys, no_model):
    short = prepare(tmp_path / "short", documents(1, 60), [np.array([5, 6, 7, EOS])])
    line = refused(capsys, write_spec(tmp_path / "s"), "--data", short, "--steps", "1", "--out", tmp_path / "run")
    assert f"the eval split has 4 tokens, fewer than a sequence of {SEQ} tokens plus its target ({SEQ + 1})" in line


@pytest.fixture
def imported(tmp_path):
    """A tiny Mixtral imported without a tokenizer.json."""
    ref, _ = tiny_reference(pytest.importorskip("transformers"), "mixtral")
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert not (tmp_path / "imp" / "tokenizer.json").exists()
    return tmp_path / "imp"


@pytest.mark.parametrize("how", ["--init IMPORT", "an import's spec"])
def test_raw_text_for_an_imported_model_without_its_tokenizer_is_refused(imported, tmp_path, capsys, no_model, how):
    text = tmp_path / "notes.txt"
    text.write_text("some words of text\n" * 200)
    weights = ["--init", imported] if how == "--init IMPORT" else ["--from-scratch"]
    capsys.readouterr()
    line = refused(capsys, imported / "spec.yaml", *weights, "--data", text, "--steps", "1", "--out",
                   tmp_path / "run")
    assert f"--data '{text}': raw text for a model with no tokenizer whose vocabulary is not bytes" in line
    assert str(imported) in line and "tokenizer.json" in line


def test_an_import_trains_on_a_folder_prepared_with_its_own_tokenizer_and_says_which(imported, corpus, tmp_path,
                                                                                       capsys):
    (imported / "tokenizer.json").write_text((corpus / "tokenizer.json").read_text())  # the same tokenizer
    capsys.readouterr()
    assert main(["run", str(imported / "spec.yaml"), "--init", str(imported), "--data", str(corpus), *RUN,
                 "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    sha = tokenizer_sha256(corpus / "tokenizer.json")[:12]
    assert f"moedsl: tokenizer {imported / 'tokenizer.json'} (sha256 {sha}), the model's" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0  # the run folder holds the import's tokenizer
    assert json.loads(capsys.readouterr().out)["loss"] == metrics(tmp_path / "run")[-1]["eval_loss"]
    other = prepare(tmp_path / "other", documents(1, 60), documents(2, 12), word="v")
    assert main(["eval", str(tmp_path / "run"), "--data", str(other)]) == 2
    assert "not the model's" in capsys.readouterr().err


def test_text_for_a_hand_written_spec_without_a_tokenizer_is_read_as_bytes_and_the_run_says_so(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("some words of text, read byte by byte\n" * 200)
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s", vocab=256)), "--data", str(text), *RUN, "--steps", "1",
                 "--out", str(run)]) == 0
    assert "moedsl: text as UTF-8 bytes: the model has no tokenizer" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["loss"] == metrics(run)[-1]["eval_loss"]
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-6)  # a token is a byte


# ----------------------------------------------------------------------------- evaluation

def test_eval_of_a_run_on_a_folder_repeats_its_eval_loss_and_gives_bits_per_byte_from_the_manifest(
        corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "2", "--out",
                 str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data"] == str(corpus) and r["examples"] == 8
    assert r["loss"] == metrics(run)[-1]["eval_loss"]  # the run's own evaluation: the same windows
    held = json.loads((corpus / "manifest.json").read_text())["splits"]["eval"]
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * held["tokens"] / held["bytes"] / math.log(2), rel=1e-6)
    other = prepare(tmp_path / "other", documents(5, 60), documents(6, 12))  # the same tokenizer, other text
    assert main(["eval", str(run), "--data", str(other)]) == 0
    table = capsys.readouterr().out
    assert "bits/byte" in table and "".join(table.split()).count(str(other).replace(" ", "")) == 1  # folded or not


def test_a_source_problem_reaches_eval_as_one_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "1", "--out",
                 str(run)]) == 0
    wide = prepare(tmp_path / "wide", documents(1, 60, 1, 100), documents(2, 12, 1, 100), vocab=128)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(wide)]) == 2
    err = capsys.readouterr().err.strip()
    # the run kept its tokenizer (its data's), so the other one is named first; its ids >= 64 come after
    assert len(err.splitlines()) == 1 and "prepared with the tokenizer" in err and "run/tokenizer.json" in err


def test_a_run_keeps_the_tokenizer_of_its_prepared_data_so_generate_and_eval_of_the_run_read_text(
        corpus, tmp_path, capsys):
    """A hand-written spec (no tokenizer) trained on a prepared folder: the run folder gets the
    folder's tokenizer.json, so `generate --prompt` of the run encodes and decodes words, and
    eval of the run on raw text is refused as bytes no more (text goes through that tokenizer)."""
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "1", "--out",
                 str(run)]) == 0
    assert tokenizer_sha256(run / "tokenizer.json") == tokenizer_sha256(corpus / "tokenizer.json")
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "w5 w6 w7", "--max-new-tokens", "3", "--json", "--no-stream"]) == 0
    out = json.loads(capsys.readouterr().out)
    words = out["text"][0].split()
    assert len(out["ids"][0]) == 3 and all(w.startswith("w") for w in words), out  # words, not bytes
    assert main(["eval", str(run), "--json"]) == 0  # its own data, through the kept tokenizer's hash check


def test_inspect_of_a_run_on_a_prepared_folder_reads_its_held_out_windows_as_pieces(corpus, tmp_path, capsys):
    """inspect defaults to the run's data; a prepared folder is read as tokens (its held-out windows),
    not as a text file, and the tokens are shown as the kept tokenizer's words."""
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "1", "--out",
                 str(run)]) == 0
    figures = moedsl.inspect(str(run), tokens=64)
    assert (figures["data"], figures["shown"], figures["held_out"]) == (str(corpus), "tokenizer", True)
    held = open_tokens(corpus).splits["eval"]
    held_ids = set(held.tokens(0, held.size).tolist())
    top = [t for layer in figures["layers"] for e in layer["top_tokens"] for t in e["tokens"]]
    assert top and {t["id"] for t in top} <= held_ids  # the held-out split's ids, not bytes of a text
    assert all(t["text"] == repr(f"w{t['id']}") for t in top), top[:3]  # each shown as its word


def test_a_packed_run_on_a_prepared_folder_trains_and_eval_repeats_its_loss(corpus, tmp_path, capsys):
    """--pack documents through the real loader: each batch carries the windows' documents (the
    corpus's documents are 5-41 tokens, so a row of 16 spans several), the run trains, and eval
    packs as the run did (its loss is the run's last eval_loss, and differs unpacked)."""
    run = tmp_path / "run"
    assert main(["run", str(write_spec(tmp_path / "s")), "--data", str(corpus), *RUN, "--steps", "2", "--out",
                 str(run), "--pack", "documents"]) == 0
    batch = make_source(moedsl.load_spec(tmp_path / "s" / "spec.yaml"), str(corpus), seed=0).batch(0, 4, SEQ)
    assert int(batch.documents.max()) >= 1  # rows that pack more than one document
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)["loss"]
    assert packed == metrics(run)[-1]["eval_loss"]
    assert main(["eval", str(run), "--json", "--pack", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != packed
