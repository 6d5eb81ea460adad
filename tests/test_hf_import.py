"""moedsl import / export / load_model / run --init against transformers' Mixtral (tiny, fp32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl  # noqa: E402
from moedsl.cli import main  # noqa: E402
from moedsl.hf import registered  # noqa: E402
from moedsl.hf.reference import tiny_reference  # noqa: E402
from hf_helpers import close as _close, refused as _refused  # noqa: E402
from hf_helpers import family_cases, run_init_on_one_and_two_processes, save_fused  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)  # Mixtral


def _hf(tmp: Path, name="hf", max_shard_size=None, **over) -> tuple:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**{**TINY, **over})
    model = transformers.MixtralForCausalLM(cfg).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp / name, **kw)
    return tmp / name, model


def _family_hf(tmp: Path, model_type: str, name="hf", **over) -> tuple:
    """A family's tiny_config (with ``over``) built by transformers and saved: (folder, model)."""
    fam = registered()[model_type]
    torch.manual_seed(0)
    cfg = getattr(transformers, fam.config_class)(**{**fam.tiny_config, **over})
    model = getattr(transformers, fam.architectures[0])(cfg).eval()
    model.save_pretrained(tmp / name)
    return tmp / name, model


def _tokens():  # for the Mixtral of TINY
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def _import(src, out, *extra) -> int:
    return main(["import", str(src), "--out", str(out), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("model_type,over", family_cases(encoder_decoder=False))  # test_hf_encdec.py: the others
def test_every_family_imports_to_transformers_logits_and_exports_back(tmp_path, model_type, over):
    """Each registered family's ``tiny_config`` (and its variants), built by transformers, through
    import, load_model and export: the same logits (over 16 positions: longer than the tiny sliding
    windows), and transformers loads the export with no missing or unexpected keys."""
    fam = registered()[model_type]
    ref, cfg = tiny_reference(transformers, model_type, over)
    ref.save_pretrained(tmp_path / "hf")
    assert _import(tmp_path / "hf", tmp_path / "imp") == 0
    spec_text = (tmp_path / "imp" / "spec.yaml").read_text()
    assert f"d_model: {cfg.hidden_size}  # hidden_size" in spec_text
    model = moedsl.load_model(tmp_path / "imp")
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(model(x).output, ref(x).logits)
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(back).__name__ == fam.architectures[0]
    with torch.no_grad():
        _close(back.eval()(x).logits, ref(x).logits)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["bos_token_id"] == cfg.bos_token_id


def test_readme_lists_every_family():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for model_type in registered():
        assert f"(`{model_type}`) |" in readme, model_type


def test_sharded_checkpoint_imports_and_exports_sharded(tmp_path):
    src, ref = _hf(tmp_path, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert _import(src, tmp_path / "imp") == 0
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp"), "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "exp" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _tokens()
    with torch.no_grad():
        _close(back.eval()(x).logits, ref(x).logits)


def test_tied_embeddings_import_without_a_head_and_export_tied(tmp_path):
    src, ref = _hf(tmp_path, tie_word_embeddings=True)
    assert _import(src, tmp_path / "imp") == 0
    assert "tie_embeddings: true" in (tmp_path / "imp" / "spec.yaml").read_text()
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_fused_gate_up_layout_imports_like_per_expert(tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj / down_proj) written to disk as is."""
    src, ref = _hf(tmp_path)
    assert _import(save_fused(src, ref, tmp_path / "fused"), tmp_path / "imp") == 0
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)


def test_model_id_resolves_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    src, ref = _hf(tmp_path)
    snap = tmp_path / "cache" / "models--acme--tiny-mixtral" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    src.rename(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert _import("acme/tiny-mixtral", tmp_path / "imp") == 0
    assert "name: acme-tiny-mixtral" in (tmp_path / "imp" / "spec.yaml").read_text()


def test_missing_shard_named_in_the_index_is_refused(tmp_path, capsys):
    src, _ = _hf(tmp_path, max_shard_size="20KB")
    gone = sorted(src.glob("model-*.safetensors"))[1]
    gone.unlink()
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", gone.name, "missing")


def test_truncated_safetensors_is_refused(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", "truncated")


def test_config_that_disagrees_with_the_tensors_names_tensor_and_shapes(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o",
             "experts.0.w1.weight", "[4, 32, 48]", "[4, 32, 64]", "experts.hidden = 64, from intermediate_size")


def test_unknown_model_type_lists_the_supported(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama4"
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", "'llama4'", "mixtral")


@pytest.mark.parametrize("field,value", [("rope_scaling", {"type": "linear", "factor": 2.0}),
                                         ("router_jitter_noise", 0.1), ("hidden_act", "gelu_pytorch_tanh")])
def test_config_field_not_yet_expressible_is_refused_by_name(tmp_path, capsys, field, value):
    src, _ = _hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", field)


@pytest.mark.parametrize("model_type,field,value,needle", [
    ("qwen2_moe", "layer_types", ["sliding_attention", "full_attention"], "use_sliding_window is False"),
    ("qwen2_moe", "layer_types", ["full_attention"], "2 (num_hidden_layers)"),
    ("qwen3_moe", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "'yarn'"),
    ("qwen3_moe", "layer_types", ["full_attention", "full_attention"], "Qwen3MoeConfig"),
    ("olmoe", "head_dim", 16, "hidden_size / num_attention_heads = 8"),
    ("olmoe", "sliding_window", 4, "OlmoeConfig"),
    ("llama", "mlp_bias", True, "moedsl's imported MLPs have no bias"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "'llama3'"),
    ("mistral", "sliding_window", 0, "null or a positive number of keys"),
    ("qwen2", "layer_types", ["sliding_attention", "full_attention"], "use_sliding_window is False"),
    ("qwen3", "layer_types", ["full_attention"], "2 (num_hidden_layers)"),
])
def test_config_variant_a_family_cannot_express_is_refused_by_name(tmp_path, capsys, model_type, field, value,
                                                                    needle):
    src, _ = _family_hf(tmp_path, model_type)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    err = _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", field, needle)
    assert model_type in err


@pytest.mark.parametrize("model_type,max_window_layers,types", [
    ("qwen2_moe", 3, ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    ("qwen2", 2, ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]),
    ("qwen3", 2, ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]),
])
def test_qwen_config_without_layer_types_slides_the_layers_transformers_derives(tmp_path, model_type,
                                                                                max_window_layers, types):
    """Older Qwen config.json files have no layer_types: with use_sliding_window,
    Qwen2MoeConfig.__post_init__ makes the even layers below max_window_layers sliding, Qwen2Config
    and Qwen3Config the layers from max_window_layers on."""
    src, ref = _family_hf(tmp_path, model_type, num_hidden_layers=4, use_sliding_window=True, sliding_window=3,
                          max_window_layers=max_window_layers)
    assert ref.config.layer_types == types
    cfg = json.loads((src / "config.json").read_text())
    del cfg["layer_types"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert _import(src, tmp_path / "imp") == 0
    windows = [L.config.sliding_window for L in moedsl.load_spec(tmp_path / "imp" / "spec.yaml").layers
               if L.kind == "attention"]
    assert windows == [3 if t == "sliding_attention" else None for t in types]
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)


@pytest.mark.parametrize("model_type,recorded,needle", [
    ("mixtral", "llama", "(a sparse layer: llama's MLPs are dense)"),
    ("qwen2", "mistral", "qkv_bias true"),
    ("llama", "qwen2", "qkv_bias false (Qwen2's q_proj, k_proj, v_proj always have a bias)"),
    ("qwen3", "llama", "qk_norm 'head'"),
])
def test_import_exported_as_a_dense_family_it_is_not_is_refused_naming_the_feature(tmp_path, capsys, model_type,
                                                                                   recorded, needle):
    src, _ = _family_hf(tmp_path, model_type)
    assert _import(src, tmp_path / "imp") == 0
    rec = json.loads((tmp_path / "imp" / "hf_config.json").read_text())
    rec["model_type"] = recorded
    (tmp_path / "imp" / "hf_config.json").write_text(json.dumps(rec))
    capsys.readouterr()
    _refused(capsys, ["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")], tmp_path / "exp",
             needle, f"no Hugging Face {recorded} equivalent")


@pytest.mark.slow
@pytest.mark.parametrize("attention,architecture", [
    ({}, "LlamaForCausalLM"),
    ({"sliding_window": 4}, "MistralForCausalLM"),
    ({"qkv_bias": True}, "Qwen2ForCausalLM"),
    ({"qk_norm": "head"}, "Qwen3ForCausalLM"),
])
def test_hand_written_dense_spec_trains_and_exports_as_the_dense_family_of_its_attention(tmp_path, attention,
                                                                                        architecture):
    """A dense rotary stack with SwiGLU MLPs written by hand (no family recorded): the export is
    the dense family whose attention it has, which transformers loads to the same logits."""
    spec = {"moedsl": 1, "name": "dense-swiglu",
            "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 32, "norm": "rmsnorm"},
            "layers": [{"embedding": {}},
                       {"repeat": 2, "block": [
                           {"attention": {"heads": 4, "kv_heads": 2, "positions": "rotary", **attention}},
                           {"ffn": {"hidden": 48, "activation": "swiglu"}}]},
                       {"norm": {}}, {"head": {}}],
            "train": {"steps": 1, "lr": 1e-3}}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    _trains_and_exports_as(tmp_path / "spec.yaml", tmp_path, architecture)


def test_spec_of_one_family_is_refused_as_another_naming_the_feature(tmp_path, capsys):
    """A Qwen3-MoE import (q/k norm per head) exported with the recorded model_type changed to olmoe."""
    src, _ = _family_hf(tmp_path, "qwen3_moe")
    assert _import(src, tmp_path / "imp") == 0
    rec = json.loads((tmp_path / "imp" / "hf_config.json").read_text())
    rec["model_type"] = "olmoe"
    (tmp_path / "imp" / "hf_config.json").write_text(json.dumps(rec))
    capsys.readouterr()
    _refused(capsys, ["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")], tmp_path / "exp",
             "qk_norm head", "no Hugging Face olmoe equivalent")


def test_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _import(src, out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert _import(src, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "spec.yaml").exists()


def _upcycled(tmp_path) -> Path:
    src, _ = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    spec = tmp_path / "imp" / "spec.yaml"
    spec.write_text(spec.read_text().replace("count: 4  #", "count: 8  #"))
    return tmp_path / "imp"


def test_edited_expert_count_is_refused_by_load_model_naming_tensor_field_and_shapes(tmp_path):
    imp = _upcycled(tmp_path)
    with pytest.raises(moedsl.errors.UserError) as e:
        moedsl.load_model(imp)
    text = str(e.value)
    assert "layers.2.gate.weight" in text and "[4, 32]" in text and "[8, 32]" in text
    assert "moe.experts.count = 8" in text and "spec.yaml:" in text


def test_edited_expert_count_is_refused_by_run_init(tmp_path, capsys):
    imp = _upcycled(tmp_path)
    rc = main(["run", str(imp / "spec.yaml"), "--init", str(imp), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--init" in err and "moe.experts.count = 8" in err and "[8, 32]" in err


def test_init_and_resume_together_are_refused(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    rc = main(["run", str(tmp_path / "imp" / "spec.yaml"), "--init", str(tmp_path / "imp"), "--resume",
               "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    assert rc == 2
    assert "--init and --resume" in capsys.readouterr().err


def test_an_imports_spec_without_init_is_refused_unless_from_scratch_says_random_weights_on_purpose(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    imp = tmp_path / "imp"
    assert _import(src, imp) == 0
    capsys.readouterr()
    run = ["run", str(imp / "spec.yaml"), "--steps", "1", "--batch", "2", "--seq", "8", "--eval-batches", "1",
           "--no-progress", "--ignore-memory-check"]
    assert main([*run, "--out", str(tmp_path / "forgot")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert f"import folder {imp}" in lines[0] and f"--init {imp}" in lines[0] and "--from-scratch" in lines[0]
    assert not (tmp_path / "forgot").exists()  # refused before anything was written
    assert main([*run, "--out", str(tmp_path / "both"), "--init", str(imp), "--from-scratch"]) == 2
    assert "--init and --from-scratch: choose one" in capsys.readouterr().err
    assert main([*run, "--out", str(tmp_path / "scratch"), "--from-scratch"]) == 0
    assert (tmp_path / "scratch" / "metrics.jsonl").is_file()


def test_eval_takes_an_import_folder_as_inspect_does_on_its_specs_train_data(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    imp = tmp_path / "imp"
    assert _import(src, imp) == 0
    capsys.readouterr()
    assert main(["eval", str(imp), "--capacity-factor", "1,0", "--batch", "2", "--seq", "8", "--eval-batches", "1",
                 "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    train_data = moedsl.load_spec(imp / "spec.yaml").train.data
    assert [(r["capacity_factor"], r["data"], r["data_from"]) for r in sweep] == [(1.0, train_data, "spec"),
                                                                                    (0.0, train_data, "spec")]
    assert sweep[1]["dropped"] == 0 and all(r["loss"] > 0 for r in sweep)
    assert main(["eval", str(imp), "--batch", "2", "--seq", "8", "--eval-batches", "1"]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # the table wraps the note over lines
    assert "the spec's train.data: an import holds no held-out data of its own" in shown


def test_spec_without_a_hugging_face_equivalent_is_refused_on_export(tmp_path, capsys):
    spec = Path(__file__).parents[1] / "specs" / "switch.yaml"
    run = tmp_path / "run"
    assert main(["run", str(spec), "--steps", "1", "--batch", "4", "--seq", "8", "--out", str(run),
                 "--no-progress", "--eval-batches", "1"]) == 0
    capsys.readouterr()
    _refused(capsys, ["export", str(run), "--out", str(tmp_path / "exp")], tmp_path / "exp", "no Hugging Face",
             "mixtral")


@pytest.mark.slow
@pytest.mark.parametrize("model_type,over", [("mixtral", {}), ("qwen2_moe", {"mlp_only_layers": [0]})],
                         ids=["mixtral", "qwen2_moe-dense_layer_and_gated_shared_expert"])
def test_run_init_on_two_processes_matches_one_and_its_checkpoint_exports(tmp_path, model_type, over):
    src, ref = _family_hf(tmp_path, model_type, **over)
    assert _import(src, tmp_path / "imp") == 0
    imp = tmp_path / "imp"
    one, two = run_init_on_one_and_two_processes(imp, tmp_path)
    assert abs(one[0] - two[0]) <= 1e-5 * abs(one[0])
    # the 2-process checkpoint exports (DCP reshards on load) and transformers loads it
    assert main(["export", str(tmp_path / "run2"), "--out", str(tmp_path / "exp")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _tokens()
    trained = moedsl.load_model(tmp_path / "run2")
    step = moedsl.load_model(imp / "spec.yaml", checkpoint=tmp_path / "run2" / "checkpoints" / "step-00000001")
    with torch.no_grad():
        _close(back.eval()(x).logits, trained(x).output)
        assert torch.equal(step(x).output, trained(x).output)


def test_a_rank_reads_only_the_experts_it_holds(tmp_path, monkeypatch):
    from moedsl.compiler import compile_graph
    from moedsl.hf import files
    from moedsl.hf.weights import load_weights

    src, _ = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    spec = moedsl.load_spec(tmp_path / "imp" / "spec.yaml")
    read, whole = [], []
    get_expert, get = files.Checkpoint.get_expert, files.Checkpoint.get
    monkeypatch.setattr(files.Checkpoint, "get_expert", lambda self, n, e: read.append(e) or get_expert(self, n, e))
    monkeypatch.setattr(files.Checkpoint, "get", lambda self, n: whole.append(n) or get(self, n))
    rank1 = compile_graph(spec, 1, 2, device="cpu", init=False, verify_ranks=False).module
    load_weights(rank1, tmp_path / "imp", spec)
    assert sorted(set(read)) == [2, 3] and not any(".experts." in n for n in whole)
    full = moedsl.load_model(tmp_path / "imp")
    assert torch.equal(rank1.state_dict()["layers.2.experts.w_out"], full.state_dict()["layers.2.experts.w_out"][2:])


@pytest.mark.slow
@pytest.mark.parametrize("spec_name,architecture", [
    ("mixtral", "MixtralForCausalLM"),
    ("qwen2-moe", "Qwen2MoeForCausalLM"),  # dense and MoE layers in cycles, a gated shared expert
    ("qwen3-moe-small", "Qwen3MoeForCausalLM"),  # qk_norm head, head_dim 48 over d_model 128 / 4 heads
])
def test_hand_written_spec_trains_and_exports_as_its_family(tmp_path, spec_name, architecture):
    _trains_and_exports_as(Path(__file__).parents[1] / "specs" / f"{spec_name}.yaml", tmp_path, architecture)


def _trains_and_exports_as(spec: Path, tmp_path: Path, architecture: str) -> None:
    """``spec`` trained one step and exported: transformers loads it as ``architecture`` with no
    missing or unexpected keys, to the run's logits."""
    run = tmp_path / "run"
    assert main(["run", str(spec), "--steps", "1", "--batch", "4", "--seq", "8", "--out", str(run),
                 "--no-progress", "--eval-batches", "1"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert type(back).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    vocab = moedsl.load_spec(spec).model.vocab_size
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(back.eval()(x).logits, moedsl.load_model(run)(x).output)


def test_the_families_attention_names_are_the_attention_modules_own():
    """llama_like keeps a torch-free copy of Attention.HF_NAMES: they must not drift apart."""
    from moedsl.hf.llama_like import ATTN_NAMES
    from moedsl.nn.attention import Attention

    assert ATTN_NAMES == Attention.HF_NAMES
