"""Distillation (Switch Transformer §4.2): a student trained on alpha x a teacher's soft targets
plus (1 - alpha) x the labels, the teacher forward only; ``moedsl distill-init`` copying the
teacher's non-expert weights into a dense student."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import moedsl
from moedsl.cli import main
from moedsl.runtime.distill import teacher_problems
from moedsl.runtime.load import load_model
from moedsl.runtime.train import RunOptions, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_helpers import run_init_on_one_and_two_processes  # noqa: E402

LAYERS_MOE = [{"embedding": {}}, {"attention": {"heads": 2}}, {"ffn": {"hidden": 32}}, {"attention": {"heads": 2}},
              {"moe": {"experts": {"count": 4, "hidden": 32}, "gate": {"type": "topk", "k": 2}}},
              {"norm": {}}, {"head": {}}]


def spec_data(name: str, layers: list, vocab: int = 64) -> dict:
    return {"moedsl": 1, "name": name, "layers": layers,
            "model": {"vocab_size": vocab, "d_model": 16, "max_seq_len": 32, "dtype": "float32"},
            "train": {"batch_size": 4, "seq_len": 8, "steps": 2, "eval_batches": 1}}


def dense_layers(hidden_first: int = 32) -> list:
    return [LAYERS_MOE[0], LAYERS_MOE[1], {"ffn": {"hidden": hidden_first}}, LAYERS_MOE[3], {"ffn": {"hidden": 32}},
            LAYERS_MOE[5], LAYERS_MOE[6]]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A trained MoE teacher's run folder (2 steps: its weights are no longer the initial ones)."""
    out = tmp_path_factory.mktemp("teacher")
    spec = moedsl.load_spec(spec_data("teacher-moe", LAYERS_MOE))
    Trainer(spec, RunOptions.from_spec(spec, device="cpu", progress=False, out=out / "run", seed=3)).fit()
    return out / "run"


def student(tmp_path: Path, teacher=None, dtype: str = "float32", **options) -> Trainer:
    data = spec_data("student", dense_layers())
    data["model"]["dtype"] = dtype
    spec = moedsl.load_spec(write(tmp_path / "dense.yaml", data))
    return Trainer(spec, RunOptions.from_spec(spec, device="cpu", progress=False, out=tmp_path / "s",
                                              distill_teacher=None if teacher is None else str(teacher), **options))


@pytest.mark.parametrize("masked,dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16"),
                                          (True, "bfloat16")])
def test_a_distillation_step_loss_is_alpha_kl_at_temperature_plus_the_labels_cross_entropy(tmp_path, teacher,
                                                                                          masked, dtype):
    """loss = alpha · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − alpha) · CE, averaged over the
    (marked) targets: computed here from the two models' logits, both under the student's autocast
    (bfloat16: the teacher's forward runs under it too) and taken to float32 for the loss."""
    alpha, temp = 0.3, 2.0
    t = student(tmp_path, teacher, dtype, distill_alpha=alpha, distill_temperature=temp)
    b = t.source.batch(0, 4, 8)
    mask = torch.rand(b.targets.shape, generator=torch.Generator().manual_seed(1)) < 0.5 if masked else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        zs = t.model(b.inputs).output.float()
        zt = load_model(teacher)(b.inputs).output.float()
    p, q = torch.softmax(zt / temp, -1), torch.softmax(zs / temp, -1)
    kl = (p * (p.log() - q.log())).sum(-1) * temp ** 2  # [B, T]
    ce = F.cross_entropy(zs.flatten(0, 1), b.targets.flatten(), reduction="none").view_as(kl)
    w = torch.ones_like(kl) if mask is None else mask.float()
    want = (alpha * (kl * w).sum() + (1 - alpha) * (ce * w).sum()) / w.sum()
    t.opt.zero_grad(set_to_none=True)
    got = t.train_step(b.inputs, b.targets, mask).loss
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (float(got), float(want))


def test_the_teacher_gets_no_gradient_and_is_unchanged_after_steps(tmp_path, teacher):
    t = student(tmp_path, teacher)
    before = {n: p.detach().clone() for n, p in t.teacher.model.named_parameters()}
    for step in range(2):
        t.step(t.source.batch(step, 4, 8), 1e-2)
    assert not t.teacher.model.training
    for n, p in t.teacher.model.named_parameters():
        assert not p.requires_grad and p.grad is None, n
        assert torch.equal(p, before[n]), n
    assert any(p.grad is not None for p in t.model.parameters())  # the student did learn


def test_alpha_zero_trains_exactly_as_without_a_teacher(tmp_path, teacher):
    plain = student(tmp_path / "a")
    distilled = student(tmp_path / "b", teacher, distill_alpha=0.0, distill_temperature=3.0)
    for step in range(2):
        a = plain.step(plain.source.batch(step, 4, 8), 1e-2)
        b = distilled.step(distilled.source.batch(step, 4, 8), 1e-2)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm)
    for (n, x), (_, y) in zip(plain.model.named_parameters(), distilled.model.named_parameters()):
        assert torch.equal(x, y), n


def test_a_resume_may_change_the_distillation_settings_and_says_so(tmp_path, teacher):
    first = student(tmp_path, teacher, steps=1)
    first.fit()
    spec = first.spec
    again = Trainer(spec, RunOptions.from_spec(spec, device="cpu", progress=False, out=tmp_path / "s", steps=2,
                                               resume=True, distill_teacher=str(teacher), distill_alpha=0.5))
    notes = []
    again.say.once = notes.append
    again.fit()
    assert again.start_step == 1
    assert any("distill_alpha 0.25 -> 0.5" in n for n in notes), notes


def test_distill_init_shares_every_non_expert_weight_with_the_teacher_bit_for_bit(tmp_path, teacher, capsys):
    dense = write(tmp_path / "dense.yaml", spec_data("student", dense_layers()))
    assert main(["distill-init", str(teacher), "--dense", str(dense), "--out", str(tmp_path / "init")]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "copied" in line and "skipped" in line
    t = dict(load_model(teacher).named_parameters())
    s = dict(load_model(tmp_path / "init").named_parameters())
    experts = [n for n in t if ".experts." in n or ".gate." in n]
    assert experts and not any(n in s for n in experts)  # nothing of the experts and routers
    shared = [n for n in t if n not in experts]
    for n in shared:  # the embedding, attention, norms, the head and layer 2's dense ffn
        assert torch.equal(s[n], t[n]), n
    assert "layers.2.ffn.w_in.weight" in shared
    fresh = sorted(set(s) - set(shared))  # layer 4's ffn, where the teacher has its MoE layer
    assert fresh and all(n.startswith("layers.4.ffn.") for n in fresh), fresh

def test_distill_init_names_a_teacher_tensor_whose_shape_does_not_fit_the_student(tmp_path, teacher, capsys):
    dense = write(tmp_path / "dense.yaml", spec_data("student", dense_layers(hidden_first=48)))
    assert main(["distill-init", str(teacher), "--dense", str(dense), "--out", str(tmp_path / "init")]) != 0
    err = capsys.readouterr().err.strip()
    assert "layers.2.ffn.w_in.weight is [32, 16]" in err and "[48, 16]" in err and "dense.yaml:8" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "init").exists()


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused_in_one_line(tmp_path, teacher, capsys):
    other = write(tmp_path / "other.yaml", spec_data("student", dense_layers(), vocab=80))
    assert main(["run", str(other), "--distill-teacher", str(teacher), "--out", str(tmp_path / "o"),
                 "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocab_size 64" in err and "80" in err, err
    tok = tmp_path / "tokenizer.json"  # a word-level tokenizer: the teacher has none (its text is bytes)
    tok.write_text('{"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}')
    mine = spec_data("student", dense_layers())
    mine["model"]["tokenizer"] = "tokenizer.json"
    assert main(["run", str(write(tmp_path / "tok.yaml", mine)), "--distill-teacher", str(teacher), "--out",
                 str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err and "none (bytes)" in err, err
    assert not (tmp_path / "o").exists()
    assert main(["run", str(other), "--distill-alpha", "0.5", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--distill-alpha without a teacher" in capsys.readouterr().err


def test_train_distill_in_the_spec_reads_the_teacher_beside_the_spec_file(tmp_path, teacher):
    data = spec_data("student", dense_layers())
    data["train"]["distill"] = {"teacher": "teacher", "temperature": 2.0}
    shutil.copytree(teacher, tmp_path / "teacher")
    spec = moedsl.load_spec(write(tmp_path / "dense.yaml", data))
    o = RunOptions.from_spec(spec)
    assert (o.distill_teacher, o.distill_alpha, o.distill_temperature) == (str(tmp_path / "teacher"), 0.25, 2.0)
    data["train"]["distill"]["alpha"] = 1.5
    with pytest.raises(moedsl.SpecError, match="alpha"):
        moedsl.load_spec(data)


def test_a_students_tokenizer_is_that_of_the_prepared_data_it_trains_on(tmp_path, teacher):
    """A teacher whose run folder keeps the tokenizer it trained with teaches a student that trains
    on data prepared with that tokenizer, and not one whose text is bytes."""
    words = '{"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}'
    taught = shutil.copytree(teacher, tmp_path / "teacher")
    (taught / "tokenizer.json").write_text(words)
    prepared = tmp_path / "prepared"  # what the check reads of a prepared folder: its manifest and tokenizer
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    (prepared / "tokenizer.json").write_text(words)
    spec = moedsl.load_spec(spec_data("student", dense_layers()))
    assert teacher_problems(spec, taught, data=str(prepared)) == []
    bytes_only = teacher_problems(spec, taught, data="synthetic")
    assert len(bytes_only) == 1 and "none (bytes)" in bytes_only[0]


def test_distillation_on_two_processes_gives_the_loss_of_one(tmp_path, teacher, capsys):
    """The teacher is replicated, each rank runs it on its share of the batch: the same step."""
    dense = write(tmp_path / "dense.yaml", spec_data("student", dense_layers()))
    assert main(["distill-init", str(teacher), "--dense", str(dense), "--out", str(tmp_path / "init")]) == 0
    one, two = run_init_on_one_and_two_processes(tmp_path / "init", tmp_path, "--distill-teacher", str(teacher),
                                                 "--distill-alpha", "0.5", "--distill-temperature", "2")
    assert abs(one[0] - two[0]) <= 1e-5 * abs(one[0]), (one, two)
