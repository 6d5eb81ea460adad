"""``moedsl data prepare`` / ``runtime.prepare``: sources -> a prepared token folder whose tokens
are, document by document, the tokenizer's own ids with eos after each; refusals in one line
with nothing left behind; a re-run on the same inputs writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moedsl.cli import main
from moedsl.runtime import prepare as prep
from moedsl.runtime.tokens import ShardWriter, open_tokens, tokenizer_sha256

tokenizers = pytest.importorskip("tokenizers")

EOS = "<|endoftext|>"
TRAIN_TEXT = ["def f(x):\n    return x * 2\n", "Grüße aus Köln", "東京タワー", "the cat sat on the mat",
              "🙂🙃 ok"] * 30


def _bpe(folder: Path) -> Path:
    """A small byte-level BPE tokenizer.json with eos (named in tokenizer_config.json) in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, special_tokens=["<|bos|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return _bpe(tmp_path_factory.mktemp("tok"))


def _documents(folder: Path) -> dict:
    """{"train"|"eval": [ids of each document, in order]}, read back through open_tokens."""
    tf = open_tokens(folder)
    out = {}
    for name, split in tf.splits.items():
        ids, docs = split.tokens(0, split.size), split.documents(0, split.size)
        out[name] = [ids[docs == d].tolist() for d in range(int(docs[-1]) + 1)] if split.size else []
    return out


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _expected(tok_path: Path, texts) -> list:
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id(EOS)
    return [tok.encode(t, add_special_tokens=False).ids + [eos] for t in texts if t]


def _listing(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


DOCS = st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
                          st.sampled_from(["", " ", "\n", "é", "🙂", "\r\n", "a"])), min_size=2, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=DOCS, held=st.sampled_from([0.05, 0.3, 0.5, 0.9]))
def test_prepared_tokens_are_the_tokenizers_ids_with_eos_each_document_in_exactly_one_split(tok_path, tmp_path_factory,
                                                                                            texts, held):
    assume(sum(1 for t in texts if t) >= 2)  # fewer is refused: tested below
    root = tmp_path_factory.mktemp("p")
    src = _jsonl(root / "docs.jsonl", texts)
    out = prep.prepare([src], tok_path, root / "out", held_out=held)
    got = _documents(out)
    want = _expected(tok_path, texts)
    assert Counter(map(tuple, got["train"] + got["eval"])) == Counter(map(tuple, want))  # each exactly once
    assert got["train"] and got["eval"]  # at least one document on each side
    assert _is_subsequence(got["train"], want) and _is_subsequence(got["eval"], want)  # in source order
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["bytes"] + m["splits"]["eval"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert m["tokenizer"]["sha256"] == tokenizer_sha256(tok_path) == tokenizer_sha256(out / "tokenizer.json")
    assert m["dtype"] == "uint16" and m["options"]["skipped_empty"] == texts.count("")


def test_the_held_out_split_is_chosen_by_each_documents_text_whatever_the_order(tok_path, tmp_path):
    texts = [f"document number {i}" for i in range(200)]
    a = _documents(prep.prepare([_jsonl(tmp_path / "a.jsonl", texts)], tok_path, tmp_path / "a", held_out=0.2))
    b = _documents(prep.prepare([_jsonl(tmp_path / "b.jsonl", texts[::-1])], tok_path, tmp_path / "b",
                                held_out=0.2))
    assert sorted(a["eval"]) == sorted(b["eval"])
    assert 15 <= len(a["eval"]) <= 65  # about 20% of 200


def test_a_vocab_above_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"], vocab[EOS] = 70_000, 70_001
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = ["w1 w65535 w65536 w69999", "w0 nope w7"]
    out = prep.prepare([_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "tokenizer.json", tmp_path / "out")
    tf = open_tokens(out)
    assert tf.manifest["dtype"] == "uint32" and tf.eos_id == 70_001 and tf.vocab_size == 70_002
    got = _documents(out)
    assert sorted(got["train"] + got["eval"]) == [[0, 70_000, 7, 70_001], [1, 65535, 65536, 69999, 70_001]]


def test_rerunning_on_the_same_inputs_writes_nothing_and_a_changed_source_needs_overwrite(tok_path, tmp_path,
                                                                                         capsys):
    src = _jsonl(tmp_path / "d.jsonl", ["one document", "another one", "a third"])
    argv = ["data", "prepare", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "MB read (100%)" in capsys.readouterr().out  # progress as plain lines when not on a terminal
    manifest = tmp_path / "out" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert main(argv) == 0
    assert "is up to date" in capsys.readouterr().out and manifest.stat().st_mtime_ns == stamp
    _jsonl(src, ["one document", "another one", "a third, changed"])
    os.utime(src, ns=(stamp + 10**9, stamp + 10**9))
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and manifest.stat().st_mtime_ns == stamp
    assert main(argv + ["--overwrite"]) == 0
    want = _expected(tok_path, ["one document", "another one", "a third, changed"])
    got = _documents(tmp_path / "out")
    assert sorted(got["train"] + got["eval"]) == sorted(want)
    assert _listing(tmp_path) == sorted(["d.jsonl", "out", *[f"out/{n}" for n in os.listdir(tmp_path / "out")]])


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moedsl: error: "), err
    return err


@pytest.mark.parametrize("lines,message", [
    (['{"text": "fine"}', '{"text": "also fine"}', "{not json"], ":3: not JSON"),
    (['{"text": "fine"}', '{"body": "x"}'], ":2: no field 'text' (its fields: 'body'"),
    (['{"text": "fine"}', '{"text": 7}'], ":2: field 'text' is a number, not a string"),
    (['["text"]'], ":1: a JSON list, not an object"),
    (['{"text": "fine"}', "", '{"text": "\\ud800"}'], ":3: field 'text' holds a lone surrogate"),
    (["", '{"text": ""}'], "no documents (1 empty skipped)"),
    (['{"text": "only one"}'], "one document"),
])
def test_bad_jsonl_is_refused_in_one_line_naming_file_and_line_and_leaves_nothing(tok_path, tmp_path, capsys,
                                                                                 lines, message):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    err = _refused(capsys, ["data", "prepare", str(src), "--tokenizer", str(tok_path), "--out",
                            str(tmp_path / "out"), "--no-progress"])
    assert message in err
    if message.startswith(":"):  # the file and its line
        assert f"{src}{message.split(' ')[0]}" in err
    assert _listing(tmp_path) == ["d.jsonl"]


def test_an_out_that_is_inside_or_holds_a_source_or_the_tokenizer_is_refused(tok_path, tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("alpha")
    (tmp_path / "texts" / "b.txt").write_text("beta")
    base = ["data", "prepare", str(tmp_path / "texts"), "--tokenizer", str(tok_path), "--overwrite", "--out"]
    assert "is the source" in _refused(capsys, base + [str(tmp_path / "texts")])
    assert "lies inside the source" in _refused(capsys, base + [str(tmp_path / "texts" / "out")])
    assert "holds the source" in _refused(capsys, base + [str(tmp_path)])
    assert "holds the source" in _refused(capsys, base + [str(tok_path.parent)])
    assert _listing(tmp_path) == ["texts", "texts/a.txt", "texts/b.txt"]


@pytest.mark.parametrize("argv_tail,message", [
    (["--held-out", "0"], "--held-out 0.0: the fraction of documents held out, above 0 and below 1"),
    (["--held-out", "1"], "above 0 and below 1"),
    (["--separator", ""], "--separator: give a non-empty text"),
])
def test_bad_options_are_refused_in_one_line(tok_path, tmp_path, capsys, argv_tail, message):
    src = _jsonl(tmp_path / "d.jsonl", ["a", "b"])
    assert message in _refused(capsys, ["data", "prepare", str(src), "--tokenizer", str(tok_path), "--out",
                                        str(tmp_path / "out"), *argv_tail])
    assert _listing(tmp_path) == ["d.jsonl"]


def test_missing_source_missing_tokenizer_and_a_tokenizer_without_eos_are_refused(tok_path, tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", ["a", "b"])
    out = ["--out", str(tmp_path / "out")]
    assert "nope.txt: no such file or folder" in _refused(
        capsys, ["data", "prepare", str(tmp_path / "nope.txt"), "--tokenizer", str(tok_path), *out])
    assert "no such tokenizer file" in _refused(
        capsys, ["data", "prepare", str(src), "--tokenizer", str(tmp_path / "t.json"), *out])
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    assert "no eos token" in _refused(capsys, ["data", "prepare", str(src), "--tokenizer",
                                               str(tmp_path / "t.json"), *out])
    assert _listing(tmp_path) == ["d.jsonl", "t.json"]


def test_an_interrupt_midway_leaves_no_out_and_no_temporary_folder_and_an_old_out_untouched(tok_path, tmp_path,
                                                                                           monkeypatch):
    src = _jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(50)])
    prep.prepare([src], tok_path, tmp_path / "out")
    before = {p: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = {"n": 0}
    add = ShardWriter.add

    def interrupted(self, ids, nbytes):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return add(self, ids, nbytes)

    monkeypatch.setattr(ShardWriter, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([src], tok_path, tmp_path / "out", held_out=0.5, overwrite=True)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([src], tok_path, tmp_path / "new", held_out=0.5)
    assert _listing(tmp_path) == sorted(["d.jsonl", "out", *[f"out/{p.name}" for p in before]])
    assert {p: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_folder_is_read_recursively_in_sorted_order_with_binaries_skipped_and_counted(tok_path, tmp_path, capsys):
    root = tmp_path / "texts"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "z.txt").write_text("zulu")
    (root / "a.txt").write_text("alpha Grüße")
    (root / "b" / "deep" / "c.md").write_text("charlie 東京")
    (root / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (root / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".git" / "HEAD").write_text("hidden")
    (root / "lines.jsonl").write_text('{"text": "from jsonl"}\n')
    assert main(["data", "prepare", str(root), "--tokenizer", str(tok_path), "--out", str(tmp_path / "out"),
                 "--held-out", "0.5"]) == 0
    assert "skipped 2 binary file(s)" in capsys.readouterr().out
    got = _documents(tmp_path / "out")
    want = _expected(tok_path, ["alpha Grüße", "charlie 東京", "from jsonl", "zulu"])
    assert sorted(got["train"] + got["eval"]) == sorted(want)
    assert _is_subsequence(got["train"], want) and _is_subsequence(got["eval"], want)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["sources"][0]["kind"] == "folder" and m["sources"][0]["files"] == 4
    assert m["options"]["skipped_binary"] == 2


@pytest.mark.parametrize("flag,want", [
    (["--split-lines"], ["first line", "second line", "third", "last, no newline"]),
    (["--separator", "\\n\\n"], ["first line\r\nsecond line", "third", "\nlast, no newline"]),
    ([], ["first line\r\nsecond line\n\nthird\n\n\nlast, no newline"]),
])
def test_a_text_file_is_one_document_or_cut_at_lines_or_a_separator(tok_path, tmp_path, flag, want):
    src = tmp_path / "t.txt"
    src.write_bytes(b"first line\r\nsecond line\n\nthird\n\n\nlast, no newline")
    # one document cannot be split in two: give a second file
    (tmp_path / "u.txt").write_text("other")
    assert main(["data", "prepare", str(src), str(tmp_path / "u.txt"), "--tokenizer", str(tok_path), "--out",
                 str(tmp_path / "out"), *flag]) == 0
    got = _documents(tmp_path / "out")
    assert sorted(got["train"] + got["eval"]) == sorted(_expected(tok_path, want + ["other"]))


def test_a_separator_across_read_chunks_is_found(tok_path, tmp_path, monkeypatch):
    from moedsl.runtime import corpus

    monkeypatch.setattr(corpus, "CHUNK", 7)
    src = tmp_path / "t.txt"
    src.write_text("αβγ<SEP>δεζ<SEP><SEP>long document here<SEP>x", encoding="utf-8")
    docs = [t for t, _ in corpus.Corpus([src], separator="<SEP>")]
    assert docs == ["αβγ", "δεζ", "long document here", "x"]


def test_a_text_file_that_is_not_utf8_is_refused_naming_the_byte(tok_path, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    err = _refused(capsys, ["data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--tokenizer",
                            str(tok_path), "--out", str(tmp_path / "out")])
    assert f"{tmp_path / 'b.txt'}: not UTF-8 text (byte 3" in err
    assert _listing(tmp_path) == ["a.txt", "b.txt"]


def test_parquet_is_read_by_record_batches_and_a_missing_column_is_named(tok_path, tmp_path, capsys, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from moedsl.runtime import corpus

    monkeypatch.setattr(corpus, "ROWS", 3)  # several record batches
    texts = [f"row {i} Grüße" for i in range(10)] + ["", "東京"]
    pq.write_table(pa.table({"id": list(range(12)), "body": texts}), tmp_path / "t.parquet", row_group_size=5)
    assert main(["data", "prepare", str(tmp_path / "t.parquet"), "--field", "body", "--tokenizer", str(tok_path),
                 "--out", str(tmp_path / "out")]) == 0
    got = _documents(tmp_path / "out")
    want = _expected(tok_path, texts)
    assert Counter(map(tuple, got["train"] + got["eval"])) == Counter(map(tuple, want))
    err = _refused(capsys, ["data", "prepare", str(tmp_path / "t.parquet"), "--tokenizer", str(tok_path),
                            "--out", str(tmp_path / "out2")])
    assert "t.parquet: no column 'text' (its columns: 'id', 'body'" in err
    assert "column 'id' holds int64, not strings" in _refused(
        capsys, ["data", "prepare", str(tmp_path / "t.parquet"), "--field", "id", "--tokenizer", str(tok_path),
                 "--out", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()


def test_a_datasets_save_to_disk_folder_is_read_and_a_dataset_dict_asks_for_one_split(tok_path, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    texts = [f"example {i}: ünïcödé" for i in range(30)]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert main(["data", "prepare", str(tmp_path / "ds"), "--tokenizer", str(tok_path), "--out",
                 str(tmp_path / "out")]) == 0
    got = _documents(tmp_path / "out")
    want = _expected(tok_path, texts)
    assert Counter(map(tuple, got["train"] + got["eval"])) == Counter(map(tuple, want))
    assert _is_subsequence(got["train"], want)  # the shards in state.json's order
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"][0]["kind"] == "datasets"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()  # datasets' own progress bars
    err = _refused(capsys, ["data", "prepare", str(tmp_path / "dd"), "--tokenizer", str(tok_path), "--out",
                            str(tmp_path / "out2")])
    assert "a datasets DatasetDict (splits train, test): give one split's folder" in err


def test_pystdlib_documents_are_the_files_the_run_reads(tok_path):
    from moedsl.runtime.corpus import Corpus
    from moedsl.runtime.data import pystdlib_bytes

    c = Corpus(["pystdlib"])
    train, held, _ = pystdlib_bytes()
    assert c.total_bytes == len(train) + len(held) - (len(c.files) - 2)  # the run joins the files with newlines
    first_text, first_bytes = next(iter(c))
    assert first_text.encode() == c.files[0].path.read_bytes() and first_bytes == c.files[0].size


def test_cached_prepare_prepares_once_per_source_and_tokenizer(tok_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDSL_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "notes.txt"
    src.write_text("first paragraph")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "a.txt").write_text("another file")
    (tmp_path / "more" / "b.txt").write_text("and one more")
    a = prep.cached_prepare(str(tmp_path / "more"), tok_path)
    assert a.parent == tmp_path / "cache" / "tokens" and a.name.startswith("more-")
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert prep.cached_prepare(str(tmp_path / "more"), tok_path) == a
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    (tmp_path / "more" / "b.txt").write_text("and one more, edited")
    b = prep.cached_prepare(str(tmp_path / "more"), tok_path)
    assert b != a and sorted(sum(_documents(b).values(), [])) == sorted(
        _expected(tok_path, ["another file", "and one more, edited"]))


def test_cached_prepare_cuts_a_lone_text_file_at_blank_lines_and_takes_an_import_folder(tok_path, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("MOEDSL_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "notes.txt"
    src.write_text("first paragraph\nstill the first\n\nsecond one\n\nthird")
    out = prep.cached_prepare(str(src), tok_path.parent)  # the folder holding tokenizer.json
    assert sorted(sum(_documents(out).values(), [])) == sorted(
        _expected(tok_path, ["first paragraph\nstill the first", "second one", "third"]))


def test_importing_prepare_does_not_import_torch():
    """A memory-limited prepare (bench/data.py runs one under RLIMIT_AS) must not carry torch."""
    code = "import sys, moedsl.runtime.prepare, moedsl.cli; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_raw_text_for_an_import_with_a_tokenizer_is_tokenized_with_it_the_same_on_two_processes(tmp_path, capsys,
                                                                                                 monkeypatch):
    """The issue's case: `moedsl run IMPORT/spec.yaml --init IMPORT --data notes.txt`, where the
    import has its tokenizer.json. The text is prepared with that tokenizer once into the cache
    (both processes of a 2-process run find the one folder), the first lines name the tokenizer,
    and 1 and 2 processes see the same tokens (the same losses) - not UTF-8 bytes as ids."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_helpers import import_tiny_mixtral, run_init_on_one_and_two_processes

    imp = import_tiny_mixtral(tmp_path, vocab_size=320)
    tok = _bpe(imp)  # the import's own tokenizer (320 ids, as the model's vocabulary)
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"note {i}: {TRAIN_TEXT[i % len(TRAIN_TEXT)]} and more words" for i in range(200)))
    monkeypatch.setenv("MOEDSL_CACHE_DIR", str(tmp_path / "cache"))
    one, two = run_init_on_one_and_two_processes(imp, tmp_path, "--data", str(notes), "--steps", "2")
    assert len(one) == 2 and two == pytest.approx(one, rel=1e-5)
    made = [p.parent for p in (tmp_path / "cache").rglob("manifest.json")]
    assert len(made) == 1 and open_tokens(made[0]).tokenizer_sha256 == tokenizer_sha256(tok)
    # the text's documents are the tokenizer's ids + eos, not its bytes
    eos = json.loads(tok.read_text())["added_tokens"][1]["id"]
    split = open_tokens(made[0]).splits["train"]
    first = split.tokens(0, int(split._starts[0][1]) if split.document_count > 1 else split.size)
    assert first[-1] == eos and max(first[:-1]) < 320
    capsys.readouterr()
    assert main(["run", str(imp / "spec.yaml"), "--init", str(imp), "--data", str(notes), "--steps", "1", "--batch",
                 "4", "--seq", "8", "--no-progress", "--ignore-memory-check", "--out", str(tmp_path / "run3")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"tokenizer {imp / 'tokenizer.json'}" in said and "bytes" not in said, said[:600]
