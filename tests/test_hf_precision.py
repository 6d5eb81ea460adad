"""Every Hugging Face family in bfloat16 against transformers: the router computed as the family's
modeling file computes it, the tensors transformers keeps in float32 (DeepSeek-V3's
``_keep_in_fp32_modules_strict``) float32 through import, loading, training and export, and greedy
generation of the families' variants (sliding windows, yarn, groups) with its per-step logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl  # noqa: E402
import moedsl.runtime.generate as generation  # noqa: E402
from moedsl.cli import main  # noqa: E402
from moedsl.hf import registered  # noqa: E402
from moedsl.hf.files import Checkpoint  # noqa: E402
from moedsl.hf.reference import tiny_reference  # noqa: E402
from moedsl.nn.gates import Gate  # noqa: E402

FAMILIES = sorted(m for m, f in registered().items() if not f.encoder_decoder)  # decoder-only (AutoModelForCausalLM)
ROUTERS = ("TopKRouter", "TopkRouter")  # transformers' router classes: MixtralTopKRouter, DeepseekV3TopkRouter, ...


def _bf16_checkpoint(tmp: Path, model_type: str, over: dict | None = None) -> tuple:
    """A family's tiny model saved as transformers saves a bfloat16 model (its float32 tensors
    float32): (folder, the model transformers loads from it, its config). DeepSeek-V3's choice bias
    is 2 + U(0, 0.01)-sized, a spread small next to its size as a trained bias's, which bfloat16
    (steps of 2⁻⁶ at 2) cannot tell apart."""
    ref, cfg = tiny_reference(transformers, model_type, over)
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(2.0 + 0.01 * torch.rand(b.shape, generator=torch.Generator().manual_seed(2)))
    ref.save_pretrained(tmp / "hf32")
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf32", dtype=torch.bfloat16)
    half.save_pretrained(tmp / "hf")
    return tmp / "hf", transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval(), cfg


def _import(src: Path, out: Path) -> Path:
    assert main(["import", str(src), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory) -> tuple:
    """Each family's bfloat16 checkpoint and its import, shared by the tests of one family:
    (model_type, checkpoint folder, transformers' model, its config, import folder)."""
    tmp = tmp_path_factory.mktemp(request.param)
    src, ref, cfg = _bf16_checkpoint(tmp, request.param)
    return request.param, src, ref, cfg, _import(src, tmp / "imp")


def _tensors(folder: Path) -> dict:
    ck = Checkpoint(folder)
    return {name: ck.get(name) for name in ck.names}


def _tokens(cfg, n=8, t=64):
    return torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(1))


def _recorded(model, x, modules, record) -> tuple:
    """(logits of ``model`` on ``x``, [``record(module, inputs, output)`` of each of ``modules`` called])."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(record(m, args, out)))
             for m in modules]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return (out.logits if hasattr(out, "logits") else out.output), seen


def _hf_run(model, x) -> tuple:
    """(logits, [each router's (input [S, d], logits [S, E], chosen experts [S, k])])."""
    routers = [m for m in model.modules() if type(m).__name__.endswith(ROUTERS)]
    return _recorded(model, x, routers, lambda m, args, out: (args[0].reshape(-1, args[0].shape[-1]), out[0], out[2]))


def _our_run(model, x) -> tuple:
    """(logits, [each gate's chosen experts [S, k]])."""
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    return _recorded(model, x, gates, lambda m, args, r: r.expert.view(r.num_tokens, -1))


def _changed(a, b) -> float:
    """The fraction of tokens whose set of chosen experts differs."""
    return (a.sort(-1).values != b.sort(-1).values).any(-1).float().mean().item()


def test_router_computes_its_logits_as_the_familys_modeling_file_in_bfloat16(imported):
    """Each gate given the input transformers' router got: the same logits to the bit (Mixtral's,
    Qwen's, OLMoE's linear in bfloat16, DeepSeek-V3's in float32 with its float32 weight), and the
    same experts for every token but those whose k-th and (k+1)-th logits tie exactly (which
    torch.topk and moedsl break differently)."""
    model_type, _, ref, cfg, imp = imported
    if not registered()[model_type].routed:
        pytest.skip(f"{model_type} is dense: no router")
    model = moedsl.load_model(imp)
    _, routers = _hf_run(ref, _tokens(cfg))
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert len(gates) == len(routers) > 0
    for gate, (x, theirs, chosen) in zip(gates, routers):
        with torch.no_grad():
            ours = gate.linear(x, gate.weight)
            r = gate(x)
        assert torch.equal(ours, theirs.float())
        k = chosen.shape[-1]
        top = theirs.float().sort(-1, descending=True).values
        tied = top[:, k - 1] == top[:, k]
        differ = (r.expert.view(len(x), k).sort(-1).values != chosen.sort(-1).values).any(-1)
        assert not (differ & ~tied).any(), f"{int((differ & ~tied).sum())} of {len(x)} tokens"


def test_bfloat16_import_matches_transformers_logits_and_expert_choices(imported):
    """A bfloat16 checkpoint imported and loaded: the logits within bfloat16's rounding of
    transformers' (2% of their largest), each MoE layer's top-k sets equal for all but 1% of 512
    tokens (measured: at most 0.6%, all exact ties; DeepSeek-V3 with its bias rounded: 6-7%),
    and the family's float32 tensors float32 in the model, bit for bit the checkpoint's."""
    model_type, src, ref, cfg, imp = imported
    model = moedsl.load_model(imp)
    x = _tokens(cfg)
    theirs, routers = _hf_run(ref, x)
    ours, chosen = _our_run(model, x)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - theirs.float()).abs().max() <= 0.02 * theirs.float().abs().max()
    for (_, _, t), o in zip(routers, chosen):
        assert _changed(o, t) <= 0.01
    fam, on_disk = registered()[model_type], _tensors(src)
    state = dict(model.state_dict())
    kept = [n for n in on_disk if fam.keeps_float32(n)]
    for name in kept:  # DeepSeek-V3: model.layers.L.mlp.gate.{weight, e_score_correction_bias}
        ours_name = [t.name for t in fam.import_tensors(model.spec, {}, set(on_disk)) if t.sources == (name,)][0]
        assert state[ours_name].dtype == torch.float32, ours_name
        assert torch.equal(state[ours_name], on_disk[name]), name
    assert bool(kept) == (model_type == "deepseek_v3")


def test_bfloat16_round_trip_keeps_every_dtype_and_the_float32_tensors_bit_exact(tmp_path, imported):
    """import -> export of a bfloat16 checkpoint: each tensor in the original's dtype, the float32
    ones (DeepSeek-V3's router weight and choice bias) bit for bit, so transformers loads the
    export to the original's logits and top-k sets exactly. (Before: the export cast the bias to
    bfloat16: its 8 distinct values became 1.)"""
    _, src, ref, cfg, imp = imported
    assert main(["export", str(imp), "--out", str(tmp_path / "exp")]) == 0
    before, after = _tensors(src), _tensors(tmp_path / "exp")
    assert set(before) <= set(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype, name
        assert torch.equal(after[name], t), name  # bfloat16 -> bfloat16 and float32 -> float32: nothing rounded
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    x = _tokens(cfg)
    (l0, r0), (l1, r1) = _hf_run(ref, x), _hf_run(back, x)
    assert torch.equal(l0, l1)
    assert all(_changed(a[2], b[2]) == 0 for a, b in zip(r0, r1))


def test_training_step_updates_deepseek_router_in_float32_and_export_writes_it_float32(tmp_path):
    """One training step from a bfloat16 DeepSeek-V3 import: the router weight is updated in float32
    (values bfloat16 cannot hold) and the choice bias stays the imported float32 (rate 0); the run's
    export writes both float32, the rest bfloat16."""
    src, _, _ = _bf16_checkpoint(tmp_path, "deepseek_v3")
    imp = _import(src, tmp_path / "imp")
    assert main(["run", str(imp / "spec.yaml"), "--init", str(imp), "--steps", "1", "--batch", "2", "--seq", "8",
                 "--out", str(tmp_path / "run"), "--no-progress", "--eval-batches", "1",
                 "--ignore-memory-check"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    before, after = _tensors(src), _tensors(tmp_path / "exp")
    for name, t in before.items():
        assert after[name].dtype == t.dtype, name
        if name.endswith("mlp.gate.weight"):
            assert not torch.equal(after[name], t), name  # trained
            assert not torch.equal(after[name], after[name].bfloat16().float()), name  # in float32
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(after[name], t), name


@pytest.mark.parametrize("router_dtype", ["bfloat16", "float32"])
def test_router_linear_computes_in_router_dtype_in_training_as_in_inference(router_dtype):
    """Under bfloat16 autocast (training, float32 weights and residual stream) the router's linear
    computes in router_dtype as it does in a bfloat16 model: an imported Mixtral's bfloat16 (as
    transformers trains it), DeepSeek-V3's float32; the logits come out float32 for the softmax."""
    spec = {"moedsl": 1, "name": "r", "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 16,
                                                 "dtype": "bfloat16", "router_dtype": router_dtype},
            "layers": [{"embedding": {}}, {"moe": {"experts": {"count": 4, "hidden": 16, "activation": "swiglu"},
                                                    "gate": {"type": "topk", "k": 2, "drop_policy": "dropless"}}},
                       {"norm": {}}, {"head": {}}]}
    gate = next(m for m in moedsl.build_model(spec, dtype=torch.float32).modules() if isinstance(m, Gate))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    dt = getattr(torch, router_dtype)
    want = torch.nn.functional.linear(x.to(dt), gate.weight.to(dt)).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = gate.linear(x, gate.weight)
    assert trained.dtype == torch.float32
    assert torch.equal(trained, want)


def _variants() -> list:
    """(model_type, config overrides, dtype): every family's base config in bfloat16 (float32:
    tests/test_generate.py), and in both the variants that change what decoding caches, masks or
    routes: sliding windows, yarn rope scaling, DeepSeek-V3's expert groups."""
    fams = registered()
    pick = {"mixtral": ("sliding window",), "qwen2_moe": ("sliding layers",), "qwen3_moe": ("sliding window",),
            "deepseek_v3": ("4 groups", "yarn"), "mistral": ("sliding window",), "qwen2": ("sliding layers",),
            "qwen3": ("sliding layers",)}
    out = [pytest.param(model_type, {}, "bfloat16", id=f"{model_type}-bfloat16") for model_type in FAMILIES]
    for model_type, starts in pick.items():
        for over, what in fams[model_type].tiny_variants:
            if what.startswith(starts):
                name = f"{model_type}-{what.split(',')[0].replace(' ', '_')}"
                out += [pytest.param(model_type, over, dtype, id=f"{name}-{dtype}") for dtype in ("float32", "bfloat16")]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_type,over,dtype", _variants())
def test_greedy_ids_and_step_logits_equal_transformers_generate_for_each_variant(tmp_path, monkeypatch, model_type,
                                                                                 over, dtype):
    """16 new tokens (past the sliding windows of 4 and 5) from a prompt of 9:
    the same ids as transformers' greedy generate, and each step's logits within float32's (1e-4)
    or bfloat16's (2%) rounding of its scores."""
    if dtype == "bfloat16":
        src, ref, cfg = _bf16_checkpoint(tmp_path, model_type, over)
    else:
        ref, cfg = tiny_reference(transformers, model_type, over)
        ref.save_pretrained(tmp_path / "hf")
        src = tmp_path / "hf"
    model = moedsl.load_model(_import(src, tmp_path / "imp"))
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = ref.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    steps = []
    real_pick = generation.pick

    def recording_pick(logits, *a):
        steps.append(logits.clone())
        return real_pick(logits, *a)

    monkeypatch.setattr(generation, "pick", recording_pick)
    ours = moedsl.generate(model, prompt, 16, eos_token_id=None)  # as ref: no eos
    assert torch.equal(ours, theirs.sequences)
    tol = 1e-4 if dtype == "float32" else 0.02
    for mine, hf in zip(steps, theirs.logits, strict=True):
        hf = hf.float()
        assert (mine - hf).abs().max() <= tol * hf.abs().max()
