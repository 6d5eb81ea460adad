"""moedsl inspect: the routing figures of a trained model (runtime/inspect.py)."""
from __future__ import annotations

import contextlib
import io
import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moedsl.api import build_model
from moedsl.cli import main
from moedsl.runtime import inspect as ins


def _spec(gate: dict, experts: int = 4, vocab: int = 256, hierarchy: dict | None = None) -> dict:
    moe = {"experts": {"count": experts, "hidden": 16}}
    moe.update({"hierarchy": hierarchy} if hierarchy else {"gate": gate})
    return {"moedsl": 1, "name": "tiny-inspect",
            "model": {"vocab_size": vocab, "d_model": 16, "max_seq_len": 32},
            "layers": [{"embedding": {}}, {"attention": {"heads": 2}}, {"moe": moe}, {"norm": {}}, {"head": {}}],
            "train": {"batch_size": 4, "seq_len": 16, "steps": 3, "lr": 3.0e-3}}


def _batches(n: int = 2, vocab: int = 256, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- the formulas

def _loop_rate(sets: list) -> float:
    """sets[b][t]: a Python set of experts. Share of (t, t+1) pairs within a sequence that intersect."""
    hit = pairs = 0
    for seq in sets:
        for t in range(len(seq) - 1):
            pairs += 1
            hit += bool(seq[t] & seq[t + 1])
    return hit / pairs


def _loop_chance(sets: list) -> float:
    """Two tokens drawn independently (with replacement) from all tokens: how often their sets meet."""
    flat = [s for seq in sets for s in seq]
    return sum(bool(a & b) for a in flat for b in flat) / len(flat) ** 2


def _as_tensor(sets: list, E: int) -> torch.Tensor:
    B, T = len(sets), len(sets[0])
    m = torch.zeros(B, T, E, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for e in sets[b][t]:
                m[b, t, e] = True
    return m


@st.composite
def _routings(draw):
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, E))
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    fixed = draw(st.booleans())  # top-k (k experts each) or expert choice (any number, maybe none)
    sizes = st.just(k) if fixed else st.integers(0, E)
    sets = [[set(draw(st.lists(st.integers(0, E - 1), min_size=n, max_size=n, unique=True)))
             for n in [draw(sizes) for _ in range(T)]] for _ in range(B)]
    return E, sets


@settings(max_examples=60, deadline=None)
@given(_routings())
def test_consecutive_rate_and_its_chance_match_a_plain_loop(case):
    E, sets = case
    m = _as_tensor(sets, E)
    assert ins.consecutive_rate(m) == pytest.approx(_loop_rate(sets))
    assert ins.chance_rate(m.flatten(0, 1)) == pytest.approx(_loop_chance(sets), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=6), min_size=1, max_size=3))
def test_first_choice_chance_is_the_sum_of_squared_shares_and_matches_a_plain_loop(seqs):
    T = min(len(s) for s in seqs)
    first = torch.tensor([s[:T] for s in seqs])
    assert ins.first_choice_chance(first, 5) == pytest.approx(_loop_chance([[{e} for e in s[:T]] for s in seqs]))


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (6, 3), (5, 2)])
def test_uniform_rate_is_the_chance_of_uniform_top_k_sets_as_in_mixtral_section_5(E, k):
    every = [set(c) for c in combinations(range(E), k)]
    brute = sum(bool(a & b) for a in every for b in every) / len(every) ** 2
    assert ins.uniform_rate(E, k) == pytest.approx(brute)
    # and the chance given perfectly uniform sets is the same number
    assert ins.chance_rate(_as_tensor([every], E)[0]) == pytest.approx(brute)
    if (E, k) == (8, 2):
        assert ins.uniform_rate(E, k) == pytest.approx(1 - 15 / 28)  # Mixtral's 46% random baseline


# ----------------------------------------------------------------------------- loads and drops

def _recount(model, batches):
    """Per MoE layer, counted in plain Python from the Routing its gate returned: routed and kept
    assignments per expert, dropped assignments, and the router's own dropped count."""
    found = {}

    def hook(name):
        def f(m, args, r):
            E = r.num_experts
            routed = [True] * r.expert.numel() if r.routed is None else r.routed.tolist()
            acc = found.setdefault(name, {"routed": [0] * E, "kept": [0] * E, "dropped": 0, "own": 0})
            for e, s, ok in zip(r.expert.tolist(), r.slot.tolist(), routed):
                if ok:
                    acc["routed"][e] += 1
                    acc["dropped"] += s < 0
                acc["kept"][e] += s >= 0
            acc["own"] += int(r.dropped)
        return f

    hooks = [gate.register_forward_hook(hook(name)) for name, gate in ins._gates(model)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return found


GATES = {
    "switch": {"type": "switch", "capacity_factor": 1.0, "eval_capacity_factor": 0.5},
    "gshard": {"type": "gshard", "capacity_factor": 1.0, "eval_capacity_factor": 0.5, "routing_groups": 2},
    "topk": {"type": "topk", "k": 2, "capacity_factor": 0.5},
    "expert_choice": {"type": "expert_choice", "capacity_factor": 1.0, "max_experts_per_token": 1},
    "softmax": {"type": "softmax"},
}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_loads_sum_to_one_and_equal_the_counts_of_the_routing(gate):
    spec = _spec(GATES[gate])
    model = build_model(spec, seed=1).eval()
    batches = _batches()
    want = _recount(model, batches)
    layers = ins.capture(model, batches, 256)
    for l in layers:
        fig = ins.layer_figures(l, 3, str)
        w = want[l.name]
        assert fig["routed_counts"] == w["routed"]
        assert fig["kept_counts"] == w["kept"]
        assert sum(fig["load"]) == pytest.approx(1.0) and sum(fig["kept_load"]) == pytest.approx(1.0)
        assert fig["load"] == pytest.approx([c / sum(w["routed"]) for c in w["routed"]])
        assert fig["dropped"] == w["dropped"] == w["own"]
        assert fig["dropped_share"] == pytest.approx(w["dropped"] / sum(w["routed"]))
        if gate in ("switch", "gshard", "topk", "expert_choice"):
            assert fig["dropped"] > 0  # the capacity here is small enough to drop
        if gate == "softmax":
            assert fig["consecutive"]["shared"] is None and "every token" in fig["consecutive"]["note"]
        if gate == "expert_choice":
            assert fig["consecutive"]["first"] is None and fig["consecutive"]["shared"]["rate"] >= 0


@pytest.mark.parametrize("gate", ["switch", "gshard", "topk"])
def test_capacity_factor_zero_inspects_dropless_and_leaves_the_model_as_it_was(gate):
    model = build_model(_spec(GATES[gate]), seed=1).eval()
    before = [g.spec for _, g in ins._gates(model)]
    (l,) = ins.capture(model, _batches(), 256, capacity_factor=0)
    fig = ins.layer_figures(l, 3, str)
    assert fig["dropped"] == 0 and fig["dropped_share"] == 0.0 and fig["capacity_factor"] is None
    assert fig["kept_counts"] == fig["routed_counts"]
    assert [g.spec for _, g in ins._gates(model)] == before
    assert "choose" not in ins._gates(model)[0][1].__dict__  # the wrapper is gone
    (l,) = ins.capture(model, _batches(), 256)  # as trained: it drops
    assert ins.layer_figures(l, 3, str)["dropped"] > 0


def test_a_capacity_factor_makes_a_dropless_gate_drop_as_the_router_counts():
    model = build_model(_spec({"type": "topk", "k": 2}), seed=1).eval()
    (l,) = ins.capture(model, _batches(), 256)
    assert ins.layer_figures(l, 3, str)["dropped"] == 0
    batches = _batches()
    (l,) = ins.capture(model, batches, 256, capacity_factor=0.5)
    fig = ins.layer_figures(l, 3, str)
    # C = ceil(0.5 · 2 · 64 / 4) = 16 slots per expert and batch: what is past them is dropped
    want = sum(max(0, int(c) - 16) for b in batches for c in torch.bincount(
        _topk_of(model, b).reshape(-1), minlength=4))
    assert fig["capacity_factor"] == 0.5 and fig["dropped"] == want > 0
    assert not ins._gates(model)[0][1].spec.has_capacity  # the model is dropless again


def _topk_of(model, ids):
    """The k = 2 experts the router of the first MoE layer picks for the tokens of ``ids``."""
    gate = ins._gates(model)[0][1]
    seen = {}
    h = gate.register_forward_hook(lambda m, a, r: seen.update(x=a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.softmax(seen["x"] @ gate.weight.T, -1).topk(2, -1).indices


def test_first_choice_is_the_routers_best_expert_and_topk_sets_are_its_k_choices():
    model = build_model(_spec({"type": "topk", "k": 2}), seed=2).eval()
    batches = _batches(1)
    (l,) = ins.capture(model, batches, 256)
    gate = ins._gates(model)[0][1]
    # recompute the router by hand: logits of the tokens the gate saw
    seen = {}
    h = gate.register_forward_hook(lambda m, a, r: seen.update(x=a[0]))
    with torch.no_grad():
        model(batches[0])
    h.remove()
    probs = torch.softmax(seen["x"] @ gate.weight.T, -1)
    top2 = probs.topk(2, -1).indices
    assert torch.equal(l.first[0].reshape(-1), top2[:, 0])
    member = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top2, True)
    assert torch.equal(l.sets[0].reshape(-1, 4), member)


def test_hierarchical_gate_has_k_equal_to_both_levels_and_its_rates():
    h = {"groups": 2, "experts_per_group": 2, "primary": {"type": "topk", "k": 1},
         "secondary": {"type": "topk", "k": 2}}
    model = build_model(_spec(None, hierarchy=h), seed=3).eval()
    (l,) = ins.capture(model, _batches(), 256)
    fig = ins.layer_figures(l, 3, str)
    assert fig["k"] == 2 and fig["consecutive"]["shared"]["k"] == 2
    assert sum(fig["load"]) == pytest.approx(1.0)
    # every occurrence of a token goes to k = 2 experts: its shares over the experts sum to 2
    top = ins.layer_figures(l, 256, str)["top_tokens"]
    shares = {}
    for entry in top:
        for x in entry["tokens"]:
            shares[x["id"]] = shares.get(x["id"], 0.0) + x["of_token"]
    assert shares and all(v == pytest.approx(2.0) for v in shares.values())


# ----------------------------------------------------------------------------- top tokens

def test_each_expert_of_a_hash_gate_takes_exactly_the_tokens_hashed_to_it():
    model = build_model(_spec({"type": "hash"}, vocab=32), seed=0).eval()
    table = ins._gates(model)[0][1].table
    batches = _batches(3, vocab=32)
    (l,) = ins.capture(model, batches, 32)
    fig = ins.layer_figures(l, 32, str)
    ids = torch.cat([b.reshape(-1) for b in batches])
    for entry in fig["top_tokens"]:
        e = entry["expert"]
        mine = {int(t) for t in ids if int(table[t]) == e}
        assert {x["id"] for x in entry["tokens"]} == mine
        for x in entry["tokens"]:
            assert x["count"] == int((ids == x["id"]).sum()) and x["of_token"] == 1.0
        counts = [x["count"] for x in entry["tokens"]]
        assert counts == sorted(counts, reverse=True)
    # top 2: the two most frequent of each expert's tokens
    fig2 = ins.layer_figures(l, 2, str)
    for a, b in zip(fig["top_tokens"], fig2["top_tokens"]):
        assert [x["count"] for x in b["tokens"]] == [x["count"] for x in a["tokens"][:2]]
        assert b["top_share"] == pytest.approx(sum(x["count"] for x in a["tokens"][:2]) / a["assignments"])


def test_bytes_are_shown_as_quoted_pieces_with_whitespace_and_control_bytes_escaped():
    assert [ins.byte_piece(i) for i in (97, 32, 10, 0, 200)] == ["'a'", "' '", "'\\n'", "'\\x00'", "'\\xc8'"]


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    spec = d / "tiny.yaml"
    spec.write_text(yaml.safe_dump(_spec({"type": "topk", "k": 2, "capacity_factor": 1.0, "routing_groups": 2})))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(spec), "--steps", "3", "--out", str(d / "run"), "--no-progress"]) == 0
    return d


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_inspect_of_a_tiny_trained_run_writes_the_png_and_prints_json(tiny_run):
    code, out, _ = _cli("inspect", tiny_run / "run", "--data", "synthetic", "--tokens", "256", "--json")
    assert code == 0
    r = json.loads(out)
    assert {"model", "step", "tokens", "seq", "batch", "layers", "png"} <= set(r)
    assert r["step"] == 3 and r["tokens"] == 256 and r["seq"] == 16 and r["batch"] == 4
    (fig,) = r["layers"]
    assert {"load", "kept_load", "dropped_share", "consecutive", "top_tokens"} <= set(fig)
    assert set(fig["consecutive"]) >= {"first", "shared"} and fig["consecutive"]["shared"]["k"] == 2
    png = tiny_run / "run" / "inspect" / "inspect.png"
    assert Path(r["png"]) == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((png.parent / "inspect.json").read_text())["layers"] == r["layers"]


def test_inspect_reads_a_text_file_and_a_spec_with_its_checkpoint(tiny_run):
    text = tiny_run / "notes.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    code, out, _ = _cli("inspect", tiny_run / "tiny.yaml", "--checkpoint", tiny_run / "run", "--text", text,
                        "--tokens", "128", "--top", "3", "--out", tiny_run / "out")
    assert code == 0, out
    assert "layers.2 (topk, 4 experts, k = 2" in out and (tiny_run / "out" / "inspect.png").is_file()


def test_bad_inputs_are_one_line_and_exit_2(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ("inspect", tmp_path / "empty", "--data", "synthetic"),  # a folder with no checkpoint
        ("inspect", tmp_path / "nothing"),
        ("inspect", tiny_run / "tiny.yaml"),  # a spec without --checkpoint
        ("inspect", tiny_run / "run", "--text", tmp_path / "none.txt"),
        ("inspect", tiny_run / "run", "--text", tiny_run / "notes.txt", "--data", "synthetic"),
        ("inspect", tiny_run / "run", "--capacity-factor", "-1"),
        ("inspect", tiny_run / "run", "--seq", "999"),
        ("inspect", tiny_run / "run", "--batch", "3", "--seq", "5", "--data", "synthetic"),
    ]
    (tmp_path / "short.txt").write_text("x" * 20)
    cases.append(("inspect", tiny_run / "run", "--text", tmp_path / "short.txt"))
    for args in cases:
        code, out, err = _cli(*args)
        assert code == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


def test_an_imports_tokenizer_json_reads_the_text_and_names_the_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = ins._tokenizer(tmp_path)
    (tmp_path / "t.txt").write_text("w3 w17 w3 w39")
    assert ins._text_ids(str(tmp_path / "t.txt"), loaded, 40).tolist() == [3, 17, 3, 39]
    assert ins._decoder(loaded, byte_level=False)(17) == "'w17'"
    assert ins._tokenizer(tmp_path / "elsewhere") is None  # no tokenizer.json: ids (or bytes) are shown
    assert ins._decoder(None, byte_level=False)(17) == "17"


def test_a_tokenizer_json_without_the_tokenizers_library_is_one_clear_error(tmp_path, monkeypatch):
    """Both `inspect` and `generate` read an import's tokenizer.json through one function; when the
    library is missing it names the file and the install, not ids shown in place of text."""
    import sys

    from moedsl.errors import UserError
    from moedsl.runtime.generate_cli import Codec

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    for load in (lambda: ins._tokenizer(tmp_path), lambda: Codec.find(None, [tmp_path])):
        with pytest.raises(UserError, match=r"tokenizer\.json: reading it needs the tokenizers library: "
                                            r"pip install 'moedsl\[hf\]'"):
            load()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x", "1,,0"])
def test_eval_and_inspect_refuse_the_same_capacity_factors_with_the_same_line(tmp_path, capsys, value):
    for command in ("eval", "inspect"):  # checked before the model is looked for
        assert main([command, str(tmp_path / "none"), "--capacity-factor", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"moedsl: error: --capacity-factor {value}: {value.split(',')[-2 if ',,' in value else 0]!r} "
                       "is not a finite number >= 0 (0: dropless)"]


def test_a_sweep_of_capacity_factors_is_for_eval_inspect_takes_one(tmp_path, capsys):
    assert ins.capacity_factors("2,1,0.5,0.25,0") == [2.0, 1.0, 0.5, 0.25, 0.0]
    assert main(["inspect", str(tmp_path / "none"), "--capacity-factor", "1,0"]) == 2
    assert "inspect takes one factor (moedsl eval sweeps several)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real text by default, pieces

TINY_MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)


def _bpe(vocab: int):
    """A SentencePiece-style BPE tokenizer (Metaspace: '▁' starts a word) of ``vocab`` pieces, trained
    offline on a few lines of Python; characters it never saw are <unk> (id 0)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"], limit_alphabet=40)
    tok.train_from_iterator(["def the(self, x):\n    return self.value + x\n" * 50], trainer)
    return tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Mixtral import (transformers' weights, nothing downloaded) with a BPE tokenizer.json,
    and the same import without one."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("inspect-import")
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY_MIXTRAL)).save_pretrained(d / "hf")
    _bpe(TINY_MIXTRAL["vocab_size"]).save(str(d / "hf" / "tokenizer.json"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["import", str(d / "hf"), "--out", str(d / "imp")]) == 0
    bare = d / "bare"
    bare.mkdir()
    for f in (d / "imp").iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    return d


def _files(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def test_an_import_with_a_tokenizer_inspects_held_out_pystdlib_through_it_and_shows_pieces(imported, tmp_path):
    from moedsl.runtime.data import pystdlib_bytes

    imp = imported / "imp"
    before = _files(imp)
    code, out, err = _cli("inspect", imp, "--tokens", "1024", "--top", "64", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["data"] == "pystdlib", r["data"]
    assert (r["held_out"], r["shown"]) == (True, "tokenizer")
    assert r["tokenizer"] == str(imp / "tokenizer.json") and "tokenizer" in r["data_from"]
    # the ids inspected are the tokenizer's of pystdlib's held-out files: every token's count over the
    # experts (all of its assignments, --top 64 = the vocabulary) is k = 2 × its count in those ids
    tok = ins._tokenizer(imp)
    ids = tok.encode(pystdlib_bytes()[1].decode("utf-8", errors="replace")[:20000]).ids[:r["tokens"]]
    assert r["tokens"] == 1024 == len(ids)
    want = torch.bincount(torch.tensor(ids), minlength=64)
    for fig in r["layers"]:
        got = torch.zeros(64, dtype=torch.int64)
        for entry in fig["top_tokens"]:
            for x in entry["tokens"]:
                got[x["id"]] += x["count"]
                assert x["text"] == ins.tokenizer_piece(tok, x["id"]) and x["text"][0] in "'\""
        assert torch.equal(got, 2 * want)
    assert len(set(ids)) > 10  # real text, many pieces
    assert _files(imp) == before  # the import is left as it was
    # the tables: first what was read and through which tokenizer, then the pieces with their ids
    code, out, _ = _cli("inspect", imp, "--tokens", "1024", "--out", tmp_path / "o")
    lines = out.splitlines()
    assert code == 0 and lines[1].startswith("text: pystdlib, its held-out part")
    assert lines[2].startswith(f"tokenizer: {imp / 'tokenizer.json'}")
    top = r["layers"][0]["top_tokens"][0]["tokens"][0]
    assert f"{top['text']} #{top['id']} " in out


def test_the_same_import_without_a_tokenizer_keeps_synthetic_data_and_shows_ids(imported, tmp_path):
    code, out, err = _cli("inspect", imported / "bare", "--tokens", "1024", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["data"], r["shown"], r["tokenizer"]) == ("synthetic", "ids", None)
    assert all(x["text"] == str(x["id"]) for e in r["layers"][0]["top_tokens"] for x in e["tokens"])
    code, out, _ = _cli("inspect", imported / "bare", "--tokens", "1024", "--out", tmp_path / "o")
    assert out.splitlines()[1:3] == ["data: synthetic (the spec's train.data)",
                                     "tokenizer: none (tokens shown as ids: synthetic data is no text)"]


def test_data_synthetic_still_inspects_synthetic_data_on_a_model_with_a_tokenizer(imported, tmp_path):
    code, out, err = _cli("inspect", imported / "imp", "--data", "synthetic", "--tokens", "1024", "--out",
                          tmp_path / "o", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["data"], r["data_from"], r["shown"]) == ("synthetic", "--data", "tokenizer")


def test_text_given_itself_or_in_a_file_goes_through_the_tokenizer(imported, tmp_path):
    imp = imported / "imp"
    tok = ins._tokenizer(imp)
    line = "def the(self, x): return self.value + x"
    code, out, err = _cli("inspect", imp, "--text", line, "--top", "64", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    r = json.loads(out)
    ids = tok.encode(line).ids
    # shorter than a batch of the spec's 8 × 64: read whole as one sequence
    assert (r["data_from"], r["tokens"], r["batch"], r["seq"]) == ("--text", len(ids), 1, len(ids))
    seen = {x["id"]: x["text"] for e in r["layers"][0]["top_tokens"] for x in e["tokens"]}
    assert set(seen) == set(ids) and all(seen[i] == ins.tokenizer_piece(tok, i) for i in ids)
    assert tok.id_to_token(ids[-2]) == "▁+" and seen[ids[-2]] == "' +'"  # a word start keeps its space
    (tmp_path / "t.txt").write_text((line + "\n") * 40)
    code, out, err = _cli("inspect", imp, "--text", tmp_path / "t.txt", "--seq", "16", "--batch", "2", "--out",
                          tmp_path / "o", "--json")
    r = json.loads(out)
    n = len(tok.encode((line + "\n") * 40).ids)
    assert code == 0 and r["tokens"] == n // 32 * 32 and r["data"] == str(tmp_path / "t.txt")


def _entries(r: dict) -> list:
    """The token entries the tables show of the first layer: the token (a tokenizer's piece and its
    id; a byte; an id), its count, the share of its occurrences going to the expert."""
    ids = r.get("shown") == "tokenizer"
    return [f"{x['text']}{' #' + str(x['id']) if ids else ''} {x['count']} ({x['of_token']:.0%})"
            for e in r["layers"][0]["top_tokens"] for x in e["tokens"]]


def test_piped_tables_fit_80_columns_even_from_a_wide_terminal_and_wrap_between_entries(imported, tmp_path,
                                                                                         monkeypatch):
    import os

    monkeypatch.delenv("COLUMNS", raising=False)
    # stdout piped, a 200-column terminal on stdin (where rich looks for a width)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((200, 50)))
    code, out, err = _cli("inspect", imported / "imp", "--tokens", "1024", "--top", "12", "--out", tmp_path / "o")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    r = json.loads((tmp_path / "o" / "inspect.json").read_text())
    for entry in _entries(r):  # each on one line, whole
        assert any(entry in line for line in lines), entry


@pytest.mark.parametrize("width", [64, 100])
def test_token_lists_wrap_between_entries_in_a_narrow_or_wide_terminal(tiny_run, width):
    from rich.console import Console

    r = ins.inspect(tiny_run / "run", data="synthetic", tokens=256, top=12)
    buf = io.StringIO()
    ins.print_tables(r, Console(file=buf, width=width))
    lines = buf.getvalue().splitlines()
    for entry in _entries(r):
        assert any(entry in line for line in lines), entry
    assert max(len(line) for line in lines) <= width


def test_the_pngs_legends_cover_no_bar(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # the tallest bars at the right of both plots, where a legend in the upper right would sit
    layer = {"layer": "layers.2", "gate": "topk", "experts": 4, "dropped_share": 0.1,
             "load": [0.05, 0.05, 0.1, 0.8], "kept_load": [0.05, 0.05, 0.1, 0.8],
             "consecutive": {"first": {"rate": 0.9, "chance": 0.7, "uniform": 0.25},
                             "shared": {"k": 2, "rate": 0.97, "chance": 0.95, "uniform": 0.93}}}
    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **kw: (saved.append(self), real(self, *a, **kw))[1])
    ins.write_png({"layers": [layer, {**layer, "layer": "layers.4"}]}, tmp_path / "inspect.png")
    (fig,) = saved
    canvas = FigureCanvasAgg(fig)  # the figure as drawn for the file (write_png closed its own canvas)
    canvas.draw()
    renderer = canvas.get_renderer()
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches]
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]
    assert len(legends) == 4 and len(bars) == 2 * (8 + 6)
    for legend in legends:
        for bar in bars:
            cut = legend.intersection(legend, bar)
            assert cut is None or cut.width * cut.height == 0, (legend, bar)


def test_a_byte_level_run_on_text_inspects_its_held_out_text_as_quoted_bytes(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 80)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(_spec({"type": "topk", "k": 2})))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(spec), "--steps", "1", "--data", str(text), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    code, out, err = _cli("inspect", tmp_path / "run", "--tokens", "128", "--top", "40", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["data"], r["data_from"], r["shown"], r["tokenizer"]) == (str(text), "the run's data", "bytes", None)
    shown = {x["text"] for e in r["layers"][0]["top_tokens"] for x in e["tokens"]}
    assert {"'\\n'", "' '", "'x'"} <= shown
