"""moedsl import / export / generate of the encoder-decoder families (switch_transformers,
nllb-moe) against the installed transformers (tiny random models, fp32, eval mode)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl  # noqa: E402
from moedsl.cli import main  # noqa: E402
from moedsl.hf import registered  # noqa: E402
from moedsl.hf.reference import tiny_reference  # noqa: E402
from moedsl.nn.layers import Embedding  # noqa: E402
from hf_helpers import family_cases, refused  # noqa: E402


@pytest.mark.parametrize("d_model", [16, 15])
def test_sinusoidal_positions_with_a_pad_id_equal_nllb_moes_including_padding_and_decoding(d_model):
    """fairseq's numbering (NllbMoeSinusoidalPositionalEmbedding): left and right padding sit at
    the pad position, whose vector is zero, and a decode step continues from the cache's length."""
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSinusoidalPositionalEmbedding

    ref = NllbMoeSinusoidalPositionalEmbedding(64, d_model, padding_idx=1)
    ours = Embedding(50, d_model, 64, "sinusoidal", 0.02, pad_id=1, scale=3.0)
    tokens = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 4, 4, 4]])
    with torch.no_grad():
        ours.weight.zero_()
        assert torch.equal(ours(tokens), ref(tokens, None))
        step = torch.tensor([[9], [9]])
        assert torch.equal(ours(step, torch.tensor([[3], [7]]))[1:], ref(step, None, cache_length=7)[1:])
        ours.weight.normal_()
        assert torch.allclose(ours(tokens) - ref(tokens, None), 3.0 * ours.weight[tokens])


# ------------------------------------------------------------------ the references

def _chosen_experts(self, hidden_states, router_mask, router_probs):
    """NllbMoeExperts.forward as fairseq's MOELayer computes it: each token through the experts its
    router kept, weighted by their combine weights (router_probs [tokens, E], zero elsewhere), × (1 -
    moe_token_dropout) in evaluation."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        rows = router_probs[:, e].nonzero().squeeze(-1)
        if rows.numel():
            y = self[f"expert_{e}"](hidden_states[rows]) * router_probs[rows, e, None]
            if self.moe_token_dropout > 0:
                y = self.token_dropout(y) if self.training else y * (1 - self.moe_token_dropout)
            out.index_add_(0, rows, y.to(hidden_states.dtype))
    return out


@pytest.fixture
def chosen_experts(monkeypatch):
    """transformers' NLLB-MoE computing the experts its router chose (the nllb_moe family's docstring;
    tests/test_encdec_routing.py::test_installed_nllb_sparse_mlp_computes_experts_0_and_1_whatever_the_router_chose
    pins what 5.25 computes instead)."""
    from transformers.models.nllb_moe import modeling_nllb_moe

    monkeypatch.setattr(modeling_nllb_moe.NllbMoeExperts, "forward", _chosen_experts)


def _reference(model_type: str, over: dict):
    """The family's tiny model (``tiny_reference``: norms and biases moved off 1 and 0), fp32, eval;
    untied, the decoder's table set equal to the encoder's, as moedsl's one embedding needs."""
    ref, cfg = tiny_reference(transformers, model_type, over)
    if not cfg.tie_word_embeddings:
        base = ref.model if model_type == "nllb-moe" else ref
        with torch.no_grad():
            base.decoder.embed_tokens.weight.copy_(base.encoder.embed_tokens.weight)
    return ref, cfg


def _batch(cfg, rows: int = 3, source: int = 9, target: int = 7, seed: int = 1):
    """Source ids [rows, source] right-padded with pad_token_id (rows 1 and 2 shorter), their mask,
    and decoder ids [rows, target] (no pad among them)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, cfg.vocab_size, (rows, source), generator=g)
    lengths = torch.tensor([source, source - 3, source - 5][:rows] + [source] * max(0, rows - 3))
    mask = torch.arange(source)[None, :] < lengths[:, None]
    src[~mask] = cfg.pad_token_id
    dec = torch.randint(3, cfg.vocab_size, (rows, target), generator=g)
    return src, mask, dec


def _rel(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("model_type,over", family_cases(encoder_decoder=True))
def test_every_encoder_decoder_variant_imports_to_transformers_logits_and_exports_back(tmp_path, chosen_experts,
                                                                                      model_type, over):
    """Each variant the family's config expresses, built by transformers and saved: ``moedsl import``,
    ``load_model`` and the logits of a padded batch (fp32, eval) within 1e-4 of transformers'
    largest; ``moedsl export`` loads back in transformers with no missing or unexpected keys and
    computes the same logits."""
    fam = registered()[model_type]
    ref, cfg = _reference(model_type, over)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert f"d_model: {cfg.d_model}  # d_model" in (tmp_path / "imp" / "spec.yaml").read_text()
    model = moedsl.load_model(tmp_path / "imp").eval()
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        ours = model(src, dec, mask).output
    assert _rel(ours, theirs) <= 1e-4, _rel(ours, theirs)
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    back, info = type(ref).from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back).__name__ == fam.architectures[0]
    with torch.no_grad():
        again = back.eval()(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    assert _rel(again, theirs) <= 1e-4


def _saved(tmp_path, model_type: str, over: dict | None = None, **edit) -> Path:
    """The family's tiny model saved in tmp_path/hf, its config.json then given ``edit``."""
    ref, _ = _reference(model_type, over or {})
    ref.save_pretrained(tmp_path / "hf")
    if edit:
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        cfg.update(edit)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "hf"


@pytest.mark.parametrize("model_type,field,value,needle", [
    ("switch_transformers", "router_bias", True, "moedsl's router has no bias"),
    ("switch_transformers", "dense_act_fn", "gelu_new", "relu, gelu, silu"),
    ("switch_transformers", "is_gated_act", True, "ungated experts"),
    ("switch_transformers", "feed_forward_proj", "gated-gelu", "ungated experts"),
    ("switch_transformers", "relative_attention_bias_style", "alibi", "SwitchTransformersConfig"),
    ("switch_transformers", "num_selected_experts", 2, "what transformers 5's Switch computes"),
    ("switch_transformers", "router_type", "experts_masked", "'tokens_masked'"),
    ("nllb-moe", "second_expert_policy", "best", "all, sampling, random"),
    ("nllb-moe", "activation_function", "gelu_new", "relu, gelu, silu"),
    ("nllb-moe", "encoder_sparse_step", -1, "0 (no sparse layer) or a positive integer"),
])
def test_a_config_value_moedsl_cannot_express_is_refused_naming_field_and_value(tmp_path, capsys, model_type,
                                                                                 field, value, needle):
    src = _saved(tmp_path, model_type, **{field: value})
    err = refused(capsys, ["import", str(src), "--out", str(tmp_path / "o")], tmp_path / "o", field, repr(value),
                  needle)
    assert model_type in err


def test_released_switch_config_fields_of_transformers_4_import_with_the_values_5_computes(tmp_path):
    """google/switch-base-8's config.json (transformers 4) also has num_selected_experts 1, router_type
    tokens_masked, batch_prioritized_routing false, feed_forward_proj relu, is_gated_act false and the
    derived sparse steps: fields transformers 5 reads nowhere, with the values it computes."""
    src = _saved(tmp_path, "switch_transformers", num_selected_experts=1, router_type="tokens_masked",
                 batch_prioritized_routing=False, feed_forward_proj="relu", is_gated_act=False,
                 encoder_sparse_step=2, decoder_sparse_step=2)
    assert main(["import", str(src), "--out", str(tmp_path / "imp")]) == 0


@pytest.mark.parametrize("model_type,prefix", [("switch_transformers", ""), ("nllb-moe", "model.")])
def test_untied_checkpoint_whose_two_stacks_embed_differently_is_refused(tmp_path, capsys, model_type, prefix):
    """transformers 5 untied gives each stack its own table; moedsl's stacks share one, so unequal
    tables are refused by name rather than one of them silently dropped."""
    ref, _ = tiny_reference(transformers, model_type, {"tie_word_embeddings": False})
    ref.save_pretrained(tmp_path / "hf")
    refused(capsys, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "o")], tmp_path / "o",
            f"{prefix}encoder.embed_tokens.weight differs from {prefix}decoder.embed_tokens.weight")


@pytest.mark.parametrize("model_type,drops", [
    ("switch_transformers", {"expert_capacity": 2, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2}),
    ("nllb-moe", {"moe_eval_capacity_token_fraction": 0.3}),
    ("nllb-moe", {"normalize_router_prob_before_dropping": True, "moe_eval_capacity_token_fraction": 0.3}),
    ("nllb-moe", {"batch_prioritized_routing": True, "moe_eval_capacity_token_fraction": 0.3}),
])
def test_the_dropping_variants_drop_tokens_in_transformers_on_the_parity_batch(chosen_experts, model_type, drops):
    """The capacity variants of the parity test do exercise drops: on its batch transformers' logits
    move when the capacity no longer holds every token."""
    assert any(over == drops for over, _ in registered()[model_type].tiny_variants)
    ref, cfg = _reference(model_type, drops)
    roomy = {"expert_capacity": 64} if model_type == "switch_transformers" else \
        {"moe_eval_capacity_token_fraction": 1.0}
    ref2, _ = _reference(model_type, {**drops, **roomy})
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        a = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        b = ref2(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    assert _rel(a, b) > 1e-3


def test_imported_switch_names_the_installed_releases_dropped_token_behaviour(tmp_path):
    """The spec says what transformers 5.25 does with a token past the capacity (its MoE output is
    zero, the residual carries it: ``dropped_tokens: residual``) and that is what matches its
    logits: the same import with the older releases' p·x (``scaled_input``) or with no drops
    (``never``) does not."""
    over = {"expert_capacity": 2, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2}
    ref, cfg = _reference("switch_transformers", over)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    spec = tmp_path / "imp" / "spec.yaml"
    text = spec.read_text()
    assert text.count("dropped_tokens: residual  # transformers 5.25") == text.count("type: switch") > 0
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    errors = {}
    for behaviour in ("residual", "scaled_input", "never"):
        edited = text.replace("dropped_tokens: residual", f"dropped_tokens: {behaviour}")
        if behaviour == "never":  # no capacity then
            edited = re.sub(r"\n *expert_capacity: .*", "", edited)
        spec.write_text(edited)
        with torch.no_grad():
            errors[behaviour] = _rel(moedsl.load_model(tmp_path / "imp").eval()(src, dec, mask).output, theirs)
    assert errors["residual"] <= 1e-4, errors
    assert errors["scaled_input"] > 1e-3 and errors["never"] > 1e-3, errors


SWITCH_DROPS = {"expert_capacity": 2, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2}


@pytest.mark.slow
@pytest.mark.parametrize("model_type,over,lengths", [
    ("switch_transformers", {}, [7]),
    ("switch_transformers", {**SWITCH_DROPS, "tie_word_embeddings": False}, [7]),
    ("switch_transformers", {**SWITCH_DROPS, "tie_word_embeddings": False}, [7, 5, 3, 6]),
    ("switch_transformers", {**SWITCH_DROPS, "expert_capacity": 64, "tie_word_embeddings": False}, [7, 5, 3, 6]),
    ("nllb-moe", {"init_std": 1.0}, [7]),
    ("nllb-moe", {"init_std": 1.0, "scale_embedding": False, "moe_eval_capacity_token_fraction": 0.3}, [7]),
    ("nllb-moe", {"init_std": 1.0}, [7, 5, 3]),
    ("nllb-moe", {"init_std": 1.0, "moe_token_dropout": 0.2}, [7]),
], ids=["switch-b1", "switch-b1-drops-eos", "switch-b4-drops", "switch-b4", "nllb-b1", "nllb-b1-drops-eos", "nllb-b3",
        "nllb-b1-token-dropout"])
def test_greedy_ids_equal_transformers_generate(tmp_path, chosen_experts, model_type, over, lengths):
    """``moedsl.generate`` of the import (encode once, decode with self- and cross-attention caches,
    greedy) gives transformers' ``generate(do_sample=False, num_beams=1, max_new_tokens=12)`` ids,
    decoder_start first, rows that reach eos padded after it and generation ending when all have.
    Sources of different lengths are padded on the RIGHT with pad_token_id and an attention_mask,
    as both take them; the padding is routed by Switch's encoder and takes expert capacity there
    (SWITCH_DROPS: 2 per sequence, so it displaces real tokens), as in transformers. NLLB-MoE at
    batch 3 keeps its default eval capacity (the whole batch: nothing dropped): with less, its
    decode step shares slots among the rows, which moedsl's per-token decode routing does not (the
    imported spec's header says so)."""
    ref, cfg = _reference(model_type, over)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    model = moedsl.load_model(tmp_path / "imp")
    g = torch.Generator().manual_seed(5)
    src = torch.randint(3, cfg.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    src[~mask] = cfg.pad_token_id
    with torch.no_grad():
        theirs = ref.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                              num_beams=1)
    ours = moedsl.generate(model, src, 12, attention_mask=mask.long(), temperature=0)
    assert ours.tolist() == theirs.tolist()


def test_nllb_moe_rows_share_the_capacity_of_the_whole_batch_as_in_transformers(tmp_path, chosen_experts):
    """NLLB-MoE counts the capacity over all the batch's tokens, so a row's logits depend on the rows
    beside it; the imported spec says so (one routing group) and moedsl's rows move exactly as
    transformers' do."""
    ref, cfg = _reference("nllb-moe", {"moe_eval_capacity_token_fraction": 0.3})
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert "routing_groups: 1  # the capacity counts over all the batch's tokens" in \
        (tmp_path / "imp" / "spec.yaml").read_text()
    model = moedsl.load_model(tmp_path / "imp").eval()
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        theirs_alone = ref(input_ids=src[:1], attention_mask=mask[:1].long(), decoder_input_ids=dec[:1]).logits
        theirs_batched = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits[:1]
        ours_alone = model(src[:1], dec[:1], mask[:1]).output
        ours_batched = model(src, dec, mask).output[:1]
    assert _rel(theirs_alone, theirs_batched) > 1e-3  # the rows interact
    assert _rel(ours_alone, theirs_alone) <= 1e-4 and _rel(ours_batched, theirs_batched) <= 1e-4


@pytest.mark.parametrize("model_type,over", [("switch_transformers", SWITCH_DROPS),
                                             ("nllb-moe", {"batch_prioritized_routing": True,
                                                           "moe_eval_capacity_token_fraction": 0.3,
                                                           "moe_token_dropout": 0.2})])
def test_export_without_the_recorded_config_writes_every_field_from_the_spec(tmp_path, chosen_experts, model_type,
                                                                             over):
    """A spec with no hf_config.json beside it (written by hand, or the record removed): the
    export's config.json comes from the spec alone and transformers computes the same logits."""
    ref, cfg = _reference(model_type, over)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    (tmp_path / "imp" / "hf_config.json").unlink()
    (tmp_path / "imp" / "generation_config.json").unlink()
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    back, info = type(ref).from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        again = back.eval()(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    assert _rel(again, theirs) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["switch_transformers", "nllb-moe"])
def test_fine_tuned_import_exports_to_transformers_with_the_runs_logits(tmp_path, chosen_experts, model_type):
    """``moedsl run --init IMPORT`` (2 steps of the encoder-decoder's synthetic seq2seq data), then
    ``moedsl export RUN``: transformers loads it with no missing or unexpected keys and computes the
    fine-tuned model's logits, not the imported ones."""
    ref, cfg = _reference(model_type, {})
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert main(["run", str(tmp_path / "imp" / "spec.yaml"), "--init", str(tmp_path / "imp"), "--steps", "2",
                 "--batch", "4", "--seq", "8", "--no-progress", "--eval-batches", "1", "--ignore-memory-check",
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    back, info = type(ref).from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tuned = moedsl.load_model(tmp_path / "run").eval()
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        theirs = back.eval()(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        before = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        ours = tuned(src, dec, mask).output
    assert _rel(ours, theirs) <= 1e-4
    assert _rel(before, theirs) > 1e-3


def test_an_encoder_decoder_spec_no_family_computes_is_refused_naming_each_familys_reason():
    """A hand-written T5-shaped spec whose gates count a capacity_factor over the batch is not
    transformers' Switch (an expert_capacity per sequence): the export names that, and why
    NLLB-MoE is not it either, rather than writing a config.json that computes something else."""
    from encdec_helpers import tiny_encdec

    from moedsl.errors import UserError
    from moedsl.hf import family_of_spec
    from moedsl.spec_loader import load_spec

    spec = load_spec(tiny_encdec(), source="t.yaml")
    with pytest.raises(UserError) as e:
        family_of_spec(spec)
    assert "switch_transformers: encoder[1].block[1].cycle[1].moe.gate: capacity_factor 2.0" in str(e.value)
    assert "nllb-moe: model.norm rmsnorm" in str(e.value)
    fixed = tiny_encdec().replace("capacity_factor: 2.0", "expert_capacity: 4, routing_groups: sequence")
    assert family_of_spec(load_spec(fixed, source="t.yaml")).model_type == "switch_transformers"


@pytest.mark.parametrize("policy", ["sampling", "random"])
def test_nllb_moes_random_second_expert_policies_import_as_the_gates_and_export_back(tmp_path, policy):
    """second_expert_policy sampling and random draw at random in evaluation too (NllbMoeTop2Router
    does not look at ``training``), so no two runs give the same logits: the import carries them as
    the gshard gate's ``second_expert`` and the export writes them back."""
    src = _saved(tmp_path, "nllb-moe", {"second_expert_policy": policy})
    assert main(["import", str(src), "--out", str(tmp_path / "imp")]) == 0
    assert f"second_expert: {policy}  # second_expert_policy {policy}" in (tmp_path / "imp" / "spec.yaml").read_text()
    (tmp_path / "imp" / "hf_config.json").unlink()
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["second_expert_policy"] == policy


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["switch_transformers", "nllb-moe"])
def test_a_bfloat16_checkpoint_imports_as_close_to_float32_as_transformers_own_bfloat16(tmp_path, chosen_experts,
                                                                                      model_type):
    """The family's tiny model saved as transformers saves a bfloat16 model, imported (the spec's
    dtype bfloat16, the router float32 as the config says): on a padded batch, moedsl's logits lie
    within twice transformers' own bfloat16 error of the float32 model's logits, and within 3% of
    transformers' bfloat16 logits (measured: Switch 1.5% against transformers' 1.2%, NLLB-MoE 0.7%
    against 0.7%)."""
    ref, cfg = _reference(model_type, {})
    src, mask, dec = _batch(cfg)
    with torch.no_grad():
        full = ref.eval()(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    ref.save_pretrained(tmp_path / "hf32")
    type(ref).from_pretrained(tmp_path / "hf32", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    half = type(ref).from_pretrained(tmp_path / "hf").eval()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert "  dtype: bfloat16" in (tmp_path / "imp" / "spec.yaml").read_text()
    model = moedsl.load_model(tmp_path / "imp").eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        theirs = half(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits.float()
        ours = model(src, dec, mask).output.float()
    assert _rel(ours, full) <= 2 * _rel(theirs, full), (_rel(ours, full), _rel(theirs, full))
    assert _rel(ours, theirs) <= 0.03
