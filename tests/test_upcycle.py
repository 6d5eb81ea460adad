"""``moedsl upcycle``: a dense model -> an MoE model whose logits equal the dense model's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import moedsl
from moedsl.cli import main
from moedsl.errors import UserError
from moedsl.hf.files import Checkpoint, write_sharded

DENSE = """moedsl: 1
name: tiny-dense
model: {vocab_size: 64, d_model: 16, max_seq_len: 32, dtype: float32}
layers:
  - embedding: {}
  - attention: {heads: 2}
  - ffn: {hidden: 32, activation: swiglu}
  - attention: {heads: 2}
  - ffn: {hidden: 32, activation: relu, bias: true}
  - attention: {heads: 2}
  - ffn: {hidden: 32, activation: gelu}
  - norm: {}
  - head: {}
train: {batch_size: 2, seq_len: 8, steps: 2, lr: 1.0e-3}
"""
FFN_LAYERS = [2, 4, 6]


def _dense(tmp_path: Path) -> Path:
    """An import folder of the tiny dense spec, its weights drawn with a seed (biases made non-zero
    so that their mapping is checked too) and a tokenizer.json beside it."""
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "spec.yaml").write_text(DENSE)
    torch.manual_seed(0)
    model = moedsl.build_model(moedsl.load_spec(DENSE))
    sd = {n: (t + 0.1 * torch.randn_like(t) if n.endswith("bias") else t).detach() for n, t in
          model.state_dict().items()}
    write_sharded(folder, [(n, tuple(t.shape), t.dtype, (lambda t=t: t.contiguous())) for n, t in sd.items()], 2**30)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def read_weights(folder: Path) -> dict:
    ck = Checkpoint(folder)
    return {name: ck.get(name) for name in ck.names}


def _logits(src) -> torch.Tensor:
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return moedsl.load_model(src, dtype=torch.float32)(ids).output


@pytest.mark.parametrize("g, k, extra", [(1, 2, {}), (2, 2, {}), (2, 4, {}), (1, 1, {"router": "zero"}),
                                         (2, 2, {"gate": "softmax"}), (2, 2, {"shared": True})])
def test_upcycled_logits_equal_the_dense_models(tmp_path, g, k, extra):
    dense = _dense(tmp_path)
    done = moedsl.upcycle(dense, tmp_path / "moe", 8, k, granularity=g, **extra)
    assert done["layers"] == FFN_LAYERS
    spec = moedsl.load_spec(tmp_path / "moe" / "spec.yaml")
    assert [layer.kind for layer in spec.layers if layer.index in FFN_LAYERS] == ["moe"] * 3
    assert all(layer.config.experts.hidden == 32 // g for layer in spec.moe_layers)
    want, got = _logits(dense), _logits(tmp_path / "moe")
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("g", [1, 2])
def test_in_bfloat16_the_upcycled_model_is_as_close_to_the_dense_one_as_bfloat16_rounding_allows(tmp_path, g):
    """Under bfloat16 autocast the copies' outputs are rounded before the gate weights (which sum to 1)
    combine them, so equality holds only to rounding: the upcycled model's logits must lie as close to
    the dense model's (both bfloat16) as the dense model's own bfloat16 logits lie to its float32 ones."""
    dense = _dense(tmp_path)
    moedsl.upcycle(dense, tmp_path / "moe", 8, 2, granularity=g)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))

    def logits(src, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return moedsl.load_model(src, dtype=torch.float32)(ids).output.float()

    rounding = (logits(dense, True) - logits(dense, False)).abs().max().item()
    gap = (logits(tmp_path / "moe", True) - logits(dense, True)).abs().max().item()
    assert 0 < rounding < 0.1
    assert gap <= 2 * rounding, (gap, rounding)


def test_granular_experts_hold_each_shard_and_their_router_rows_repeat_per_group(tmp_path):
    moedsl.upcycle(_dense(tmp_path), tmp_path / "moe", 4, 2, granularity=2)
    w = read_weights(tmp_path / "moe")
    dense = read_weights(tmp_path / "dense")
    w_in = dense["layers.4.ffn.w_in.weight"].t()  # relu: w_in and w_out scaled by sqrt(2)
    for j in range(4):
        s = j % 2
        assert torch.allclose(w["layers.4.experts.w_in"][j], w_in[:, 16 * s:16 * (s + 1)] * 2 ** 0.5)
    router = w["layers.4.gate.weight"]
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    assert not torch.equal(router[1], router[2])


def test_every_other_upcycles_the_second_ffn_only_and_keeps_the_others(tmp_path):
    dense = _dense(tmp_path)
    done = moedsl.upcycle(dense, tmp_path / "moe", 4, 2, layers="every-other")
    assert done["layers"] == [4]
    spec = moedsl.load_spec(tmp_path / "moe" / "spec.yaml")
    assert [(layer.index, layer.kind) for layer in spec.layers if layer.index in FFN_LAYERS] == \
        [(2, "ffn"), (4, "moe"), (6, "ffn")]
    assert (_logits(tmp_path / "moe") - _logits(dense)).abs().max().item() < 1e-5


def test_the_written_folder_runs_with_init_and_keeps_the_tokenizer(tmp_path, capsys):
    dense = _dense(tmp_path)
    rc = main(["upcycle", str(dense), "--experts", "4", "--k", "2", "--granularity", "2", "--out",
               str(tmp_path / "moe")])
    assert rc == 0, capsys.readouterr().err
    moe = tmp_path / "moe"
    assert (moe / "tokenizer.json").read_text() == "{}"
    header = (moe / "spec.yaml").read_text().splitlines()[0]
    assert header.startswith(f"# Upcycled by `moedsl upcycle` from {dense}") and "--granularity 2" in header
    rc = main(["run", str(moe / "spec.yaml"), "--init", str(moe), "--out", str(tmp_path / "run"), "--steps", "1",
               "--batch", "2", "--seq", "8", "--eval-batches", "1", "--no-progress", "--ignore-memory-check"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip()


def test_a_run_folder_and_a_spec_with_its_checkpoint_upcycle_too(tmp_path, capsys):
    spec = tmp_path / "dense.yaml"
    spec.write_text(DENSE)
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress",
                 "--eval-batches", "1", "--ignore-memory-check"]) == 0, capsys.readouterr().err
    moedsl.upcycle(tmp_path / "run", tmp_path / "moe", 4, 2, granularity=2)
    assert (_logits(tmp_path / "moe") - _logits(tmp_path / "run")).abs().max().item() < 1e-5
    moedsl.upcycle(spec, tmp_path / "moe-of-spec", 4, 2, checkpoint=tmp_path / "run")  # a spec with --checkpoint
    assert (_logits(tmp_path / "moe-of-spec") - _logits(tmp_path / "run")).abs().max().item() < 1e-5


def _changed_units(a: torch.Tensor, b: torch.Tensor) -> list:
    """Per expert, the hidden units (columns of w_in [E, d, h]) that differ."""
    return [set(torch.nonzero((a[e] != b[e]).any(0)).flatten().tolist()) for e in range(a.shape[0])]


def test_noise_redraws_the_given_fraction_of_each_experts_hidden_units_a_different_set_each(tmp_path):
    dense = _dense(tmp_path)
    moedsl.upcycle(dense, tmp_path / "plain", 4, 2)
    moedsl.upcycle(dense, tmp_path / "noisy", 4, 2, noise=0.25)
    plain, noisy = read_weights(tmp_path / "plain"), read_weights(tmp_path / "noisy")
    for layer in FFN_LAYERS:
        units = _changed_units(noisy[f"layers.{layer}.experts.w_in"], plain[f"layers.{layer}.experts.w_in"])
        assert [len(u) for u in units] == [8] * 4  # 0.25 of 32 hidden units
        assert len({frozenset(u) for u in units}) == 4
        rows = _changed_units(noisy[f"layers.{layer}.experts.w_out"].transpose(1, 2),
                              plain[f"layers.{layer}.experts.w_out"].transpose(1, 2))
        assert rows == units  # w_out's rows of the same units
        if layer == 2:  # swiglu: w_gate's columns of the same units
            assert _changed_units(noisy["layers.2.experts.w_gate"], plain["layers.2.experts.w_gate"]) == units
    assert torch.equal(noisy["layers.1.attention.wq.weight"], plain["layers.1.attention.wq.weight"])


def test_router_zero_writes_a_zero_router_and_normal_one_drawn_with_init_std(tmp_path):
    dense = _dense(tmp_path)
    moedsl.upcycle(dense, tmp_path / "zero", 4, 2, router="zero")
    moedsl.upcycle(dense, tmp_path / "normal", 4, 2)
    assert not read_weights(tmp_path / "zero")["layers.2.gate.weight"].any()
    std = read_weights(tmp_path / "normal")["layers.2.gate.weight"].std().item()
    assert 0.01 < std < 0.04  # model.init_std 0.02


@pytest.mark.parametrize("kwargs, needle", [
    ({"experts": 5, "k": 2, "granularity": 2}, "--experts 5 is not a multiple of --granularity 2"),
    ({"experts": 4, "k": 1, "granularity": 2}, "--k 1 is not a multiple of --granularity 2"),
    ({"experts": 4, "k": 2, "granularity": 2, "router": "zero"}, "--router zero with --granularity 2"),
    ({"experts": 4, "k": 1, "gate": "switch"}, "--gate switch: the upcycled output would not equal"),
    ({"experts": 6, "k": 3, "granularity": 3}, "ffn hidden 32 is not a multiple of --granularity 3"),
])
def test_options_that_break_the_equality_are_refused_in_one_line(tmp_path, kwargs, needle):
    dense = _dense(tmp_path)
    with pytest.raises(UserError) as e:
        moedsl.upcycle(dense, tmp_path / "moe", **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "moe").exists()


def test_a_source_with_moe_layers_already_is_refused(tmp_path):
    moedsl.upcycle(_dense(tmp_path), tmp_path / "moe", 4, 2)
    with pytest.raises(UserError, match="layer 2 is already moe: upcycling starts from a dense model"):
        moedsl.upcycle(tmp_path / "moe", tmp_path / "again", 4, 2)


def test_an_out_inside_the_source_is_refused_before_anything_is_written(tmp_path, capsys):
    dense = _dense(tmp_path)
    rc = main(["upcycle", str(dense), "--experts", "4", "--k", "2", "--out", str(dense / "moe")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--out {dense / 'moe'} lies inside the source {dense}" in err and len(err.strip().splitlines()) == 1
    assert not (dense / "moe").exists()


def test_a_hugging_face_dense_folder_is_imported_then_upcycled_in_one_call(tmp_path):
    """A dense Llama checkpoint is imported into a temporary folder, then upcycled (G = 2): the
    logits equal transformers' own Llama's."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    moedsl.upcycle(tmp_path / "hf", tmp_path / "moe", 4, 2, granularity=2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = moedsl.load_model(tmp_path / "moe", dtype=torch.float32)(ids).output
    assert (got - want).abs().max().item() < 1e-5


def test_an_upcycled_byte_level_run_reads_text_as_bytes_with_init(tmp_path, capsys):
    """An upcycled folder is moedsl's own (no hf_config.json): its vocabulary is the dense run's, here
    bytes, so `run --init` of it on a text file reads bytes and says so, where a Hugging Face
    import without a tokenizer.json is refused (tests/test_token_data.py)."""
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    spec = tmp_path / "dense.yaml"
    spec.write_text(yaml.safe_dump({"moedsl": 1, "name": "tiny-dense", "model": {"vocab_size": 256, "d_model": 16,
                                                                                 "max_seq_len": 32},
                                    "layers": [{"embedding": {}}, {"attention": {"heads": 2}},
                                               {"ffn": {"hidden": 32, "activation": "swiglu"}}, {"norm": {}},
                                               {"head": {}}]}))
    run = tmp_path / "run"
    common = ["--data", str(text), "--steps", "1", "--batch", "2", "--seq", "8", "--eval-batches", "1",
              "--no-progress", "--ignore-memory-check"]
    assert main(["run", str(spec), *common, "--out", str(run)]) == 0
    assert main(["upcycle", str(run), "--experts", "4", "--k", "2", "--out", str(tmp_path / "up")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "up" / "spec.yaml"), "--init", str(tmp_path / "up"), *common, "--out",
                 str(tmp_path / "run-up")]) == 0
    assert "text as UTF-8 bytes" in " ".join(capsys.readouterr().out.split())
