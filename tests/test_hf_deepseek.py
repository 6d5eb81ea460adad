"""moedsl import / export / load_model / run --init against transformers' DeepSeek-V3 (tiny, fp32):
each variant its config.json allows (transformers' modeling_deepseek_v3.py is the reference)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl  # noqa: E402
from moedsl.cli import main  # noqa: E402
from moedsl.hf import registered  # noqa: E402
from hf_helpers import close as _close, refused as _refused  # noqa: E402
from hf_helpers import exports_as, run_init_on_one_and_two_processes, save_fused  # noqa: E402

TINY = registered()["deepseek_v3"].tiny_config  # q_lora_rank, a dense first layer, 2 groups, 1 shared expert
VARIANTS = {
    "low_rank_q_groups_shared_dense_first": {},
    "full_q_no_interleave_bias_no_groups_no_shared_all_moe_tied": dict(
        q_lora_rank=None, rope_interleave=False, attention_bias=True, n_group=1, topk_group=1, n_shared_experts=0,
        first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.75, tie_word_embeddings=True),
    "four_groups_top_two_two_shared_two_dense_bias": dict(
        n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=2,
        attention_bias=True,
        routed_scaling_factor=1.0, rope_theta=500.0),
    "all_dense": dict(first_k_dense_replace=3),
}


YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.7, "mscale_all_dim": 1.0}  # a ramp across the 8 rotary dims


def _hf(tmp: Path, name="hf", **over) -> tuple:
    """A tiny DeepSeek-V3 saved by transformers: the router N(0, 1) (choices far from ties) and the
    correction bias U(-0.25, 0.25), the size of the sigmoid scores' spread, so it changes choices."""
    torch.manual_seed(0)
    rope = over.pop("rope_theta", None)
    rope = over.pop("rope_parameters", None) or (rope and {"rope_type": "default", "rope_theta": rope})
    cfg = transformers.DeepseekV3Config(**{**TINY, **over})
    if rope:
        cfg.rope_parameters = rope
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))  # norms that differ from 1
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 - 0.25)
    model.save_pretrained(tmp / name)
    return tmp / name, model


def _tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def _import(src, out, *extra) -> int:
    return main(["import", str(src), "--out", str(out), *extra])


def _export_loads_back(src: Path, out: Path, ref, x) -> None:
    assert main(["export", str(src), "--out", str(out)]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(back).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        _close(back.eval()(x).logits, ref(x).logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deepseek_variant_imports_to_transformers_logits_and_exports_back(tmp_path, variant):
    src, ref = _hf(tmp_path, **VARIANTS[variant])
    assert _import(src, tmp_path / "imp") == 0
    model = moedsl.load_model(tmp_path / "imp")
    x = _tokens()
    with torch.no_grad():
        _close(model(x).output, ref(x).logits)
    _export_loads_back(tmp_path / "imp", tmp_path / "exp", ref, x)


def test_imported_spec_names_the_config_fields_it_came_from(tmp_path):
    src, _ = _hf(tmp_path, **VARIANTS["four_groups_top_two_two_shared_two_dense_bias"])
    assert _import(src, tmp_path / "imp") == 0
    text = (tmp_path / "imp" / "spec.yaml").read_text()
    for line in ("groups: {count: 4, top: 2}  # n_group, topk_group", "shared: {count: 2, hidden: 16}",
                 "repeat: 2  # first_k_dense_replace", "q_lora_rank: 24  # q_lora_rank", "k: 3  # num_experts_per_tok",
                 "rope_theta: 500.0  # rope_parameters.rope_theta", "bias_balancing: {rate: 0}",
                 "norm_eps: 1e-06  # DeepseekV3RMSNorm's default"):
        assert line in text, line


def test_correction_bias_is_imported_not_left_at_zero(tmp_path):
    """The correction bias changes the choice of experts: a model without it differs."""
    src, ref = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    model = moedsl.load_model(tmp_path / "imp")
    bias = model.state_dict()["layers.4.gate.expert_bias"]
    assert torch.equal(bias, ref.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"])
    x = _tokens()
    with torch.no_grad():
        with_bias = model(x).output
        model.get_submodule("layers.4.gate").expert_bias.zero_()
        model.get_submodule("layers.6.gate").expert_bias.zero_()
        assert (model(x).output - with_bias).abs().max() > 1e-3 * with_bias.abs().max()


def test_n_group_null_imports_without_a_group_limit(tmp_path):
    """n_group null (DeepSeek's reference code: no groups; transformers' own router cannot run it)
    computes what n_group 1 computes."""
    src, ref = _hf(tmp_path, n_group=1, topk_group=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_group"], cfg["topk_group"] = None, None
    (src / "config.json").write_text(json.dumps(cfg))
    assert _import(src, tmp_path / "imp") == 0
    text = (tmp_path / "imp" / "spec.yaml").read_text()
    assert "groups:" not in text and "no group limit: n_group = None" in text
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)


def _with_extra_tensors(src: Path, extra: dict) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    save_file({**sd, **extra}, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_multi_token_prediction_layer_is_skipped_and_noted(tmp_path):
    """Released checkpoints carry the MTP module as model.layers.{num_hidden_layers}.*: the import
    leaves it out (it takes no part in the logits), saying so in the spec's header."""
    src, ref = _hf(tmp_path)
    N, d = TINY["num_hidden_layers"], TINY["hidden_size"]
    _with_extra_tensors(src, {f"model.layers.{N}.eh_proj.weight": torch.randn(d, 2 * d),
                              f"model.layers.{N}.enorm.weight": torch.ones(d),
                              f"model.layers.{N}.mlp.experts.0.up_proj.weight": torch.randn(16, d)})
    assert _import(src, tmp_path / "imp") == 0
    text = (tmp_path / "imp" / "spec.yaml").read_text()
    assert f"# Not imported: num_nextn_predict_layers = 1 multi-token-prediction module(s) (model.layers.{N}.*" \
        in text
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("extra", ["model.layers.1.mlp.extra.weight", "model.layers.4.enorm.weight"],
                         ids=["inside-a-layer", "a-layer-past-the-one-mtp-module"])
def test_a_tensor_outside_the_model_and_its_mtp_layers_is_refused(tmp_path, capsys, extra):
    src, _ = _hf(tmp_path)  # 3 layers and num_nextn_predict_layers 1: model.layers.3 may be MTP, not 4
    _with_extra_tensors(src, {extra: torch.ones(3)})
    _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o",
             extra, "not part of a deepseek_v3 model")


def test_fused_experts_layout_imports_like_per_expert(tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj / down_proj) written to disk as is."""
    src, ref = _hf(tmp_path)
    assert _import(save_fused(src, ref, tmp_path / "fused"), tmp_path / "imp") == 0
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(_tokens()).output, ref(_tokens()).logits)


@pytest.mark.parametrize("field,value,needle", [
    ("num_key_value_heads", 2, "num_attention_heads = 4"),
    ("hidden_act", "gelu", "'silu'"),
    ("scoring_func", "softmax", "'sigmoid'"),
    ("topk_method", "greedy", "'noaux_tc'"),
    ("moe_layer_freq", 2, "supported: 1"),
    ("n_group", 3, "a divisor of n_routed_experts = 8"),
    ("topk_group", 3, "1 to n_group = 2"),
    ("quantization_config", {"quant_method": "fp8"}, "dequantize"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "'default' and 'yarn'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "original_max_position_embeddings"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                         "low_freq_factor": 1.0}, "low_freq_factor"),
    ("sliding_window", 16, "DeepseekV3Config"),
])
def test_config_value_not_expressible_is_refused_by_name(tmp_path, capsys, field, value, needle):
    src, _ = _hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    err = _refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", needle)
    assert err.startswith(f"error: config.json: {field}") or f"config.json: {field}" in err, err


@pytest.mark.slow
def test_run_init_of_a_deepseek_import_on_two_processes_matches_one(tmp_path):
    src, _ = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    one, two = run_init_on_one_and_two_processes(tmp_path / "imp", tmp_path)
    assert abs(one[0] - two[0]) <= 1e-5 * abs(one[0])
    # the 2-process checkpoint exports and transformers loads it with no missing or unexpected keys
    trained = moedsl.load_model(tmp_path / "run2")
    assert main(["export", str(tmp_path / "run2"), "--out", str(tmp_path / "exp")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        _close(back.eval()(_tokens()).logits, trained(_tokens()).output)


def test_hand_written_deepseek_spec_trains_and_exports_as_deepseek_v3(tmp_path):
    """specs/deepseek-v3-small.yaml (aux-free balancing rate > 0: its moved bias is exported as
    e_score_correction_bias)."""
    spec = Path(__file__).parents[1] / "specs" / "deepseek-v3-small.yaml"
    run = tmp_path / "run"
    assert main(["run", str(spec), "--steps", "2", "--batch", "4", "--seq", "8", "--out", str(run),
                 "--no-progress", "--eval-batches", "1"]) == 0
    trained = moedsl.load_model(run)
    assert trained.state_dict()["layers.4.gate.expert_bias"].abs().sum() > 0  # the balancing moved it
    exports_as(run, tmp_path / "exp", "DeepseekV3ForCausalLM", 256)


def test_spec_that_deepseek_v3_cannot_express_is_refused_on_export_naming_the_field(tmp_path, capsys):
    src, _ = _hf(tmp_path)
    assert _import(src, tmp_path / "imp") == 0
    spec = tmp_path / "imp" / "spec.yaml"
    spec.write_text(spec.read_text().replace("score: sigmoid", "score: softmax"))
    _refused(capsys, ["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")], tmp_path / "exp",
             "gate.score softmax", "deepseek_v3")


# ----------------------------------------------------------------------------- yarn

@pytest.mark.parametrize("yarn", [
    dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=0.7, mscale_all_dim=1.0),
    dict(factor=4.0, original_max_position_embeddings=64),
    dict(factor=8.0, original_max_position_embeddings=32, beta_fast=8, beta_slow=2, truncate=False,
         attention_factor=1.3, mscale_all_dim=0.5)],
    ids=["deepseek-v3-mscales", "defaults", "explicit-attention-factor-untruncated"])
def test_latent_attention_with_yarn_matches_deepseek_v3_attention(yarn):
    """YaRN (rope_type yarn): the blended frequencies, cos/sin × attention_factor, and the softmax
    scale × mscale(factor, mscale_all_dim)², against DeepseekV3Attention; without rope_scaling the
    same weights give another output (the ramp and the factors matter at these sizes)."""
    from test_attention_variants import D, assert_same, hf_output, inputs, moedsl_module
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=10, kv_lora_rank=8,
        qk_nope_head_dim=6, qk_rope_head_dim=8, v_head_dim=5, max_position_embeddings=256, num_hidden_layers=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, **yarn})
    x = inputs()
    ref, hf = hf_output(DeepseekV3Attention, DeepseekV3RotaryEmbedding, config, x)
    fields = ", ".join(f"{k}: {str(v).lower()}" for k, v in yarn.items())
    layer = ("latent_attention: {heads: 4, q_lora_rank: 10, kv_lora_rank: 8, qk_nope_head_dim: 6, qk_rope_head_dim: 8, "
             "v_head_dim: 5, rope_theta: 100.0")
    assert_same(moedsl_module(layer + f", rope_scaling: {{type: yarn, {fields}}}}}"), hf, ref, x)
    with pytest.raises(AssertionError, match="max |diff|"):
        assert_same(moedsl_module(layer + "}"), hf, ref, x)


def test_yarn_checkpoint_imports_and_exports_with_its_rope_parameters(tmp_path):
    src, ref = _hf(tmp_path, rope_parameters=dict(YARN))
    assert _import(src, tmp_path / "imp") == 0
    text = (tmp_path / "imp" / "spec.yaml").read_text()
    assert "mscale_all_dim: 1.0  # rope_parameters.mscale_all_dim" in text
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)
    _export_loads_back(tmp_path / "imp", tmp_path / "exp", ref, x)
    rope = json.loads((tmp_path / "exp" / "config.json").read_text())["rope_parameters"]
    assert rope == YARN


def test_released_style_config_with_legacy_rope_scaling_imports(tmp_path):
    """The released DeepSeek-V3 config.json (transformers 4 era): rope_theta + rope_scaling {type:
    yarn}, scoring_func, topk_method, moe_layer_freq, ep_size, auto_map; factor omitted here to be
    derived as max_position_embeddings / original_max_position_embeddings."""
    src, ref = _hf(tmp_path, rope_parameters={**YARN, "factor": 128 / 64}, max_position_embeddings=128)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["rope_parameters"]
    legacy = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta", "factor")}
    cfg.update(rope_theta=100.0, rope_scaling={"type": "yarn", **legacy}, scoring_func="sigmoid",
               topk_method="noaux_tc", moe_layer_freq=1, ep_size=1, seq_aux=True, aux_loss_alpha=0.001,
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    (src / "config.json").write_text(json.dumps(cfg))
    assert _import(src, tmp_path / "imp") == 0
    text = (tmp_path / "imp" / "spec.yaml").read_text()
    assert "factor: 2.0  # max_position_embeddings / rope_scaling.original_max_position_embeddings" in text
    assert "rope_theta: 100.0  # rope_theta" in text
    x = _tokens()
    with torch.no_grad():
        _close(moedsl.load_model(tmp_path / "imp")(x).output, ref(x).logits)
    _export_loads_back(tmp_path / "imp", tmp_path / "exp", ref, x)
    exported = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert "auto_map" not in exported and "rope_scaling" not in exported


def test_rope_scaling_of_another_type_is_refused_at_its_field(tmp_path):
    spec = {"moedsl": 1, "name": "x", "model": {"vocab_size": 16, "d_model": 16, "max_seq_len": 32},
            "layers": [{"embedding": {}}, {"latent_attention": {
                "heads": 2, "kv_lora_rank": 4, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
                "rope_scaling": {"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}}},
                {"head": {}}]}
    with pytest.raises(moedsl.errors.SpecError, match=r"latent_attention\.rope_scaling\.type: 'linear' is not one"):
        moedsl.load_spec(spec)
