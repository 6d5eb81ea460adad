"""V-MoE on images (Riquelme et al. 2021): the ViT patch embedding and classifier, batch
prioritized routing's slot order, V-MoE's capacity rounding, the image data sources and
their errors, image spec errors, training on the digits, evaluation at a lower inference
capacity, and N processes against one for an image spec."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moedsl
from moedsl.errors import SpecError, UserError
from moedsl.kinds.gates import Gate
from moedsl.nn.routing import assign_slots, assign_slots_torch
from moedsl.nn.vision import PatchEmbed
from moedsl.runtime.data import make_source, read_npz, source_problems

ROOT = Path(__file__).resolve().parents[1]


def image_spec(**over) -> dict:
    """A tiny ViT with one top-2 MoE layer over 8×8 grey images in 4×4 patches (5 tokens an image)."""
    gate = {"type": "topk", "k": 2, "normalize": False, "capacity_factor": 1.0, "drop_priority": "score",
            "routing_groups": 2}
    gate.update(over.pop("gate", {}))
    d = {"moedsl": 1, "name": "tiny-vit",
         "model": {"input": "image", "image": {"size": 8, "channels": 1, "patch": 4}, "classes": 10, "d_model": 32,
                   "norm": "layernorm"},
         "layers": [{"patch_embed": {}},
                    {"attention": {"heads": 2, "causal": False, "positions": "none"}},
                    {"moe": {"experts": {"count": 4, "hidden": 32, "activation": "gelu"}, "gate": gate}},
                    {"norm": {}}, {"classifier": {"pool": "mean"}}],
         "train": {"batch_size": 32, "steps": 150, "lr": 1.0e-2, "warmup": 10, "eval_every": 150}}
    for key, value in over.items():
        if key in ("image", "classes", "input"):
            d["model"][key] = value
        else:
            d[key] = value
    return d


# ----------------------------------------------------------------------------- the ViT layers

def test_patch_embedding_matches_unfold_and_matmul():
    torch.manual_seed(0)
    images = torch.rand(3, 6, 6, 2)  # [B, H, W, C]
    m = PatchEmbed(patch=3, channels=2, num_patches=4, d_model=5, class_token=True, positions="learned",
                   init_std=0.5)
    with torch.no_grad():
        m.cls.normal_()
    cols = F.unfold(images.permute(0, 3, 1, 2), kernel_size=3, stride=3)  # [B, C·P·P, patches]
    ref = cols.transpose(1, 2) @ m.proj.weight.T + m.proj.bias  # [B, patches, d]
    out = m(images)
    assert out.shape == (3, 5, 5)
    torch.testing.assert_close(out[:, 1:], ref + m.positions[1:])
    torch.testing.assert_close(out[:, 0], (m.cls[0, 0] + m.positions[0]).expand(3, 5))


def test_patch_embedding_is_a_strided_convolution():
    """The same projection as ViT's Conv2d with kernel = stride = P."""
    torch.manual_seed(1)
    images = torch.rand(2, 4, 4, 3)
    m = PatchEmbed(patch=2, channels=3, num_patches=4, d_model=7, class_token=False, positions="none", init_std=0.3)
    conv = F.conv2d(images.permute(0, 3, 1, 2), m.proj.weight.view(7, 3, 2, 2), m.proj.bias, stride=2)
    torch.testing.assert_close(m(images), conv.flatten(2).transpose(1, 2))


def test_classifier_pools_the_class_token_or_the_mean():
    spec = moedsl.load_spec(image_spec())
    model = moedsl.build_model(spec)
    out = model(torch.rand(4, 8, 8, 1))
    assert out.output.shape == (4, 10)
    h = torch.randn(2, 5, 32)
    clf = model.get_submodule("classifier")
    torch.testing.assert_close(clf(h), clf.proj(h.mean(1)))
    clf.pool = "token"
    torch.testing.assert_close(clf(h), clf.proj(h[:, 0]))


# ----------------------------------------------------------------------------- slot order

def slots_by_loop(expert, routed, E, C, priority=None):
    """The V-MoE / GShard order as a plain loop: tokens ranked by priority (highest first, ties by
    position; no priority: by position); every token's first choice, then every second choice."""
    G, S, k = expert.shape
    slot = [[[-1] * k for _ in range(S)] for _ in range(G)]
    for g in range(G):
        order = list(range(S)) if priority is None else sorted(range(S), key=lambda t: -float(priority[g, t].detach()))
        used = [0] * E
        for j in range(k):
            for t in order:
                e = int(expert[g, t, j])
                if routed is not None and not bool(routed[g, t, j]):
                    continue
                if used[e] < C:
                    slot[g][t][j] = g * C + used[e]
                    used[e] += 1
    return torch.tensor(slot)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), G=st.integers(1, 3), S=st.integers(1, 12), E=st.integers(2, 5),
       k=st.integers(1, 3), C=st.integers(1, 6), with_routed=st.booleans())
def test_slot_order_matches_a_loop_over_tokens(seed, G, S, E, k, C, with_routed):
    """Batch prioritized routing (V-MoE §4.1): first choices of all tokens in descending priority,
    then second choices; without priority, the same by position (both code paths)."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, E)
    expert = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(G * S)]).view(G, S, k)
    routed = torch.rand(G, S, k, generator=g) > 0.2 if with_routed else None
    priority = torch.rand(G, S, generator=g)
    assert torch.equal(assign_slots(expert, routed, E, C, priority), slots_by_loop(expert, routed, E, C, priority))
    ref = slots_by_loop(expert, routed, E, C)
    assert torch.equal(assign_slots(expert, routed, E, C), ref)  # the CPU kernel where it applies
    assert torch.equal(assign_slots_torch(expert, routed, E, C), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_prioritises_tokens_by_their_largest_routing_weight(seed):
    """drop_priority: score ranks tokens by max_i g_i(x), the largest softmax probability (V-MoE §4.1,
    weights not renormalised); position keeps token order. Checked on a real gate's routing."""
    spec = moedsl.load_spec(image_spec(gate={"capacity_factor": 0.5}))
    model = moedsl.build_model(spec, seed=seed)
    from moedsl.nn.gates import Gate as GateModule

    gate = next(m for m in model.modules() if isinstance(m, GateModule))
    gate.eval()
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(seed))
    for order in ("score", "position"):
        gate.spec = dataclasses.replace(gate.spec, drop_priority=order)
        r = gate(x, groups=2)
        probs = torch.softmax(x @ gate.weight.T, -1).view(2, 10, 4)
        top = probs.topk(2, dim=-1)
        C = gate.spec.capacity(10, 4, training=False)
        prio = top.values.max(-1).values if order == "score" else None
        want = slots_by_loop(top.indices, None, 4, C, prio)
        assert torch.equal(r.expert.view(2, 10, 2), top.indices)
        assert torch.equal(r.slot.view(2, 10, 2), want), order
        assert int(r.dropped) > 0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate_type", ["topk", "gshard"])
def test_batch_prioritized_routing_ranks_by_the_router_probability_before_renormalising(gate_type, normalize):
    """V-MoE §4.1: a token's priority is max_i g_i(x) with g(x) = TOP_k(softmax(W·x)), the router's
    largest probability, whatever the weights the experts' outputs are then multiplied by. Token a
    has the larger probability (0.50 > 0.40), token b the larger weight once renormalised over its
    two (0.40 / 0.65 > 0.50 / 0.95): a is ranked first, with or without `normalize`."""
    gate_opts = {"type": gate_type, "normalize": normalize, "capacity_factor": 1.0, "drop_priority": "score"}
    if gate_type == "gshard":
        gate_opts["second_expert"] = "always"
    spec = moedsl.load_spec(image_spec(gate=gate_opts))
    from moedsl.nn.gates import Gate as GateModule

    gate = next(m for m in moedsl.build_model(spec).modules() if isinstance(m, GateModule))
    gate.eval()
    p = torch.tensor([[0.50, 0.45, 0.03, 0.02],   # a: raw max 0.50, renormalised 0.526
                      [0.40, 0.25, 0.20, 0.15]])  # b: raw max 0.40, renormalised 0.615
    with torch.no_grad():  # logits = log p, so that softmax(W·x) = p
        gate.weight.zero_()
        gate.weight[:, :4] = torch.eye(4)
    x = torch.zeros(2, 32)
    x[:, :4] = p.log()
    r = gate(x, groups=1)
    C = gate.spec.capacity(2, 4, training=False)
    assert C == 1  # one slot per expert: a and b both want experts 0 and 1
    top = p.topk(2, dim=-1)
    raw = top.values.max(-1).values  # the V-MoE formula: max_e p_e
    renormalised = (top.values / top.values.sum(-1, keepdim=True)).max(-1).values
    assert raw.argmax() != renormalised.argmax()  # the two orders differ here
    want = slots_by_loop(top.indices[None], None, 4, C, raw[None])
    assert torch.equal(r.expert.view(1, 2, 2), top.indices[None])
    assert torch.equal(r.slot.view(1, 2, 2), want)
    assert want[0, 0].tolist() == [0, 0] and want[0, 1].tolist() == [-1, -1]  # a keeps both, b drops both


# ----------------------------------------------------------------------------- capacity rounding

def test_capacity_rounds_as_v_moe_when_asked_and_ceils_by_default():
    ceil = Gate(type="topk", k=2, capacity_factor=1.0)
    rnd = Gate(type="topk", k=2, capacity_factor=1.0, capacity_rounding="round")
    assert ceil.capacity(17, 4) == 9 and rnd.capacity(17, 4) == 8  # 8.5: round halves to even
    assert rnd.capacity(19, 4) == 10  # 9.5
    assert ceil.capacity(13, 4) == 7 and rnd.capacity(13, 4) == 6  # 6.5
    assert rnd.capacity(13 * 4, 8, training=True) == round(2 * 52 / 8)
    assert Gate(type="topk", k=2, capacity_factor=1.0, capacity_rounding="round", min_capacity=9).capacity(17, 4) == 9
    spec = moedsl.load_spec(ROOT / "specs" / "v-moe.yaml")
    assert spec.moe_layers[0].config.gate.capacity_rounding == "round"
    assert moedsl.load_spec(ROOT / "specs" / "switch.yaml").moe_layers[0].config.gate.capacity_rounding == "ceil"


def test_a_lone_token_gets_one_slot_in_each_expert_where_round_gives_none():
    """A decode graph routes each token alone: round(2.0 · 1 / 8) = 0 would drop it in every layer."""
    rnd = Gate(type="switch", k=1, capacity_factor=1.25, eval_capacity_factor=2.0, capacity_rounding="round")
    assert rnd.capacity(1, 8, training=False) == 1 and rnd.capacity(1, 8) == 1
    assert Gate(type="topk", k=2, capacity_factor=1.0, capacity_rounding="round", min_capacity=3).capacity(1, 8) == 3


# ----------------------------------------------------------------------------- data

@pytest.fixture
def spec():
    return moedsl.load_spec(image_spec())


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def good(n=12):
    rng = np.random.default_rng(0)
    return {"images": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), "labels": rng.integers(0, 10, n)}


def test_npz_images_and_labels_are_read_and_scaled(tmp_path, spec):
    arrays = good()
    x, y = read_npz(write_npz(tmp_path / "d.npz", **arrays), spec)
    assert x.shape == (12, 8, 8, 1) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    torch.testing.assert_close(x[..., 0], torch.tensor(arrays["images"] / 255.0, dtype=torch.float32))
    assert torch.equal(y, torch.tensor(arrays["labels"]))


def test_npz_missing_array_is_named_with_what_the_file_has(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=good()["images"], targets=good()["labels"])
    with pytest.raises(UserError, match=r"has no array 'labels' \(it has: images, targets\)"):
        read_npz(path, spec)


def test_npz_images_of_the_wrong_rank(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=np.zeros((12, 64)), labels=good()["labels"])
    with pytest.raises(UserError, match=r"'images' has shape \[12, 64\], not \[N, H, W\] or \[N, H, W, C\]"):
        read_npz(path, spec)


def test_npz_labels_of_the_wrong_rank(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=good()["images"], labels=np.zeros((12, 1), dtype=np.int64))
    with pytest.raises(UserError, match=r"'labels' has shape \[12, 1\], not \[N\]"):
        read_npz(path, spec)


def test_npz_images_whose_size_disagrees_with_the_spec(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=np.zeros((12, 16, 16)), labels=good()["labels"])
    with pytest.raises(UserError, match=r"the images are 16×16×1 \(H×W×C\) but model.image is 8×8×1"):
        read_npz(path, spec)


def test_npz_images_whose_channels_disagree_with_the_spec(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=np.zeros((12, 8, 8, 3)), labels=good()["labels"])
    with pytest.raises(UserError, match=r"the images are 8×8×3 .* channels 1"):
        read_npz(path, spec)


def test_npz_label_out_of_range_says_which_and_where(tmp_path, spec):
    labels = good()["labels"].copy()
    labels[7] = 10
    path = write_npz(tmp_path / "d.npz", images=good()["images"], labels=labels)
    with pytest.raises(UserError, match=r"label 10 at index 7 is outside \[0, 10\)"):
        read_npz(path, spec)


def test_npz_image_and_label_counts_disagree(tmp_path, spec):
    path = write_npz(tmp_path / "d.npz", images=good()["images"], labels=good(11)["labels"])
    with pytest.raises(UserError, match=r"12 images but 11 labels"):
        read_npz(path, spec)


def test_npz_that_is_not_an_npz(tmp_path, spec):
    text = tmp_path / "d.npz"
    text.write_text("images,labels\n")
    with pytest.raises(UserError, match=r"not an \.npz file"):
        read_npz(str(text), spec)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(UserError, match=r"not an \.npz file \(a single \.npy array\)"):
        read_npz(str(tmp_path / "one.npy"), spec)


def test_text_given_to_an_image_spec_is_named_as_text_with_what_an_image_spec_takes(tmp_path, spec):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    with pytest.raises(UserError) as e:
        read_npz(str(text), spec)
    line = str(e.value)
    assert "\n" not in line and "pickled" not in line
    assert line.startswith(f"--data {text}: a text file, not an .npz file: a spec over images (tiny-vit) takes "
                           "digits or an .npz file with arrays images")
    assert [p for p in source_problems(spec, str(text), 5)] == [line]  # what the run's preflight prints


@pytest.mark.slow
def test_npz_problem_refuses_the_run_in_one_line_exit_2(tmp_path):
    import yaml

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(image_spec()))
    labels = good()["labels"].copy()
    labels[3] = -1
    path = write_npz(tmp_path / "d.npz", images=good()["images"], labels=labels)
    res = subprocess.run([sys.executable, "-m", "moedsl", "run", str(spec_file), "--data", path, "--out",
                          str(tmp_path / "run"), "--steps", "1"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"moedsl: error: --data {path}: label -1 at index 3 is outside "
                                               "[0, 10) (model.classes 10; 1 label(s) out of range)"]


def test_digits_split_is_fixed_and_batches_are_a_function_of_seed_step_and_share(spec):
    a, b = make_source(spec, "digits", seed=0), make_source(spec, "digits", seed=5)
    assert a.size("eval") == 1797 // 6 and a.size("train") == 1797 - 1797 // 6
    assert torch.equal(a.data["eval"][0], b.data["eval"][0])  # the held-out set does not follow the seed
    whole = a.batch(7, 16, 5)
    halves = [a.batch(7, 16, 5, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.inputs for h in halves]), whole.inputs)
    assert torch.equal(torch.cat([h.targets for h in halves]), whole.targets)
    assert not torch.equal(b.batch(7, 16, 5).targets, whole.targets)
    assert float(whole.inputs.max()) <= 1.0 and whole.inputs.shape == (16, 8, 8, 1)
    # one epoch sees every training image once
    assert a.size("train") == 107 * 14
    seen = torch.cat([a.batch(s, 107, 5).inputs for s in range(14)]).flatten(1)
    assert torch.unique(seen, dim=0).shape[0] == len(torch.unique(a.data["train"][0].flatten(1), dim=0))
    # evaluation covers the held-out set once, the rows past its end masked
    steps = a.eval_steps(64)
    masks = [a.batch(s, 64, 5, split="eval").mask for s in range(steps)]
    assert int(sum(m.sum() for m in masks)) == a.size("eval") and steps * 64 > a.size("eval")


def test_image_spec_refuses_text_data_and_another_seq(spec):
    assert any("a spec over images trains on digits or an .npz" in p for p in source_problems(spec, "synthetic", 5))
    assert any("--seq 16: an image of tiny-vit is 5 tokens" in p for p in source_problems(spec, "digits", 16))
    assert source_problems(spec, "digits", 5) == []


# ----------------------------------------------------------------------------- spec errors

def issues(d) -> list:
    with pytest.raises(SpecError) as e:
        moedsl.load_spec(d)
    return [(".".join(map(str, i.path)), i.message) for i in e.value.issues]


def test_patch_size_that_does_not_divide_the_image_is_located_at_the_field():
    found = issues(image_spec(image={"size": 8, "patch": 3}))
    assert ("model.image.patch", "patch 3 does not divide the image size 8") in found


def test_image_spec_errors_are_located():
    d = image_spec()
    del d["model"]["classes"]
    assert any(p == "model" and "missing required key 'classes'" in m for p, m in issues(d))
    d = image_spec()
    d["layers"][0] = {"embedding": {}}
    assert any(p == "layers.0.embedding" and "input: image has no token ids" in m for p, m in issues(d))
    d = image_spec()
    d["layers"][0]["patch_embed"] = {"class_token": False}
    d["layers"][-1]["classifier"] = {"pool": "token"}
    assert any(p == "layers.4.classifier.pool" and "class token" in m for p, m in issues(d))
    d = image_spec(train={"seq_len": 16})
    assert any(p == "train.seq_len" and "not the 5 tokens of one image" in m for p, m in issues(d))
    tokens = {"moedsl": 1, "name": "t", "model": {"vocab_size": 32, "d_model": 16},
              "layers": [{"embedding": {}}, {"ffn": {"hidden": 32}}, {"classifier": {}}]}
    assert any(p == "layers.2.classifier" and "needs model.input: image" in m for p, m in issues(tokens))


# ----------------------------------------------------------------------------- training and eval

@pytest.fixture
def one_thread():
    """One OpenMP thread: on shared cores a team of two spins at every op's barrier while the
    other waits for a core (bench/README.md, "A step on shared cores"), 10× slower here."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_training_on_digits_beats_chance_and_lower_inference_capacity_drops_more(tmp_path, one_thread, capsys,
                                                                                   monkeypatch):
    import os

    from moedsl.runtime.train import RunOptions, run

    monkeypatch.setattr(os, "environ", dict(os.environ))  # `moedsl eval` sets the OpenMP wait policy

    spec = moedsl.load_spec(image_spec())
    summary = run(spec, RunOptions.from_spec(spec, out=tmp_path / "run", progress=False))
    assert summary.eval_accuracy > 0.6  # chance: 0.1
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "accuracy" in line]
    assert rows and '"eval_loss"' in rows[-1]
    full = moedsl.evaluate(str(tmp_path / "run"), 2.0)
    low = moedsl.evaluate(str(tmp_path / "run"), 0.25)
    assert low["dropped"] > full["dropped"] + 0.3
    assert full["examples"] == low["examples"] == 1797 // 6
    assert math.isclose(moedsl.evaluate(str(tmp_path / "run"), 1.0)["accuracy"], summary.eval_accuracy)
    # the CLI: the figures, and bad input in one line, exit 2
    from moedsl.cli import main

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--capacity-factor", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == low["dropped"]
    for args, message in (([str(tmp_path / "run"), "--capacity-factor", "-1"], "'-1' is not a finite number >= 0"),
                          ([str(tmp_path / "run"), "--capacity-factor", "1,x"], "'x' is not a finite number >= 0"),
                          ([str(tmp_path), "--capacity-factor", "1"], "no checkpoint under")):
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err


def test_eval_sweeps_capacity_factors_on_one_loaded_model_and_0_is_dropless_as_in_inspect(tmp_path, one_thread,
                                                                                          capsys, monkeypatch):
    import os

    from moedsl.cli import main
    from moedsl.runtime import evaluate as ev
    from moedsl.runtime.train import RunOptions, run

    monkeypatch.setattr(os, "environ", dict(os.environ))  # `moedsl eval` sets the OpenMP wait policy
    spec = moedsl.load_spec(image_spec())
    run(spec, RunOptions.from_spec(spec, out=tmp_path / "run", progress=False, steps=20))
    alone = {c: moedsl.evaluate(str(tmp_path / "run"), c) for c in (2.0, 0.25)}
    builds, real = [], ev.build
    monkeypatch.setattr(ev, "build", lambda *a, **k: builds.append(1) or real(*a, **k))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--capacity-factor", "2,0.25,0", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert len(builds) == 1  # one model load for the whole sweep
    assert [r["capacity_factor"] for r in sweep] == [2.0, 0.25, 0.0]
    for r in sweep[:2]:  # each factor of the sweep is what evaluating it alone gives
        one = alone[r["capacity_factor"]]
        assert (r["loss"], r["dropped"]) == (one["loss"], one["dropped"])
    assert sweep[1]["dropped"] > 0.3 and sweep[2]["dropped"] == 0  # 0: dropless, nothing dropped
    assert main(["eval", str(tmp_path / "run"), "--capacity-factor", "2,0.25,0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["2"], ["0.25"], ["0"])]
    assert [row[:2] for row in rows] == [["2", f"{sweep[0]['loss']:.4f}"], ["0.25", f"{sweep[1]['loss']:.4f}"],
                                         ["0", "(dropless)"]]  # a row per factor: the factor, the loss, ...


@pytest.mark.slow
def test_image_spec_on_two_processes_equals_one():
    from moedsl.runtime.equivalence import check

    diffs = check([image_spec(), ROOT / "specs" / "v-moe.yaml"], 2, batch=8)
    for per_rank in diffs:
        for d in per_rank:
            assert d.ok(), d
    assert diffs[0][0].dropped > 0


def tiny_held_out(n_images=60):
    """An image source of ``n_images`` random 8×8 images: n // 6 = 10 held out."""
    from moedsl.runtime.data import Images

    g = torch.Generator().manual_seed(0)
    return Images(torch.rand(n_images, 8, 8, 1, generator=g), torch.randint(0, 10, (n_images,), generator=g),
                  seed=0, name="tiny")


def test_held_out_images_that_fill_the_last_batch_take_no_capacity_and_are_not_dropped():
    """10 held-out images in batches of 4: the last batch is 2 images and 2 wrapped around (every
    batch one shape). Those 2 route nowhere: the loss, accuracy and dropped fraction are those of
    the same images evaluated in batches of 4, 4 and 2, under a capacity that drops."""
    from moedsl.runtime.evaluate import held_out_images

    spec = moedsl.load_spec(image_spec(gate={"capacity_factor": 0.5, "routing_groups": 1}))
    model = moedsl.build_model(spec, seed=0)
    source = tiny_held_out()
    assert source.size("eval") == 10 and source.eval_steps(4) == 3
    got = held_out_images(model, spec, source, 4)
    images, labels = source.data["eval"]
    loss = correct = dropped = assigned = 0.0
    model.eval()
    with torch.no_grad():
        for lo in (0, 4, 8):
            out = model(images[lo:lo + 4])  # the last: images 8 and 9 alone
            logits = out.output.float()
            loss += float(F.cross_entropy(logits, labels[lo:lo + 4], reduction="sum"))
            correct += float((logits.argmax(-1) == labels[lo:lo + 4]).sum())
            dropped += sum(float(s.dropped) for s in out.router_stats)
            assigned += sum(float(s.assignments) for s in out.router_stats)
    assert dropped > 0 and got.examples == 10
    assert math.isclose(got.dropped, dropped / assigned)
    assert math.isclose(got.loss, loss / 10, rel_tol=1e-5)
    assert math.isclose(got.accuracy, correct / 10)


def _held_out_on(rank, world, spec_data):
    from moedsl.runtime.evaluate import held_out_images

    torch.set_num_threads(1)
    spec = moedsl.load_spec(spec_data)
    model = moedsl.build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32)
    h = held_out_images(model, spec, tiny_held_out(), 4, rank, world)
    return h.loss, h.accuracy, h.dropped, h.examples


@pytest.mark.slow
@pytest.mark.parametrize("groups", [2, 1])
def test_held_out_images_on_two_processes_equal_one_when_the_last_batch_is_partial(groups):
    """The last batch's rows 10 and 11 (wrapped around) are rank 1's share: with 2 routing groups
    each rank routes its own rows; with 1 the rows are gathered and routed as one batch, the rows
    that count gathered with them."""
    from moedsl.runtime.spawn import spawn

    d = image_spec(gate={"capacity_factor": 0.5, "routing_groups": groups})
    one = _held_out_on(0, 1, d)
    for got in spawn(_held_out_on, 2, d, timeout=300):
        assert got[3] == one[3] == 10
        assert math.isclose(got[2], one[2]) and math.isclose(got[0], one[0], rel_tol=1e-5), (got, one)


@pytest.mark.parametrize("gate", [{"capacity_factor": 0.5},
                                  {"type": "gshard", "capacity_factor": 0.5},
                                  {"normalize": True, "drop_priority": "position", "capacity_factor": 0.5},
                                  {"drop_policy": "dropless", "drop_priority": None, "capacity_factor": None},
                                  {"type": "expert_choice", "k": None, "normalize": None, "drop_priority": None,
                                   "capacity_factor": 1.0, "max_experts_per_token": 1}])
def test_rows_that_do_not_count_leave_the_routing_and_its_statistics_as_without_them(gate):
    """model(images, rows): the images not in ``rows`` take no slot, are neither dropped nor in the
    load, and a routing group's capacity is that of its images that count (2 of 4 here)."""
    g = {"type": "topk", "k": 2, "normalize": False, "capacity_factor": 1.0, "drop_priority": "score",
         "routing_groups": 1, **gate}
    d = image_spec()
    d["layers"][2]["moe"]["gate"] = {key: v for key, v in g.items() if v is not None}
    model = moedsl.build_model(moedsl.load_spec(d), seed=1)
    model.eval()
    images = torch.rand(4, 8, 8, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        padded = model(images, torch.tensor([True, True, False, False]))
        alone = model(images[:2])
    torch.testing.assert_close(padded.output[:2], alone.output)
    (p,), (a,) = padded.router_stats, alone.router_stats
    assert int(p.dropped) == int(a.dropped) and int(p.assignments) == int(a.assignments)
    assert p.tokens_per_expert.tolist() == a.tokens_per_expert.tolist()
    assert p.expert_load.tolist() == a.expert_load.tolist()
    if g.get("capacity_factor") == 0.5:
        assert int(a.dropped) > 0


def test_eval_of_a_token_model_reports_loss_and_drops_without_accuracy(tmp_path, one_thread):
    from moedsl.runtime.train import RunOptions, run

    d = {"moedsl": 1, "name": "tiny-switch", "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16},
         "layers": [{"embedding": {}},
                    {"moe": {"experts": {"count": 4, "hidden": 16}, "gate": {"type": "switch", "capacity_factor": 1.0}}},
                    {"head": {}}],
         "train": {"batch_size": 4, "seq_len": 16, "steps": 3, "eval_batches": 2}}
    spec = moedsl.load_spec(d)
    run(spec, RunOptions.from_spec(spec, out=tmp_path / "run", progress=False))
    ckpt = str(next((tmp_path / "run" / "checkpoints").glob("step-*")))
    full = moedsl.evaluate(d, 4.0, checkpoint=ckpt)
    low = moedsl.evaluate(d, 0.25, checkpoint=ckpt)
    assert full["accuracy"] is None and math.isfinite(full["loss"]) and full["examples"] == 8
    assert full["dropped"] == 0 and low["dropped"] > 0.5
