"""``--pack documents``: a row packing several documents computes, for each of them, what the
document computes alone as its own row: attention stays inside a document (causal, and within a
sliding window where the layer has one), positions restart at each document's start (rotary
angles, learned position embeddings), for every attention kind; an LSTM's state starts afresh at
each document. The MoE layers here route with
top-k and no capacity (dropless): a token's expert outputs depend on that token alone, as in a
dense FFN; a capacity would couple the tokens of a routing group, packed or not."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedsl.runtime.train as train_mod
from moedsl import load_spec
from moedsl.build import build_model
from moedsl.cli import main
from moedsl.nn import documents as D
from moedsl.runtime.data import Batch, Synthetic
from moedsl.runtime.step import task_loss
from moedsl.runtime.train import RunOptions, Trainer

V = 64
SPECS = Path(__file__).resolve().parents[1] / "specs"

MOE = """  - moe:
      experts: {count: 4, hidden: 16, activation: swiglu}
      gate: {type: topk, k: 2, drop_policy: dropless}"""

STACKS = {
    "rotary attention, top-k dropless MoE": f"""  - embedding: {{}}
  - attention: {{heads: 4, kv_heads: 2, positions: rotary}}
{MOE}
  - attention: {{heads: 2, positions: rotary, qk_norm: head}}
  - ffn: {{hidden: 24}}""",
    "latent attention, top-k dropless MoE": f"""  - embedding: {{}}
  - latent_attention: {{heads: 2, kv_lora_rank: 8, q_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4,
                        v_head_dim: 6}}
{MOE}""",
    "learned positions, attention without rotation": """  - embedding: {positions: learned}
  - attention: {heads: 2, positions: none}
  - ffn: {hidden: 24}""",
    "sliding window of 3 keys": f"""  - embedding: {{}}
  - attention: {{heads: 2, kv_heads: 1, positions: rotary, sliding_window: 3}}
{MOE}
  - attention: {{heads: 2, positions: rotary, sliding_window: 5}}""",
    "attention that is not causal": """  - embedding: {}
  - attention: {heads: 2, positions: rotary, causal: false}
  - ffn: {hidden: 24}""",
    "two-layer lstm": """  - embedding: {}
  - lstm: {layers: 2}
  - ffn: {hidden: 24}""",
}


@functools.lru_cache(maxsize=None)
def model_of(stack: str):
    spec = load_spec(f"""moedsl: 1
name: packed
model: {{vocab_size: {V}, d_model: 32, max_seq_len: 64, norm: rmsnorm}}
layers:
{STACKS[stack]}
  - norm: {{}}
  - head: {{}}
""")
    return build_model(spec, seed=3).eval()


def documents_of(lengths: list) -> torch.Tensor:
    """[1, sum(lengths)]: each token's document, numbered from 0."""
    return torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(lengths)])[None]


def alone(model, tokens: torch.Tensor, lengths: list) -> torch.Tensor:
    """The logits of each document of the row ``tokens`` [1, T], run as its own row, side by side."""
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    return torch.cat([model(tokens[:, a:b]).output for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_packed_row_gives_each_document_the_logits_it_gets_alone(stack):
    model = model_of(stack)
    lengths = [7, 1, 9, 4]  # a one-token document sees only itself
    tokens = torch.randint(0, V, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(tokens, documents_of(lengths)).output
        each = alone(model, tokens, lengths)
        whole = model(tokens).output
    torch.testing.assert_close(packed, each, rtol=0, atol=1e-5)
    assert (packed - whole).abs().max() > 1e-3  # the documents did see each other unpacked


def test_rows_of_a_batch_keep_their_own_documents():
    model = model_of("rotary attention, top-k dropless MoE")
    splits = [[5, 11], [3, 3, 3, 7]]
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    documents = torch.cat([documents_of(s) for s in splits])
    with torch.no_grad():
        packed = model(tokens, documents).output
        for row, lengths in enumerate(splits):
            torch.testing.assert_close(packed[row:row + 1], alone(model, tokens[row:row + 1], lengths),
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("stack", ["rotary attention, top-k dropless MoE", "two-layer lstm"])
def test_a_packed_row_gives_each_document_the_gradients_it_gives_alone(stack):
    model = model_of(stack).train()
    try:
        lengths = [6, 2, 8]
        tokens = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
        weights = torch.randn(1, 16, V, generator=torch.Generator().manual_seed(3))

        def grads(logits):
            model.zero_grad(set_to_none=True)
            (logits * weights).sum().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        packed = grads(model(tokens, documents_of(lengths)).output)
        each = grads(alone(model, tokens, lengths))
        assert packed.keys() == each.keys()
        for name in packed:
            torch.testing.assert_close(packed[name], each[name], rtol=0, atol=1e-5, msg=name)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_without_documents_the_model_runs_the_causal_path_it_ran_before(monkeypatch):
    model = model_of("rotary attention, top-k dropless MoE")
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(tokens).output
        one_document = model(tokens, torch.zeros(2, 12, dtype=torch.int64)).output

        def never(*args, **kwargs):
            raise AssertionError("documents None reached the documents' attention")

        monkeypatch.setattr("moedsl.nn.attention.attend_in_documents", never)
        assert torch.equal(model(tokens, None).output, before)
        assert torch.equal(model(tokens, documents=None).output, before)
    torch.testing.assert_close(one_document, before, rtol=0, atol=1e-5)  # one document a row: the causal mask


def test_decode_graphs_have_no_documents_input():
    from moedsl.compiler.lower import lower

    spec = model_of("rotary attention, top-k dropless MoE").spec
    placeholders = lambda g: [n.name for n in g.nodes if n.op == "placeholder"]  # noqa: E731
    assert placeholders(lower(spec, graph_only=True).graph) == ["tokens", "documents"]
    assert "documents" not in placeholders(lower(spec, graph_only=True, decode=True).graph)


def test_the_mask_and_positions_are_made_once_for_every_layer():
    gm = model_of("rotary attention, top-k dropless MoE")
    fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fns.count(D.document_mask) == 1 and fns.count(D.document_positions) == 1


def test_positions_restart_at_each_document_and_the_mask_keeps_each_query_in_its_own():
    documents = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert D.document_positions(documents).tolist() == [[0, 1, 0, 1, 2, 0], list(range(6))]
    mask = D.document_mask(documents)[:, 0]  # [B, T, T]
    assert mask[0, 4].tolist() == [False, False, True, True, True, False]
    assert torch.equal(mask[1], torch.ones(6, 6, dtype=torch.bool).tril())
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # every query sees itself: no empty softmax row


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(0, 2**31 - 1),
       st.sampled_from(["rotary attention, top-k dropless MoE", "sliding window of 3 keys", "two-layer lstm"]))
def test_any_split_of_a_row_into_documents_gives_each_its_logits_alone(lengths, seed, stack):
    model = model_of(stack)
    tokens = torch.randint(0, V, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        packed = model(tokens, documents_of(lengths)).output
        each = alone(model, tokens, lengths)
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed, each, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stack", ["rotary attention, top-k dropless MoE", "latent attention, top-k dropless MoE",
                                   "sliding window of 3 keys", "attention that is not causal"])
def test_flex_attention_and_the_boolean_mask_give_the_same_logits(monkeypatch, stack):
    """Forward only on a CPU: torch's flex_attention has no backward there (the gradients are
    compared on CUDA below)."""
    model = model_of(stack)
    tokens = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(5))
    documents = torch.cat([documents_of([4, 15]), documents_of([1, 6, 6, 6])])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention: "called without torch.compile()"
        monkeypatch.setattr(D, "FLEX", False)
        dense = model(tokens, documents).output
        monkeypatch.setattr(D, "FLEX", True)
        mask = D.document_mask(documents)
        assert isinstance(mask, D.BlockMask)
        flex = model(tokens, documents).output
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_attention_dropout_under_flex_takes_the_boolean_mask_of_the_same_documents(monkeypatch):
    """FlexAttention has no dropout: a training layer with attention dropout gets the boolean mask
    made from the step's BlockMask, the same as the boolean path's (the same dropout draws follow)."""
    spec = load_spec(f"""moedsl: 1
name: dropout
model: {{vocab_size: {V}, d_model: 32, max_seq_len: 64}}
layers:
  - embedding: {{}}
  - attention: {{heads: 2, positions: rotary, dropout: 0.2, sliding_window: 4}}
  - attention: {{heads: 2, positions: rotary, dropout: 0.2, causal: false}}
  - head: {{}}
""")
    model = build_model(spec, seed=3).train()
    tokens = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(8))
    documents = torch.cat([documents_of([6, 7]), documents_of([2, 2, 9])])
    outs = []
    for flex in (False, True):
        monkeypatch.setattr(D, "FLEX", flex)
        torch.manual_seed(0)
        outs.append(model(tokens, documents).output)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward runs on CUDA only")
def test_flex_attention_and_the_boolean_mask_give_the_same_gradients(monkeypatch):
    model = model_of("sliding window of 3 keys")
    cuda = build_model(model.spec, seed=3, device="cuda")
    tokens = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(6)).cuda()
    documents = torch.cat([documents_of([4, 15]), documents_of([1, 6, 6, 6])]).cuda()
    grads = []
    for flex in (False, True):
        monkeypatch.setattr(D, "FLEX", flex)
        cuda.zero_grad(set_to_none=True)
        cuda(tokens, documents).output.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in cuda.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_dense_segments_keep_to_documents_as_eager_ones_do():
    """torch.compile of the dense segments (runtime/compile.py) traces the mask and positions nodes too."""
    from moedsl.runtime.compile import compile_model

    spec = model_of("sliding window of 3 keys").spec
    eager, compiled = build_model(spec, seed=3).train(), build_model(spec, seed=3).train()
    state = compile_model(compiled, "on")
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(7))
    documents = torch.cat([documents_of([5, 11]), documents_of([3, 3, 3, 7])])
    outs = [m(tokens, documents).output for m in (eager, compiled)]
    assert state.failed is None and state.compiled == set(range(state.segments))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for out in outs:
        out.square().mean().backward()
    mine = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)


class _Packed(Synthetic):
    """Synthetic rows with documents: each row cut into documents at fixed places."""

    name = "packed-synthetic"

    def rows(self, step, rows, seq, split):
        b = super().rows(step, rows, seq, split)
        cuts = [seq // 3, seq // 3 + 1, seq - 2]
        b.documents = torch.bucketize(torch.arange(seq), torch.tensor(cuts), right=True).expand(len(rows), seq)
        return b


def test_a_packed_run_passes_each_batchs_documents_to_the_model(monkeypatch, tmp_path):
    spec = model_of("rotary attention, top-k dropless MoE").spec
    monkeypatch.setattr(train_mod, "make_source", lambda spec, data, seed, **kw: _Packed(V, seed))
    o = RunOptions.from_spec(spec, steps=1, batch=2, seq=12, out=tmp_path, progress=False, pack="documents",
                             compile="off", eval_batches=1)
    trainer = Trainer(spec, o)
    batch = trainer.source.batch(0, 2, 12)
    with torch.no_grad():
        want = task_loss(spec, trainer.model(batch.inputs, batch.documents), batch.targets)
        unpacked = task_loss(spec, trainer.model(batch.inputs), batch.targets)
    got = trainer.step(batch, 1e-3).loss
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert abs(float(got) - float(unpacked)) > 1e-4
    held = trainer.source.batch(0, 2, 12, split="eval")
    with torch.no_grad():
        want_eval = float(task_loss(spec, trainer.model.eval()(held.inputs, held.documents), held.targets))
    assert trainer.evaluate() == pytest.approx(want_eval, abs=1e-6)


def test_moedsl_eval_of_a_packed_run_packs_as_the_run_did(monkeypatch, tmp_path):
    """The run's own held-out loss again: its checkpoint records the packing (meta.json "eval")."""
    import moedsl
    import moedsl.runtime.evaluate as evaluate_mod

    spec = model_of("rotary attention, top-k dropless MoE").spec
    fake = lambda spec, data, seed, **kw: _Packed(V, seed)  # noqa: E731 - stands for a prepared folder's source
    monkeypatch.setattr(train_mod, "make_source", fake)
    monkeypatch.setattr(evaluate_mod, "make_source", fake)
    monkeypatch.setattr(evaluate_mod, "pack_problems", lambda *a, **k: [])  # "synthetic" names the fake
    o = RunOptions.from_spec(spec, steps=2, batch=2, seq=12, out=tmp_path / "run", progress=False,
                             pack="documents", compile="off", eval_every=2, eval_batches=2)
    summary = Trainer(spec, o).fit()
    again = moedsl.evaluate(str(tmp_path / "run"))
    assert again["loss"] == pytest.approx(summary.eval_loss, abs=1e-6)
    assert abs(moedsl.evaluate(str(tmp_path / "run"), pack="none")["loss"] - summary.eval_loss) > 1e-4


def test_a_packed_run_over_batches_without_documents_stops_in_one_line(monkeypatch, tmp_path):
    spec = model_of("rotary attention, top-k dropless MoE").spec
    o = RunOptions.from_spec(spec, steps=1, batch=2, seq=12, out=tmp_path, progress=False, pack="documents",
                             compile="off")
    trainer = Trainer(spec, o)  # synthetic: no documents (the CLI refuses it before building the model)
    with pytest.raises(train_mod.MoedslError, match="^--pack documents: the batches of --data synthetic carry no"):
        trainer.step(trainer.source.batch(0, 2, 12), 1e-3)


def refused(capsys, *argv) -> list:
    assert main(["run", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_packing_data_without_document_boundaries_is_refused_in_one_line(tmp_path, capsys):
    lines = refused(capsys, SPECS / "mixtral.yaml", "--pack", "documents", "--data", "synthetic", "--steps", "1",
                    "--out", tmp_path / "run")
    assert lines == ["moedsl: error: --pack documents: --data synthetic has no document boundaries (a folder from "
                     "`moedsl data prepare` has them)"]
    text = tmp_path / "notes.txt"
    text.write_bytes(b"some text to read as bytes\n" * 100)
    lines = refused(capsys, SPECS / "mixtral.yaml", "--pack", "documents", "--data", text, "--steps", "1",
                    "--out", tmp_path / "run")
    assert len(lines) == 1 and "is read as bytes, one stream with no document boundaries" in lines[0]
    lines = refused(capsys, SPECS / "mixtral.yaml", "--pack", "documents", "--data", "pystdlib", "--steps", "1",
                    "--out", tmp_path / "run")
    assert lines == ["moedsl: error: --pack documents: --data 'pystdlib' is read as bytes, one stream with no "
                     "document boundaries (a folder from `moedsl data prepare` has them)"]
    assert not (tmp_path / "run").exists()


def test_the_spec_can_ask_for_packing_and_names_itself_when_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text((SPECS / "mixtral.yaml").read_text().replace("lr: 3.0e-3}", "lr: 3.0e-3, pack: documents}"))
    assert load_spec(str(spec)).train.pack == "documents"
    lines = refused(capsys, spec, "--steps", "1", "--out", tmp_path / "run")
    assert lines == ["moedsl: error: train.pack documents: --data synthetic has no document boundaries (a folder "
                     "from `moedsl data prepare` has them)"]


def test_an_lstm_starts_each_document_of_a_packed_row_from_the_zero_state():
    spec = load_spec(str(SPECS / "shazeer-lstm-moe.yaml"))  # LSTM, noisy top-k MoE (no capacity), LSTM
    model = build_model(spec, seed=1).eval()  # no routing noise outside training
    lengths = [5, 1, 12, 6]
    tokens = torch.randint(0, spec.model.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        packed = model(tokens, documents_of(lengths)).output
        torch.testing.assert_close(packed, alone(model, tokens, lengths), rtol=0, atol=1e-5)
        assert (packed - model(tokens).output).abs().max() > 1e-3
