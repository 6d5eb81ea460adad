"""Generation with a KV cache: the decode graph against the full forward for every example spec,
greedy ids against transformers' generate for every registered Hugging Face family, sampling,
left padding, the CLI and its refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moedsl
from moedsl.cli import main
from moedsl.errors import UserError
from moedsl.nn.attention import Attention
from moedsl.nn.decode import DecodeCache
from moedsl.nn.experts import Experts
from moedsl.nn.gates import Gate as GateModule
from moedsl.hf import registered
from moedsl.runtime.generate import decode_module, left_pad, pick

ROOT = Path(__file__).resolve().parents[1]
# the decoder-only examples: an encoder-decoder's decoding (the encoder graph, the cross-attention
# cache) is tests/test_encoder_decoder.py's, for its example specs too
SPECS = [p for p in sorted((ROOT / "specs").glob("*.yaml")) if not moedsl.load_spec(p).encoder_decoder]
HUGE = 50_000_000  # parameters: the specs that compile only on the meta device


def _params(spec) -> int:
    gm, _ = moedsl.compile(spec)
    return sum(p.numel() for p in gm.parameters())


def _equal_before_drops(model, ids: torch.Tensor, decoded: torch.Tensor) -> int:
    """Assert that a decode graph's logits ``decoded`` [B, T, V] over ``ids`` [B, T] equal the full
    forward's (``model(ids)``) at each position before the first token of its row that the full
    forward drops an assignment of, in any layer; returns how many positions that compared.

    A decode graph routes each token alone, and a lone token always fits its capacity; the full
    forward routes its declared routing groups at the declared capacity, where tokens compete for
    slots. Until a row's first drop the two compute the same thing: no token of the row up to
    there lost an expert, and attention reads only the row's earlier tokens."""
    B, T = ids.shape
    dropped = []

    def record(module, args, r):
        routed = torch.ones_like(r.slot, dtype=torch.bool) if r.routed is None else r.routed
        dropped.append(r.token[(r.slot < 0) & routed])

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, GateModule)]
    try:
        with torch.no_grad():
            full = model(ids).output
    finally:
        for h in hooks:
            h.remove()
    first = torch.full((B,), T)
    for tok in dropped:  # tokens of the flattened [B·T] batch
        first = first.scatter_reduce(0, tok // T, tok % T, "amin")
    for b in range(B):
        n = int(first[b])
        assert torch.allclose(decoded[b, :n], full[b, :n], rtol=0, atol=1e-5), b
    return int(first.sum())


def _set_gates(spec, **options):
    """``spec`` with ``options`` in every MoE layer's gate."""
    data = json.loads(json.dumps(spec.data))

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("moe"), dict) and "gate" in x["moe"]:
                x["moe"]["gate"].update(options)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data["layers"])
    return moedsl.load_spec(data, source=spec.source)


def _random_routing(spec) -> bool:
    """GShard's random second expert draws by token index: the decode graph keys it by (row,
    position), the full forward by index in the batch."""
    return any(layer.config.gate.type == "gshard" and layer.config.gate.second_expert == "random"
               for layer in spec.moe_layers)


def _decodable(path):
    """The spec at ``path``, or a skip: one that does not decode (its refusals are checked by
    test_cached_decoding_equals_the_full_forward_for_every_example_spec) or too big to build."""
    spec = moedsl.load_spec(path)
    if spec.model.input != "tokens" or any(layer.config.gate.type == "expert_choice" for layer in spec.moe_layers):
        pytest.skip(f"{path.name} does not decode")
    params = _params(spec)
    if params > HUGE:
        pytest.skip(f"{path.name}: {params:,} parameters compile only on the meta device")
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_cached_decoding_equals_the_full_forward_for_every_example_spec(path):
    spec = moedsl.load_spec(path)
    if spec.model.input != "tokens":
        with pytest.raises(UserError, match="only a model over tokens generates"):
            decode_module(moedsl.build_model(spec, seed=0, dtype=torch.float32))
        return
    if _params(spec) > HUGE:
        pytest.skip(f"{path.name}: {_params(spec):,} parameters compile only on the meta device")
    if any(layer.config.gate.type == "expert_choice" for layer in spec.moe_layers):
        with pytest.raises(UserError, match=r"expert-choice\.yaml:\d+: .*moe \(layers\.\d+\): expert choice"):
            decode_module(moedsl.build_model(spec, seed=0, dtype=torch.float32))
        return
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32).eval()  # capacities as declared
    dec = decode_module(model)
    B, T, P = 2, 12, 5
    ids = torch.randint(0, spec.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = dec(ids, DecodeCache(B, T), 0).output
        cache = DecodeCache(B, T)
        steps = [dec(ids[:, :P], cache, 0).output]  # prefill, then one token a step
        steps += [dec(ids[:, i:i + 1], cache, i).output for i in range(P, T)]
        stepped = torch.cat(steps, dim=1)
        assert (stepped - full).abs().max().item() <= 1e-5
    if not _random_routing(spec):
        compared = _equal_before_drops(model, ids, full)
        assert compared == B * T or any(layer.config.gate.has_capacity for layer in spec.moe_layers)
        assert compared > 0


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_static_decoding_equals_dynamic_decoding_for_every_example_spec(path):
    """The decode step CUDA graphs capture (a static graph over a static cache: the slot a 0-dim
    tensor, keys written with index_copy_ and every slot attended with the unwritten masked, the
    experts' rows padded to the step's assignment count, no host read) computes what the dynamic
    step computes, run eagerly here on the CPU: prefill, then one token a step, left padding."""
    from moedsl.nn.grouped import static_shapes

    spec = _decodable(path)
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32).eval()
    dynamic, static = decode_module(model), decode_module(model, static=True)
    B, T, P = 2, 12, 5
    ids = torch.randint(0, spec.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([0, 2])  # row 1 left-padded by two slots
    with torch.no_grad():
        outs = {}
        for name, dec, cache in (("dynamic", dynamic, DecodeCache(B, T, pad)),
                                 ("static", static, DecodeCache(B, T, pad, static=True))):
            steps = [dec(ids[:, :P], cache, 0).output]
            with static_shapes():
                for i in range(P, T):
                    start = torch.tensor(i) if name == "static" else i
                    steps.append(dec(ids[:, i:i + 1], cache, start).output)
            outs[name] = torch.cat(steps, dim=1)
    real = torch.arange(T)[None, :] >= pad[:, None]  # padding slots' outputs are read by nothing
    assert (outs["static"] - outs["dynamic"])[real].abs().max().item() <= 1e-5


@pytest.mark.slow
def test_cuda_graphs_on_refused_off_a_gpu_and_capture_failure_decodes_eagerly(monkeypatch, capsys):
    """``graphs="on"`` where nothing can be captured is one clear error; when capture itself
    fails under "auto", generate says so in one line and decodes eagerly over the static cache,
    the same ids as the dynamic decoder."""
    from moedsl.runtime import generate as gen

    model = _switch()
    prompts = [[5, 6, 7, 8], [9, 10]]
    with pytest.raises(UserError, match="CUDA graphs on: cannot capture, the model is on the CPU"):
        moedsl.generate(model, prompts, 4, graphs="on")
    with pytest.raises(UserError, match="graphs must be auto, on or off"):
        moedsl.generate(model, prompts, 4, graphs="yes")
    want = moedsl.generate(model, prompts, 6, graphs="off")

    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gen, "_use_graphs", lambda graphs, device: True)
    monkeypatch.setattr(gen, "GraphedDecodeStep", refuse)
    timings: dict = {}
    got = moedsl.generate(model, prompts, 6, timings=timings)
    assert torch.equal(got, want) and timings["graphs"] is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA graphs off: capture failed (RuntimeError: operation not permitted" in err


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_fused_decode_moe_layers_equal_the_packed_path_for_every_example_spec(path, dtype, monkeypatch):
    """On one process a decode graph's MoE layer is one DecodeMoE call (the gate's choice, each
    expert's rows through views of its weights, each token's outputs summed in expert order). It
    must give the packed path's outputs, aux losses and expert loads bit for bit, at batch 1 and
    3 (with left padding), in float32 and bfloat16 (whose combine sums through index_add), for
    every gate and expert kind of the example specs (those it does not take, such as GShard's
    unrouted second choices, run the packed path inside it)."""
    from moedsl.compiler import decode_graph as compiler_decode
    from moedsl.nn.decode import DecodeMoE

    spec = _decodable(path)
    model = moedsl.build_model(spec, seed=0, dtype=dtype).eval()
    fused = decode_module(model)
    assert sum(isinstance(m, DecodeMoE) for m in fused.modules()) == len(spec.moe_layers)
    model.__dict__.pop("_moedsl_decode")
    monkeypatch.setattr(compiler_decode, "fuse_decode_moe", lambda graph, modules: (graph, False))
    packed = decode_module(model)
    for B, pad in ((1, [0]), (3, [0, 3, 1])):
        ids = torch.randint(0, spec.model.vocab_size, (B, 9), generator=torch.Generator().manual_seed(B))
        outs = []
        for dec in (fused, packed):
            cache, steps = DecodeCache(B, 9, torch.tensor(pad)), []
            with torch.no_grad():
                steps.append(dec(ids[:, :4], cache, 0))
                steps += [dec(ids[:, i:i + 1], cache, i) for i in range(4, 9)]
            outs.append(steps)
        for a, b in zip(*outs):
            assert torch.equal(a.output, b.output) and torch.equal(a.aux_loss, b.aux_loss)
            for sa, sb in zip(a.router_stats, b.router_stats):
                assert torch.equal(sa.expert_load, sb.expert_load) and sa.assignments == sb.assignments


def _switch(seed=0, **model):
    data = moedsl.load_spec(ROOT / "specs" / "switch.yaml").data
    data = {**data, "model": {**data["model"], **model}}
    return moedsl.build_model(moedsl.load_spec(data), seed=seed, dtype=torch.float32).eval()


def _learned_positions():
    """specs/mixtral.yaml with learned absolute positions in place of rotary ones (no example spec
    over tokens has them); its MoE layers are dropless, so the full forward is the reference at
    every position."""
    data = json.loads(json.dumps(moedsl.load_spec(ROOT / "specs" / "mixtral.yaml").data))
    data["layers"][0] = {"embedding": {"positions": "learned"}}
    data["layers"][1]["block"][0]["attention"]["positions"] = "none"
    return moedsl.build_model(moedsl.load_spec(data), seed=0, dtype=torch.float32).eval()


def _example(name):
    return moedsl.build_model(moedsl.load_spec(ROOT / "specs" / f"{name}.yaml"), seed=0, dtype=torch.float32).eval()


MODELS = {"switch": _switch, "learned-positions": _learned_positions,
          "lstm": lambda: _example("shazeer-lstm-moe"), "latent-attention": lambda: _example("deepseek-v3-small"),
          "hash": lambda: _example("hash")}


def test_learned_positions_decode_as_the_full_forward():
    model = _learned_positions()
    dec = decode_module(model)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).output
        cache = DecodeCache(2, 8)
        steps = [dec(ids[:, :3], cache, 0).output] + [dec(ids[:, i:i + 1], cache, i).output for i in range(3, 8)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_a_lone_decoding_token_gets_a_slot_in_every_expert_under_round_capacity():
    """V-MoE's rounding gives a lone token of specs/switch.yaml round(2.0 · 1 / 8) = 0 slots at
    evaluation; it gets one. Generating, every MoE layer computes every token, in the prefill and
    in each step, through the dynamic decode graph (a DecodeMoE call a layer) and the static one
    (the padded [E, C, d] buffers CUDA graphs capture); decoding equals the full forward at the
    declared capacity before its first drop."""
    from moedsl.nn.decode import DecodeMoE
    from moedsl.nn.grouped import static_shapes

    spec = _set_gates(moedsl.load_spec(ROOT / "specs" / "switch.yaml"), capacity_rounding="round")
    cfg = spec.moe_layers[0].config
    E, gate = cfg.experts.count, cfg.gate
    assert round(gate.eval_capacity_factor * gate.k / E) == 0 and gate.capacity(1, E, training=False) == 1
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32).eval()
    dec, outs = decode_module(model), []
    for m in dec.modules():
        if isinstance(m, DecodeMoE):
            m.register_forward_hook(lambda module, args, out: outs.append(out[0]))
    N = 4
    ids = moedsl.generate(model, [[5, 6, 7, 8, 9], [10, 11]], N)
    assert len(outs) == N * len(spec.moe_layers)  # the prefill, then N - 1 steps
    assert all(bool((y.abs().amax(dim=-1) > 0).all()) for y in outs)  # every token's MoE output

    static, pad = decode_module(model, static=True), torch.tensor([0, 3])
    cache = DecodeCache(2, ids.shape[1], pad, static=True)
    with torch.no_grad(), static_shapes():
        steps = [static(ids[:, :5], cache, 0)] + [static(ids[:, i:i + 1], cache, torch.tensor(i))
                                                   for i in range(5, ids.shape[1])]
    for out in steps:
        for stats in out.router_stats:
            assert int(stats.dropped) == 0 and int(stats.tokens_per_expert.sum()) == stats.assignments > 0

    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoded = dec(ids, DecodeCache(2, 10), 0).output
    assert _equal_before_drops(model, ids, decoded) > 0


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(MODELS))
def test_left_padded_rows_generate_what_each_prompt_generates_alone(which):
    model = MODELS[which]()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200, 100, 50, 25], [1]]
    together = moedsl.generate(model, prompts, 10)
    T = max(len(p) for p in prompts)
    for b, p in enumerate(prompts):
        alone = moedsl.generate(model, [p], 10)
        assert torch.equal(together[b, T - len(p):], alone[0]), b


def test_decoding_follows_weights_changed_after_the_first_generate():
    """Decoding projects q, k and v with one stacked weight and reads each expert through views,
    both kept between steps: a weight changed in place after a generate (a training step, a
    loaded checkpoint) must be what the next generate uses, as the full forward does (dropless
    MoE layers: the full forward is the reference at every position)."""
    model = _example("mixtral")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    moedsl.generate(model, ids, 2)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    with torch.no_grad():
        attn.wk.weight.mul_(-3.0)
        attn.wv.weight.add_(0.05)
        experts.w_out.mul_(-2.0)
        experts.w_in.data = experts.w_in.data * 1.5  # replaced: new storage
    dec = decode_module(model)
    with torch.no_grad():
        full = model(ids).output
        cache = DecodeCache(2, 6)
        steps = [dec(ids[:, :2], cache, 0).output] + [dec(ids[:, i:i + 1], cache, i).output for i in range(2, 6)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_sliding_window_cache_sees_only_the_window():
    data = moedsl.load_spec(ROOT / "specs" / "mixtral.yaml").data
    layers = json.loads(json.dumps(data["layers"]))
    layers[1]["block"][0]["attention"]["sliding_window"] = 3
    spec = moedsl.load_spec({**data, "layers": layers})
    model = moedsl.build_model(spec, seed=0, dtype=torch.float32).eval()
    dec = decode_module(model)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = dec(ids, DecodeCache(1, 10), 0).output
        cache = DecodeCache(1, 10)
        steps = [dec(ids[:, :1], cache, 0).output] + [dec(ids[:, i:i + 1], cache, i).output for i in range(1, 10)]
        assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
        assert (full - model(ids).output).abs().max().item() <= 1e-5


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = _switch()
    prompts = [[10, 20, 30], [40, 50, 60]]
    a = moedsl.generate(model, prompts, 12, temperature=1.0, seed=3)
    b = moedsl.generate(model, prompts, 12, temperature=1.0, seed=3)
    c = moedsl.generate(model, prompts, 12, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = moedsl.generate(model, prompts, 12)
    assert torch.equal(moedsl.generate(model, prompts, 12, temperature=0.7, top_k=1, seed=5), greedy)


def test_top_p_keeps_the_smallest_nucleus_as_transformers_defines_it():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5, 0.9):
        theirs = transformers.TopPLogitsWarper(p)(None, logits.clone())
        allowed = theirs > float("-inf")
        for seed in range(20):
            got = pick(logits, 1.0, None, p, torch.Generator().manual_seed(seed))
            assert bool(allowed[torch.arange(4), got].all())
    # top_p that keeps one token is greedy
    assert torch.equal(pick(logits, 1.0, None, 1e-6, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_a_prompt_id_outside_the_vocabulary_or_too_long_is_one_line():
    model = _switch()
    with pytest.raises(UserError, match="token id 256 at position 1, outside the vocabulary 0..255"):
        moedsl.generate(model, [[1, 256]], 4)
    with pytest.raises(UserError, match="120 tokens plus 10 new tokens is 130, past the model's 128"):
        moedsl.generate(model, [[1] * 120], 10)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("model_type", sorted(m for m, f in registered().items() if not f.encoder_decoder))
def test_greedy_ids_equal_transformers_generate_for_every_family(tmp_path, model_type, batch):
    """32 new tokens from each registered decoder-only family's tiny model: batch 1, and batch 4 with
    prompts of different lengths (left-padded in transformers with an attention_mask). The
    encoder-decoders' greedy ids: tests/test_hf_encdec.py."""
    transformers = pytest.importorskip("transformers")
    fam = registered()[model_type]
    torch.manual_seed(0)
    cfg = getattr(transformers, fam.config_class)(**fam.tiny_config)
    ref = getattr(transformers, fam.architectures[0])(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    model = moedsl.load_model(tmp_path / "imp")
    g = torch.Generator().manual_seed(7)
    lengths = [9] if batch == 1 else [9, 4, 7, 1]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(prompts)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    ours = moedsl.generate(model, ids, 32, attention_mask=mask, eos_token_id=None)  # as ref: no eos
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Mixtral, imported (with its transformers greedy continuation of a prompt)."""
    pytest.importorskip("transformers")
    from hf_helpers import import_tiny_mixtral

    return import_tiny_mixtral(tmp_path_factory.mktemp("gen"))


def test_cli_prints_the_new_ids_as_json(imported, capsys):
    model = moedsl.load_model(imported)
    want = moedsl.generate(model, [[1, 2, 3]], 8)[0, 3:].tolist()
    assert main(["generate", str(imported), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json",
                 "--batch", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == [want, want] and out["tokens_per_s"] > 0 and "text" not in out
    assert out["device"] == "cpu" and out["cuda_graphs"] is False  # a CPU decodes eagerly


def test_cli_refuses_a_gpu_or_cuda_graphs_it_cannot_have(imported, capsys):
    assert main(["generate", str(imported), "--prompt-ids", "1", "--max-new-tokens", "2", "--device", "cpu",
                 "--cuda-graphs", "on"]) == 2
    assert capsys.readouterr().err.strip() == ("moedsl: error: generate: CUDA graphs on: cannot capture, the model "
                                                "is on the CPU")
    if not torch.cuda.is_available():
        assert main(["generate", str(imported), "--prompt-ids", "1", "--max-new-tokens", "2", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == "moedsl: error: --device cuda: no CUDA device is available here"
    assert main(["generate", str(imported), "--prompt-ids", "1", "--max-new-tokens", "2", "--device", "cuda",
                 "--nproc", "2"]) == 2  # refused before any worker starts
    assert capsys.readouterr().err.strip() == ("moedsl: error: --device cuda: generating with --nproc runs on the CPU "
                                                "(gloo); leave out --device or --nproc")


@pytest.mark.slow
def test_cli_generates_the_same_ids_on_two_processes(imported):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "moedsl", "generate", str(imported), "--prompt-ids", "5,6,7,8",
                        "--max-new-tokens", "12", "--batch", "3", "--json", "--nproc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 prints
    one = moedsl.generate(moedsl.load_model(imported), [[5, 6, 7, 8]] * 3, 12)[:, 4:].tolist()
    assert json.loads(lines[0])["ids"] == one


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "1,64"], "token id 64 at position 1, outside the vocabulary 0..63"),
    (["--prompt-ids", ",".join(["1"] * 60)], "60 tokens plus 8 new tokens is 68, past the model's 64"),
    (["--prompt-ids", "1,x"], "--prompt-ids '1,x': expected whole numbers"),
])
@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]], ids=["1", "2"])
def test_cli_refuses_bad_prompts_in_one_line_with_exit_2(imported, capsys, argv, message, nproc):
    assert main(["generate", str(imported), "--max-new-tokens", "8", *argv, *nproc]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_folder_with_no_checkpoint_in_one_line_with_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and len(err.strip().splitlines()) == 1


def test_cli_prompt_text_goes_through_the_imports_tokenizer_json(imported, tmp_path, capsys):
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "imp"
    shutil.copytree(imported, folder)
    vocab = {f"w{i}": i for i in range(64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    assert main(["generate", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = moedsl.generate(moedsl.load_model(imported), [[1, 2, 3]], 6)[0, 3:].tolist()
    assert out["ids"] == [want] and out["text"] == [" ".join(f"w{i}" for i in want)]


def _eos_model(tmp_path, batch):
    """A tiny Mixtral saved with a generation_config.json whose eos is an id that its greedy
    continuations of ``batch`` prompts first reach at different steps (at batch > 1 with a second
    eos id never emitted: a list), imported; returns (transformers model, import folder,
    prompts [B, T], mask [B, T], the steps where each row stops, the eos id emitted)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    ref = transformers.MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in [5, 3, 6][:batch]]
    ids, mask = left_pad(prompts)
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        free = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]
    for eos in range(1, 64):  # the id whose first appearance differs between the rows
        first = [row.index(eos) if eos in row else None for row in free.tolist()]
        if None not in first and len(set(first)) == batch and max(first) > 0:
            break
    else:
        pytest.fail(f"no id stops the rows at different steps: {free.tolist()}")
    unused = next(i for i in range(1, 64) if i not in sum(free.tolist(), []))
    eos_ids = [unused, eos] if batch > 1 else eos  # several eos ids, one never emitted, or one
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = eos_ids, 1
    ref.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == eos_ids
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    return ref, tmp_path / "imp", ids, mask, first, eos


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_ids_stop_at_the_imports_eos_and_pad_finished_rows_as_transformers(tmp_path, batch):
    ref, imp, ids, mask, first, eos = _eos_model(tmp_path, batch)
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    timings: dict = {}
    ours = moedsl.generate(moedsl.load_model(imp), ids, 16, attention_mask=mask, timings=timings)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] == ids.shape[1] + max(first) + 1 < ids.shape[1] + 16  # stopped when the last row did
    assert timings["stopped"] == ["eos"] * batch
    new = ours[:, ids.shape[1]:]
    for b, s in enumerate(first):  # each row: its eos, then the pad id of the config
        assert new[b, s] == eos and (new[b, s + 1:] == 1).all()


def test_an_image_model_is_refused_in_one_line_not_a_type_error():
    model = moedsl.build_model(moedsl.load_spec(ROOT / "specs" / "vit-dense.yaml"), seed=0, dtype=torch.float32)
    with pytest.raises(UserError, match=r"model of image inputs \(model.input = image\).*needs model.input = tokens"):
        moedsl.generate(model, [[1, 2, 3]], 2)


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "1,,3"], "--prompt-ids '1,,3': expected whole numbers"),
    (["--prompt-ids", "1", "--top-k", "5"], "top_k and top_p filter sampling: give a temperature above 0"),
    (["--prompt-ids", "1", "--top-p", "0.5", "--temperature", "0"], "give a temperature above 0"),
    (["--prompt-ids", "1", "--stop", "end"], "--stop 'end': text needs a tokenizer.json"),
])
@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]], ids=["1", "2"])
def test_cli_refuses_empty_ids_and_filters_without_sampling_in_one_line(imported, capsys, argv, message, nproc):
    assert main(["generate", str(imported), "--max-new-tokens", "4", *argv, *nproc]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_experts_that_do_not_split_over_nproc_once_before_any_worker(imported, capsys, monkeypatch):
    import moedsl.runtime.launcher as launcher

    started = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: started.append(a))
    assert main(["generate", str(imported), "--prompt-ids", "1,2", "--max-new-tokens", "4", "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert not started and len(err.strip().splitlines()) == 1 and "3" in err, err


def test_api_stop_ids_and_eos_given_stop_rows_and_say_why(imported):
    model = moedsl.load_model(imported)
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = moedsl.generate(model, prompts, 10, eos_token_id=None)[:, 3:].tolist()
    eos, stop = free[0][2], free[1][4:6]  # row 0's third new token as eos; row 1's fifth and sixth as a stop

    def end(row):  # the step where a row ends, and why
        for s in range(len(row)):
            if row[s] == eos:
                return s, "eos"
            if s >= 1 and row[s - 1:s + 1] == stop:
                return s, "stop"
        return len(row) - 1, "length"

    ends = [end(row) for row in free]
    assert ends[0] != ends[1]
    timings: dict = {}
    got = moedsl.generate(model, prompts, 10, eos_token_id=[eos], stop=[stop], pad_token_id=0,
                          timings=timings)[:, 3:].tolist()
    last = max(s for s, _ in ends)
    assert timings["stopped"] == [why for _, why in ends]
    assert got == [row[:s + 1] + [0] * (last - s) for row, (s, _) in zip(free, ends)]


def test_cli_json_says_why_each_row_stopped_and_streams_without_json(imported, capsys):
    model = moedsl.load_model(imported)
    free = moedsl.generate(model, [[1, 2, 3]], 8, eos_token_id=None)[0, 3:].tolist()
    assert main(["generate", str(imported), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json",
                 "--stop", str(free[1])]) == 0
    out = json.loads(capsys.readouterr().out)
    k = free.index(free[1])
    assert out["stopped"] == ["stop"] and out["ids"] == [free[:k + 1]]
    assert main(["generate", str(imported), "--prompt-ids", "1,2,3", "--max-new-tokens", "8"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(imported), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--no-stream"]) == 0
    assert capsys.readouterr().out == streamed


def test_stop_text_goes_through_the_tokenizer_and_sampling_defaults_come_from_the_generation_config(
        imported, tmp_path, capsys):
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "imp"
    shutil.copytree(imported, folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 5}))
    given = moedsl.generate(moedsl.load_model(imported), [[1, 2, 3]], 8, temperature=0.7, top_k=5, seed=4,
                            eos_token_id=None)[0, 3:].tolist()
    assert given != moedsl.generate(moedsl.load_model(imported), [[1, 2, 3]], 8, eos_token_id=None)[0, 3:].tolist()
    assert moedsl.generate(moedsl.load_model(folder), [[1, 2, 3]], 8, seed=4)[0, 3:].tolist() == given
    assert main(["generate", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "8", "--seed", "4", "--json",
                 "--stop", f"w{given[2]}"]) == 0
    out = json.loads(capsys.readouterr().out)
    k = given.index(given[2])
    assert out["ids"] == [given[:k + 1]] and out["stopped"] == ["stop"]
    assert main(["generate", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "8", "--seed", "4"]) == 0
    assert capsys.readouterr().out == " ".join(f"w{i}" for i in given) + "\n"  # streamed, word by word


def test_sampling_settings_left_out_follow_the_generation_config_as_transformers_reads_it():
    from moedsl.runtime.generate import sampling

    assert sampling({}, None, None, None) == (0.0, None, None)  # no config: greedy
    assert sampling({"do_sample": False, "top_k": 3}, None, None, None) == (0.0, None, None)
    assert sampling({"do_sample": True}, None, None, None) == (1.0, 50, 1.0)  # transformers' defaults
    assert sampling({"do_sample": True, "top_k": 0, "temperature": 0.5}, None, None, None) == (0.5, None, 1.0)
    assert sampling({"do_sample": True, "temperature": 0.0, "top_k": 20}, None, None, None) == (0.0, None, None)
    assert sampling({"do_sample": True, "temperature": 0.5}, 0.9, 7, None) == (0.9, 7, 1.0)  # given wins
    assert sampling({"do_sample": True}, 0, None, None) == (0.0, None, None)
    with pytest.raises(UserError, match="give a temperature above 0"):
        sampling({"do_sample": True}, 0, 5, None)


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]], ids=["1", "2"])
def test_cli_refuses_an_image_model_in_one_line_with_exit_2(tmp_path_factory, capsys, nproc):
    run = tmp_path_factory.getbasetemp() / "vit-run"
    if not run.exists():
        assert main(["run", str(ROOT / "specs" / "vit-dense.yaml"), "--steps", "1", "--out", str(run), "--no-progress",
                     "--eval-batches", "1", "--ignore-memory-check"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt-ids", "1,2", "--max-new-tokens", "2", *nproc]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.input = image" in err and len(err.splitlines()) == 1, err


def test_stop_text_of_a_byte_level_run_is_its_utf8_bytes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "1", "--out", str(run), "--no-progress",
                 "--eval-batches", "1", "--ignore-memory-check"]) == 0
    capsys.readouterr()
    base = ["generate", str(run), "--prompt", "def f(", "--max-new-tokens", "12", "--json"]
    assert main(base) == 0
    free = json.loads(capsys.readouterr().out)["ids"][0]
    k = next(i for i, t in enumerate(free) if 32 < t < 127 and not chr(t).isdigit() and chr(t) != ",")
    assert main(base + ["--stop", chr(free[k])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == [free[:k + 1]] and out["stopped"] == ["stop"]
