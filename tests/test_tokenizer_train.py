"""``moedsl tokenizer train`` (a byte-level BPE with bos/eos/pad that transformers loads) and a
spec's ``model.tokenizer`` (its vocab_size must cover the tokenizer's ids)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedsl
from moedsl.cli import main
from moedsl.errors import SpecError

tokenizers = pytest.importorskip("tokenizers")

CORPUS = ("def add(a, b):\n    return a + b\n\n" * 40 + "Grüße aus Köln, 東京 и Москва! 🙂\n" * 20
          + "the quick brown fox jumps over the lazy dog\n" * 40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained by the CLI on a small corpus: (folder, what the command printed)."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    rc = main(["tokenizer", "train", str(root / "corpus.txt"), "--vocab-size", "300", "--min-frequency", "1",
               "--out", str(root / "out" / "tokenizer.json")])
    assert rc == 0
    return root / "out"


def test_trained_tokenizer_has_bos_eos_pad_first_and_learns_merges_up_to_the_vocab_size(trained):
    tok = tokenizers.Tokenizer.from_file(str(trained / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<|bos|>", "<|endoftext|>", "<|pad|>")] == [0, 1, 2]
    assert tok.get_vocab_size() == 300  # 3 special + 256 bytes + 41 merges the corpus has plenty of
    assert len(tok.encode("the quick brown fox").ids) < len("the quick brown fox")  # merges shorten text
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|endoftext|>", "<|pad|>")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_round_trips_through_the_byte_level_tokenizer(trained, text):
    """The 256-byte initial alphabet: text the corpus never showed (any script, emoji, control
    characters) still encodes, with no unknown token, and decodes back to itself."""
    tok = tokenizers.Tokenizer.from_file(str(trained / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(i >= 3 for i in ids) or "<|" in text  # no special token out of ordinary text


def test_transformers_loads_the_trained_tokenizer_with_its_special_tokens(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    tok = tokenizers.Tokenizer.from_file(str(trained / "tokenizer.json"))
    text = "Grüße, 東京 — return a + b 🙂"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    assert hf.decode(hf(text)["input_ids"]) == text


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_vocab_too_small_for_the_bytes_and_special_tokens_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("hello")
    err = _refused(capsys, ["tokenizer", "train", str(tmp_path / "c.txt"), "--vocab-size", "258",
                            "--out", str(tmp_path / "t.json")])
    assert "--vocab-size 258: at least 259" in err
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]


def test_an_existing_tokenizer_is_replaced_only_with_overwrite(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS)
    out = tmp_path / "t" / "tokenizer.json"
    argv = ["tokenizer", "train", str(tmp_path / "c.txt"), "--vocab-size", "280", "--out", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    err = _refused(capsys, argv[:-2] + ["--vocab-size", "290", "--out", str(out)])
    assert "--overwrite" in err and out.read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(os.listdir(out.parent)) == ["tokenizer.json", "tokenizer_config.json"]  # no temporary left


def test_an_empty_corpus_is_refused_and_writes_no_tokenizer(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    err = _refused(capsys, ["tokenizer", "train", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                            "--out", str(tmp_path / "t" / "tokenizer.json")])
    assert "no documents" in err and not (tmp_path / "t" / "tokenizer.json").exists()


# ------------------------------------------------------------------------- model.tokenizer in a spec

SPEC = """moedsl: 1
name: tiny
model:
  vocab_size: {vocab}
  tokenizer: {tokenizer}
  d_model: 16
layers:
  - embedding: {{}}
  - ffn: {{hidden: 32}}
  - head: {{}}
"""


def test_spec_vocab_size_must_cover_the_tokenizers_largest_id_relative_to_the_spec_folder(trained, tmp_path,
                                                                                          monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes())
    monkeypatch.chdir(tmp_path)  # the path is the spec folder's, not the working directory's
    (folder / "small.yaml").write_text(SPEC.format(vocab=299, tokenizer="tokenizer.json"))
    with pytest.raises(SpecError) as e:
        moedsl.load_spec(folder / "small.yaml")
    (issue,) = e.value.issues
    assert issue.line == 4 and issue.path == ("model", "vocab_size")
    assert "its ids run to 299" in issue.message and "vocab_size: 300 or more" in str(e.value)
    (folder / "fits.yaml").write_text(SPEC.format(vocab=300, tokenizer="tokenizer.json"))
    assert moedsl.load_spec(folder / "fits.yaml").model.tokenizer == "tokenizer.json"


def test_spec_naming_a_missing_tokenizer_gets_a_located_error(tmp_path):
    (tmp_path / "s.yaml").write_text(SPEC.format(vocab=300, tokenizer="nope/tokenizer.json"))
    with pytest.raises(SpecError) as e:
        moedsl.load_spec(tmp_path / "s.yaml")
    (issue,) = e.value.issues
    assert issue.line == 5 and str(tmp_path / "nope" / "tokenizer.json") in issue.message
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2


def test_a_tokenizer_path_that_cannot_be_a_path_is_a_located_error_not_a_crash(tmp_path):
    (tmp_path / "s.yaml").write_text(SPEC.format(vocab=300, tokenizer="~no-such-user-moedsl/tokenizer.json"))
    with pytest.raises(SpecError) as e:
        moedsl.load_spec(tmp_path / "s.yaml")
    assert e.value.issues[0].line == 5 and "not a usable path" in e.value.issues[0].message


def test_a_tokenizer_on_a_model_without_token_ids_is_refused(tmp_path):
    spec = {"moedsl": 1, "name": "v", "model": {"input": "vectors", "d_model": 8, "tokenizer": "t.json"},
            "layers": [{"ffn": {"hidden": 8}}]}
    with pytest.raises(SpecError, match="'tokenizer' applies to input: tokens only"):
        moedsl.load_spec(spec)
