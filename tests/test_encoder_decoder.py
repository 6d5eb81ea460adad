"""Encoder-decoder specs (T5, Switch Transformer, NLLB-MoE): the two stacks in one graph, T5's
relative position bias, cross-attention, the located errors of a malformed encoder-decoder."""
from __future__ import annotations

import pytest
import torch

from encdec_helpers import copy_batch, tiny_encdec
from moedsl.compiler import compile_graph
from moedsl.errors import SpecError
from moedsl.nn.attention import relative_position_bucket
from moedsl.spec_loader import load_spec


def _model(text: str, seed: int = 0):
    spec = load_spec(text)
    return spec, compile_graph(spec, device="cpu", seed=seed).module


# ------------------------------------------------------------------ T5's relative position buckets

@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 16), (64, 300)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_is_transformers_for_every_distance_up_to_300(buckets, max_distance, bidirectional):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)[None, :]  # key - query, both directions
    ours = relative_position_bucket(relative, bidirectional, buckets, max_distance)
    switch = SwitchTransformersAttention._relative_position_bucket(relative, bidirectional, buckets, max_distance)
    t5 = T5Attention._relative_position_bucket(relative, bidirectional, buckets, max_distance)
    assert torch.equal(ours, switch) and torch.equal(ours, t5)
    assert int(ours.min()) >= 0 and int(ours.max()) == buckets - 1  # every bucket reachable up to the far end


# ------------------------------------------------------------------ the spec

def test_an_encoder_decoder_spec_numbers_both_stacks_on_in_one_layer_tuple():
    spec = load_spec(tiny_encdec())
    assert spec.encoder_decoder
    assert [layer.index for layer in spec.layers] == list(range(len(spec.layers)))
    enc, dec = spec.stack("encoder"), spec.stack("decoder")
    assert len(enc) + len(dec) == len(spec.layers) and spec.layers[:len(enc)] == enc
    assert [layer.moe_index for layer in spec.moe_layers] == [0, 1]
    assert [layer.stack for layer in spec.moe_layers] == ["encoder", "decoder"]
    assert dec[0].path == ("decoder", 0) and enc[1].path == ("encoder", 1, "block", 0)
    assert not load_spec("tests/../specs/switch.yaml").encoder_decoder


def test_the_decoders_embedding_is_the_encoders_table_counted_once():
    spec, model = _model(tiny_encdec())
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("embedding.") for n in names) == 1
    assert "encoder_relative_bias.weight" in names and "decoder_relative_bias.weight" in names
    from moedsl.params import count_parameters

    assert count_parameters(spec)[0] == sum(p.numel() for p in model.parameters())


def _issues(text: str) -> list:
    with pytest.raises(SpecError) as e:
        load_spec(text)
    return [(p, i.message) for p, i in zip(e.value.paths, e.value.issues)]


def _first(issues, path):
    found = [m for p, m in issues if p == path]
    assert found, issues
    return found[0]


def test_layers_beside_an_encoder_is_a_located_error():
    text = tiny_encdec().replace("train:", "layers:\n  - embedding: {}\ntrain:")
    assert "cannot both be given" in _first(_issues(text), "encoder")


def test_a_decoder_without_an_encoder_is_a_located_error():
    text = tiny_encdec()
    text = text[:text.index("encoder:")] + text[text.index("decoder:"):]
    assert "needs an encoder" in _first(_issues(text), "decoder")


def test_cross_attention_in_the_encoder_is_a_located_error():
    text = tiny_encdec(**{"  - norm: {}\ndecoder:": "  - cross_attention: {heads: 2}\n  - norm: {}\ndecoder:"})
    assert "cannot stand in the encoder" in _first(_issues(text), "encoder[2].cross_attention")


def test_cross_attention_in_a_single_stack_asks_for_an_encoder_decoder():
    text = open("specs/switch.yaml").read().replace("  - norm: {}\n  - head: {}",
                                                     "  - cross_attention: {heads: 4}\n  - norm: {}\n  - head: {}")
    assert "layers:" in text and "cross_attention" in text
    issues = _issues(text)
    assert any("needs an encoder-decoder" in m for _, m in issues), issues


def test_a_head_in_the_encoder_and_a_decoder_without_one_are_located_errors():
    text = tiny_encdec(**{"  - norm: {}\ndecoder:": "  - head: {}\ndecoder:", "  - head: {rescale: true}\n": ""})
    issues = _issues(text)
    assert "cannot stand in the encoder" in _first(issues, "encoder[2].head")
    assert "needs a head" in _first(issues, "decoder[2]")


def test_a_bidirectional_decoder_self_attention_is_a_located_error():
    text = tiny_encdec(**{"{heads: 2, causal: true,": "{heads: 2, causal: false,"})
    assert "must be causal" in _first(_issues(text), "decoder[1].block[0].attention.causal")


def test_the_layers_of_a_stack_share_one_relative_bias_and_must_agree_on_it():
    text = tiny_encdec(**{"  - norm: {}\ndecoder:": "  - attention: {heads: 2, causal: false, positions: relative, "
                                                     "relative_buckets: 16}\n  - norm: {}\ndecoder:"})
    assert "relative_buckets differs" in _first(_issues(text), "encoder[2].attention.relative_buckets")


@pytest.mark.parametrize("field,value", [("positions", "learned"), ("scale", "2.0"), ("init_std", "1.0")])
def test_a_decoder_embedding_stating_other_settings_than_the_encoders_names_the_field_that_differs(field, value):
    """The two stacks embed with one table: the decoder's embedding states the encoder's settings, and
    where it does not, the error points at the field that differs (it named `positions` whatever
    differed)."""
    text = tiny_encdec(**{"decoder:\n  - embedding: {}": f"decoder:\n  - embedding: {{{field}: {value}}}"})
    assert f"{field} differs" in _first(_issues(text), f"decoder[0].embedding.{field}")


def test_an_id_outside_the_vocabulary_is_a_located_error():
    assert "not an id of the vocabulary" in _first(_issues(tiny_encdec(**{"eos_id: 1": "eos_id: 40"})),
                                                    "model.eos_id")


def test_an_id_that_is_not_an_integer_is_the_schemas_located_error_not_a_crash():
    """Found by tests/test_spec_fuzz.py: `pad_id: null` reached the vocabulary check, which compared
    None with an int (TypeError); the schema's own error is the one line said."""
    assert "expected an integer, got null" in _first(_issues(tiny_encdec(**{"pad_id: 0": "pad_id: null"})),
                                                     "model.pad_id")


# ------------------------------------------------------------------ the graph

def test_one_graph_holds_both_stacks_and_the_relative_bias_is_made_once_per_stack():
    spec, model = _model(tiny_encdec())
    g = model.graph
    placeholders = [n.target for n in g.nodes if n.op == "placeholder"]
    assert placeholders == ["tokens", "decoder_tokens", "source_mask"]
    bias_nodes = [n for n in g.nodes if n.op == "call_module" and n.target.endswith("relative_bias")]
    assert [n.target for n in bias_nodes] == ["encoder_relative_bias", "decoder_relative_bias"]
    for node in bias_nodes:  # every self-attention of its stack reads it, and none of the other's
        stack = node.target.split("_")[0]
        readers = {u.target for u in node.users}
        assert readers == {f"layers.{layer.index}.attention" for layer in spec.stack(stack)
                           if layer.kind == "attention"}
        assert "block" not in node.meta  # outside every sublayer (recomputation keeps it)
    embeds = {n.name: n.args[0].name for n in g.nodes if n.op == "call_module" and n.target == "embedding"}
    assert embeds == {"encoder_embedding": "tokens", "decoder_embedding": "decoder_tokens"}  # one table, two reads


def test_a_tiny_encoder_decoder_moe_runs_forward_and_backward():
    spec, model = _model(tiny_encdec(capacity_factor=1.0))
    source, source_mask, dec_in, labels, loss_mask = copy_batch(4, 10, seed=1)
    out = model(source, dec_in, source_mask)
    assert out.output.shape == (4, 11, 40)
    assert len(out.router_stats) == 2 and {s.layer for s in out.router_stats} == {"layers.4", "layers.12"}
    loss = torch.nn.functional.cross_entropy(out.output.flatten(0, 1), labels.flatten())
    (loss + out.aux_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("encoder_relative_bias.weight", "decoder_relative_bias.weight", "layers.8.cross_attention.wk.weight",
                 "layers.4.experts.w_in", "embedding.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_the_sources_padding_reaches_neither_the_encoders_real_tokens_nor_the_decoder():
    spec, model = _model(tiny_encdec(capacity_factor=8.0))  # nothing dropped: routing cannot couple tokens
    model.eval()
    source, source_mask, dec_in, _, _ = copy_batch(4, 10, seed=2)
    assert not bool(source_mask.all())
    other = source.masked_fill(~source_mask, 7)  # other ids where the source is padding
    with torch.no_grad():
        a = model(source, dec_in, source_mask).output
        b = model(other, dec_in, source_mask).output
        c = model(other, dec_in).output  # without the mask the padding counts
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)


# ------------------------------------------------------------------ the computation: transformers' Switch

def _tiny_switch(seed: int = 0):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, num_experts=4, expert_capacity=64, num_sparse_encoder_layers=1,
                                   num_sparse_decoder_layers=1, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
                                   decoder_start_token_id=0)
    ref = SwitchTransformersForConditionalGeneration(cfg).eval()
    return ref


def _copy_switch_weights(ref, model) -> None:
    """transformers' tiny Switch weights into the tiny spec's modules (layers 0-5 the encoder's:
    embedding, attention, ffn, attention, moe, norm; 6-14 the decoder's)."""
    sd = ref.state_dict()
    ours = dict(model.named_parameters())

    def put(name, value):
        assert ours[name].shape == value.shape, name
        ours[name].data.copy_(value)

    put("embedding.weight", sd["shared.weight"])
    for stack, first, blocks in (("encoder", 1, (1, 3)), ("decoder", 7, (7, 10))):
        put(f"{stack}_relative_bias.weight", sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
        for i, at in enumerate(blocks):
            pre = f"{stack}.block.{i}.layer"
            put(f"layers.{at}.norm.weight", sd[f"{pre}.0.layer_norm.weight"])
            for a, b in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
                put(f"layers.{at}.attention.{a}.weight", sd[f"{pre}.0.SelfAttention.{b}.weight"])
            ff = at + 1
            if stack == "decoder":
                put(f"layers.{ff}.norm.weight", sd[f"{pre}.1.layer_norm.weight"])
                for a, b in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
                    put(f"layers.{ff}.cross_attention.{a}.weight", sd[f"{pre}.1.EncDecAttention.{b}.weight"])
                ff += 1
            j = 2 if stack == "decoder" else 1
            put(f"layers.{ff}.norm.weight", sd[f"{pre}.{j}.layer_norm.weight"])
            if i == 0:
                put(f"layers.{ff}.ffn.w_in.weight", sd[f"{pre}.{j}.mlp.wi.weight"])
                put(f"layers.{ff}.ffn.w_out.weight", sd[f"{pre}.{j}.mlp.wo.weight"])
            else:
                put(f"layers.{ff}.gate.weight", sd[f"{pre}.{j}.mlp.router.classifier.weight"])
                for e in range(4):
                    ours[f"layers.{ff}.experts.w_in"].data[e] = sd[f"{pre}.{j}.mlp.experts.expert_{e}.wi.weight"].T
                    ours[f"layers.{ff}.experts.w_out"].data[e] = sd[f"{pre}.{j}.mlp.experts.expert_{e}.wo.weight"].T
        put(f"layers.{5 if stack == 'encoder' else 13}.norm.weight", sd[f"{stack}.final_layer_norm.weight"])


def test_logits_equal_transformers_switch_with_a_padded_source():
    """Relative bias on unscaled logits, one table per stack, the source mask in the encoder and
    the cross-attention, the final norms, the tied head scaled by d_model^-0.5: with every token
    within capacity, the tiny spec computes what transformers' Switch computes."""
    ref = _tiny_switch()
    spec, model = _model(tiny_encdec(capacity_factor=8.0))
    model.eval()
    _copy_switch_weights(ref, model)
    source, source_mask, dec_in, _, _ = copy_batch(4, 10, seed=3)
    with torch.no_grad():
        theirs = ref(input_ids=source, attention_mask=source_mask.long(), decoder_input_ids=dec_in).logits
        ours = model(source, dec_in, source_mask).output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ training: 2 processes equal 1

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["grouped", "static"])
def test_two_processes_equal_one_for_an_encoder_decoder_moe_with_drops(layout):
    """One training step (the run's TrainStep: loss over the labels that are not padding, averaged
    over the ranks by masked_count; the bucketed sync, clip, AdamW) of the tiny Switch-shaped
    encoder-decoder on 2 gloo processes, each with its experts and half the padded batch, equals
    the single process: outputs, aux loss, every gradient and weight after the step, router counts."""
    from moedsl.runtime.equivalence import check

    text = tiny_encdec(capacity_factor=1.0, **{"train:": "placement: {expert_parallel: 2}\ntrain:"})
    diffs = check(text, 2, batch=4, seq=10, layout=layout)
    for d in diffs:
        assert d.ok(), d
    assert diffs[0].dropped > 0  # capacity dropped assignments, padding routed included


@pytest.mark.slow
def test_the_trainers_step_and_evaluation_feed_the_decoder_and_mask_the_padded_labels(tmp_path, capsys):
    """Trainer.step passes Batch.decoder_inputs and source_mask to the model and takes the loss over
    the labels loss_mask marks (its first loss is that of a forward with them); evaluate does the
    same; steps on one batch drive its loss down (gradients reach both stacks); the run's
    checkpoint records both stacks."""
    import json

    import torch.nn.functional as F

    from encdec_helpers import copy_source
    from moedsl.runtime.train import RunOptions, Trainer

    spec = load_spec(tiny_encdec(capacity_factor=2.0, **{"type: switch,": "type: switch, jitter: 0.0,"}))
    o = RunOptions.from_spec(spec, steps=2, batch=4, seq=8, warmup=0, eval_every=2, eval_batches=2,
                             out=tmp_path / "run", log_every=1, checkpoint_every=2)
    trainer = Trainer(spec, o)
    trainer.source = source = copy_source()

    def masked_loss(b):
        with torch.no_grad():
            logits = trainer.model(b.inputs, b.decoder_inputs, b.source_mask).output
        each = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none")
        return float(each[b.loss_mask.flatten()].mean())

    held_out = [source.batch(i, 4, 8, split="eval") for i in range(2)]
    assert not bool(held_out[0].loss_mask.all())  # padded labels that must not count
    trainer.model.eval()
    assert trainer.evaluate() == pytest.approx(sum(map(masked_loss, held_out)) / 2, rel=1e-5)
    b = source.batch(0, 4, 8)
    trainer.model.train()
    first = masked_loss(b)
    losses = [float(trainer.step(b, 3e-2).loss) for _ in range(25)]
    assert losses[0] == pytest.approx(first, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    trainer.fit()
    meta = next((tmp_path / "run").rglob("meta.json")).read_text()
    assert '"encoder"' in meta and '"decoder"' in meta

    # moedsl generate on the run: the prompt is the source; it prints the decoder's new ids
    import moedsl
    from moedsl.cli import main

    model = moedsl.load_model(str(tmp_path / "run"))
    want = moedsl.generate(model, [[5, 6, 7, 8]], max_new_tokens=4)[0, 1:].tolist()  # eos: the spec's
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "4",
                 "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == [want]
    # moedsl inspect: the text is the source and, shifted right, the decoder's input: both stacks' layers
    figures = moedsl.inspect(str(tmp_path / "run"), data="synthetic", tokens=32, seq=8, batch=4)
    assert [(f["layer"], f["assignments"]) for f in figures["layers"]] == [("layers.4", 32), ("layers.12", 32)]


def test_the_plan_counts_both_stacks_and_the_shared_table_once():
    from moedsl.compiler.plan import make_plan
    from moedsl.kinds import layer_kind

    spec = load_spec(tiny_encdec())
    plan = make_plan(spec, compile_graph(spec, device="meta", target="cpu"))
    built = sum(p.numel() for p in _model(tiny_encdec())[1].parameters())
    assert plan.params_total == plan.params_on_device == built
    per_stack = {s: sum(layer_kind(x.kind).flops(x.config, spec.model, spec.train.seq_len) for x in spec.stack(s))
                 for s in ("encoder", "decoder")}
    assert per_stack["encoder"] > 0 and per_stack["decoder"] > 0
    assert plan.flops_per_token_forward == pytest.approx(per_stack["encoder"] + per_stack["decoder"])


# ------------------------------------------------------------------ generation

def _built(capacity_factor: float = 8.0):
    from moedsl.api import build_model

    spec = load_spec(tiny_encdec(capacity_factor=capacity_factor))
    return spec, build_model(spec, seed=3, dtype=torch.float32).eval()


def test_decoding_with_self_and_cross_attention_caches_equals_the_full_forward():
    """The encoder graph's output is the full forward's encoder; the decode graph fed the decoder's
    tokens (a prefill of 3, then one a step) gives the full forward's logits within 1e-5; after
    the first step the cross-attention reads its cached keys and values, not memory (garbage
    passed in its place changes nothing)."""
    from moedsl.nn.decode import DecodeCache
    from moedsl.runtime.generate import decode_module, encoder_module

    spec, model = _built()
    source, source_mask, dec_in, _, _ = copy_batch(3, 9, seed=5)
    with torch.no_grad():
        full = model(source, dec_in, source_mask).output  # [B, T, V]
        memory = encoder_module(model)(source, source_mask).output
        dec = decode_module(model)
        cache = DecodeCache(3, dec_in.shape[1])
        steps = [dec(dec_in[:, :3], cache, 0, memory, source_mask).output]
        cross = [k for k in cache.tensors if k.endswith("cross_attention")]
        assert len(cross) == 2 and cache.tensors[cross[0]][0].shape == (3, 2, 9, 8)  # [B, H, S, Dh] once
        for t in range(3, dec_in.shape[1]):
            steps.append(dec(dec_in[:, t:t + 1], cache, t, torch.randn_like(memory) * 100, source_mask).output)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_greedy_generation_with_caches_equals_greedy_by_repeated_full_forwards():
    """Sources of different lengths, right-padded: each row's greedy ids from moedsl.generate (encode
    once, decode with caches) are those of argmax over the full forward, re-run for each token."""
    from moedsl.runtime.generate import generate

    spec, model = _built()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    got = generate(model, prompts, max_new_tokens=8, eos_token_id=None)
    source, mask = torch.zeros(3, 7, dtype=torch.int64), torch.zeros(3, 7, dtype=torch.bool)
    for b, p in enumerate(prompts):
        source[b, :len(p)], mask[b, :len(p)] = torch.tensor(p), True
    ids = torch.zeros(3, 1, dtype=torch.int64)  # decoder_start_id
    with torch.no_grad():
        for _ in range(8):
            nxt = model(source, ids, mask).output[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(got, ids)
    assert len(set(map(tuple, got[:, 1:].tolist()))) == 3  # the rows read their own sources


def test_generation_stops_at_the_specs_eos_and_refuses_a_bad_source():
    from moedsl.errors import UserError
    from moedsl.runtime.generate import generate

    spec, model = _built()
    free = generate(model, [[5, 6, 7]], max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, 2])  # make the second new token the end
    model.spec = load_spec(tiny_encdec(8.0, **{"eos_id: 1": f"eos_id: {eos}"}))
    timings = {}
    stopped = generate(model, [[5, 6, 7]], max_new_tokens=6, timings=timings)
    assert torch.equal(stopped, free[:, :3]) and timings["stopped"] == ["eos"]
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate(model, [[5, 99]], max_new_tokens=2)
    with pytest.raises(UserError, match="is empty"):
        generate(model, torch.tensor([[5, 6]]), max_new_tokens=2, attention_mask=torch.tensor([[0, 0]]))


def test_a_bfloat16_autocast_step_stays_close_to_float32():
    """Under bfloat16 autocast (model.dtype: bfloat16 runs so) the relative bias, the float masks and
    the cross-attention compute in the autocast dtype: the loss within 2% of float32's, and every
    gradient finite."""
    spec, model = _model(tiny_encdec(capacity_factor=8.0))
    source, source_mask, dec_in, labels, loss_mask = copy_batch(4, 10, seed=7)

    def loss(amp):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(source, dec_in, source_mask)
        each = torch.nn.functional.cross_entropy(out.output.float().flatten(0, 1), labels.flatten(), reduction="none")
        value = each[loss_mask.flatten()].mean()
        value.backward()
        return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, _ = loss(False)
    half, grads = loss(True)
    assert half == pytest.approx(full, rel=2e-2)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()) and len(grads) > 40


def test_relative_positions_in_a_single_stack_decode_as_the_full_forward_does():
    """positions: relative is the stack's, not only an encoder-decoder's: a decoder-only model's one
    table (``relative_bias``) over causal self-attention; left-padded prompts decode (the
    distances are slot minus slot) with the logits the full forward gives each real row."""
    from moedsl.api import build_model
    from moedsl.runtime.generate import generate

    text = """\
moedsl: 1
name: tiny-relative
model: {vocab_size: 40, d_model: 16, max_seq_len: 32}
layers:
  - embedding: {}
  - repeat: 2
    block:
      - attention: {heads: 2, positions: relative, scaled: false, relative_buckets: 8, relative_max_distance: 16}
      - ffn: {hidden: 32}
  - norm: {}
  - head: {}
"""
    spec = load_spec(text)
    model = build_model(spec, seed=1, dtype=torch.float32).eval()
    assert "relative_bias.weight" in dict(model.named_parameters())
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    got = generate(model, prompts, max_new_tokens=5, eos_token_id=None)
    for b, p in enumerate(prompts):  # each row alone, greedy by full forwards
        ids = torch.tensor([p])
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, model(ids).output[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got[b, -len(p) - 5:].tolist() == ids[0].tolist()


def test_an_encoder_decoder_fed_plain_token_rows_is_refused_in_one_line(tmp_path):
    from moedsl.errors import MoedslError
    from moedsl.runtime.train import RunOptions, Trainer

    from moedsl.runtime.data import Synthetic

    spec = load_spec(tiny_encdec())
    trainer = Trainer(spec, RunOptions.from_spec(spec, steps=1, batch=4, seq=8, out=tmp_path / "run"))
    trainer.source = Synthetic(40, 0)  # a decoder-only model's rows (an enc-dec's own synthetic data is pairs)
    with pytest.raises(MoedslError, match="trains on source/target pairs, but the data synthetic gives plain"):
        trainer.step(trainer.source.batch(0, 4, 8), 1e-3)


@pytest.mark.slow
def test_generation_on_two_processes_gives_the_ids_of_one(tmp_path):
    """moedsl generate --nproc 2: the experts split over two gloo processes, the encoder graph's and
    the decode graph's all-to-alls bound; rank 0 prints the ids one process generates."""
    import json
    import subprocess
    import sys

    import moedsl
    from encdec_helpers import copy_source
    from moedsl.runtime.train import RunOptions, Trainer

    spec = load_spec(tiny_encdec(capacity_factor=8.0))
    trainer = Trainer(spec, RunOptions.from_spec(spec, steps=3, batch=4, seq=8, lr=1e-2, warmup=0, eval_every=3,
                                                 eval_batches=1, out=tmp_path / "run", checkpoint_every=3))
    trainer.source = copy_source()
    trainer.fit()
    p = subprocess.run([sys.executable, "-m", "moedsl", "generate", str(tmp_path / "run"), "--prompt-ids",
                        "5,6,7,8,9", "--max-new-tokens", "6", "--batch", "2", "--json", "--nproc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    one = moedsl.generate(moedsl.load_model(str(tmp_path / "run")), [[5, 6, 7, 8, 9]] * 2, 6)[:, 1:].tolist()
    assert json.loads(lines[0])["ids"] == one


@pytest.mark.parametrize("option, value, flag", [("pack", "documents", "--pack"), ("cuda_graphs", "on", "--cuda-graphs"),
                                                 ("compile", "on", "--compile"), ("recompute", "layers", "--recompute")])
def test_what_an_encoder_decoders_step_does_not_do_is_refused_naming_the_option(option, value, flag):
    from dataclasses import replace

    from moedsl.runtime.preflight import option_problems
    from moedsl.runtime.train import RunOptions

    spec = load_spec(tiny_encdec())
    o = replace(RunOptions.from_spec(spec), **{option: value})
    problems = [p for p in option_problems(spec, o, {option: flag}) if "encoder-decoder" in p]
    assert len(problems) == 1 and problems[0].startswith(f"moedsl: error: {flag} {value!r}: not for an encoder-decoder")
    assert option_problems(spec, RunOptions.from_spec(spec), {}) == []


# ------------------------------------------------------------------ a resume in the middle

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_span_corruption_run_on_two_processes_resumed_in_the_middle_repeats_the_uninterrupted_one(tmp_path, dtype):
    """Two gloo processes, a capacity that drops (factor 0.5), span corruption on pystdlib: the run
    resumed from its step-3 checkpoint computes steps 4 to 6 exactly as the uninterrupted run did
    (the same losses, drops and held-out loss): the corrupted batches are a function of (seed,
    step, row) and the checkpoint holds everything else, in float32 and under bfloat16 autocast."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    text = tiny_encdec(capacity_factor=0.5, **{
        "vocab_size: 40": "vocab_size: 384", "pad_id: 0, eos_id: 1, decoder_start_id: 0":
        "pad_id: 256, eos_id: 257, decoder_start_id: 256", "norm_eps: 1.0e-6,": f"norm_eps: 1.0e-6, dtype: {dtype},",
        "seq_len: 12,": "seq_len: 32, objective: span_corruption, data: pystdlib, eval_every: 3, eval_batches: 1,"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "run"
    run = [sys.executable, "-m", "moedsl", "run", str(spec), "--nproc", "2", "--steps", "6", "--checkpoint-every",
           "3", "--out", str(out), "--no-progress", "--ignore-memory-check"]

    def metrics() -> list:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["dropped"], r.get("eval_loss")) for r in rows]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = metrics()
    assert [s for s, *_ in whole] == [1, 2, 3, 4, 5, 6] and all(d > 0 for _, _, d, _ in whole)  # tokens dropped
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    r = subprocess.run(run + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics() == whole


# ------------------------------------------------------------------ T5's embedding init

@pytest.mark.parametrize("init_std,most", [(None, None), (1.0, 0.1)])
def test_t5s_unit_embedding_init_routes_random_tokens_apart_where_the_default_init_drops_them(init_std, most):
    """switch-t5-small at init, 4 rows of 32 random bytes each side: with the token table drawn from
    N(0, 1) (T5's and Switch's init, ``embedding: {init_std: 1.0}``) the first MoE layer's inputs
    differ by token and under 10% of its assignments overflow capacity 1.25; with the default
    0.02 the bidirectional attention's row means dominate the residual stream, the tokens of a
    row route alike and over 30% are dropped."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "specs" / "switch-t5-small.yaml").read_text()
    if init_std is None:
        text = text.replace("  - embedding: {init_std: 1.0}\n", "  - embedding: {}\n")
    spec, model = _model(text)
    std = float(model.embedding.weight.detach().std())
    assert std == pytest.approx(init_std or spec.model.init_std, rel=0.05)
    g = torch.Generator().manual_seed(0)
    source, target = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)
    first = model(source, target, None).router_stats[0]  # the encoder's first MoE layer
    dropped = float(first.dropped) / source.numel()
    assert dropped < most if most else dropped > 0.3


def test_a_text_prompt_is_an_encoder_decoders_source_ending_with_eos_as_in_training(tmp_path):
    """``moedsl generate --prompt TEXT`` on an encoder-decoder: the source is the text's ids then
    model.eos_id, as every training source ends (runtime/seq2seq.py) and as T5's tokenizer writes
    them; a prompt already ending with eos gets no second one, and --prompt-ids are taken as given."""
    from types import SimpleNamespace

    from moedsl.runtime.generate_cli import _prompt

    spec = load_spec(tiny_encdec(**{"vocab_size: 40": "vocab_size: 384", "pad_id: 0, eos_id: 1, decoder_start_id: 0":
                                    "pad_id: 256, eos_id: 257, decoder_start_id: 256"}))
    source = SimpleNamespace(spec=spec, folders=[])

    def ids(prompt=None, prompt_ids=None):
        return _prompt(SimpleNamespace(prompt=prompt, prompt_ids=prompt_ids), source)[1]

    assert ids(prompt="ab") == [97, 98, 257]
    assert ids(prompt_ids="97,98") == [97, 98]
    assert ids(prompt_ids="97,98,257") == [97, 98, 257]


@pytest.mark.parametrize("name", ["switch-t5-small", "t5-small-dense"])
def test_the_example_encoder_decoders_decode_with_caches_as_their_full_forward(name):
    """The CPU-sized example specs (T5's N(0, 1) embedding): the decode graph fed the decoder's
    tokens (a prefill of 4, then one a step) gives the full forward's logits within 1e-5 (relative
    to their size). The evaluation capacity is raised to 8 (no drop): a decode step routes each new
    token on its own, where the full forward's tokens share the capacity. The larger published
    specs compile only on the meta device (tests/test_spec_language.py)."""
    from pathlib import Path

    from moedsl.api import build_model
    from moedsl.nn.decode import DecodeCache
    from moedsl.runtime.generate import decode_module, encoder_module

    text = (Path(__file__).resolve().parents[1] / "specs" / f"{name}.yaml").read_text()
    spec = load_spec(text.replace("eval_capacity_factor: 2.0", "eval_capacity_factor: 8.0"))
    model = build_model(spec, seed=0, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    source, dec_in = torch.randint(0, 256, (2, 24), generator=g), torch.randint(0, 256, (2, 10), generator=g)
    source_mask = torch.ones_like(source, dtype=torch.bool)
    source_mask[1, 17:] = False  # a padded second row
    with torch.no_grad():
        full = model(source, dec_in, source_mask).output
        memory = encoder_module(model)(source, source_mask).output
        dec, cache = decode_module(model), DecodeCache(2, dec_in.shape[1])
        steps = [dec(dec_in[:, :4], cache, 0, memory, source_mask).output]
        steps += [dec(dec_in[:, t:t + 1], cache, t, memory, source_mask).output for t in range(4, dec_in.shape[1])]
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())
