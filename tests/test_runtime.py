"""The runtime: training runs, resume, resharding checkpoints, faults, data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moedsl
from moedsl.cli import main
from moedsl.runtime import checkpoint as ckpt
from moedsl.runtime.data import Synthetic, make_source, pystdlib_bytes
from moedsl.runtime.train import RunOptions, lr_at, run

ROOT = Path(__file__).resolve().parents[1]


def spec(name):
    return moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def moedsl_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "moedsl", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_run_trains_and_writes_metrics_plot_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "40", "--out", str(out), "--eval-every",
                 "20", "--no-progress"]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns
    assert rows[19]["eval_loss"] > rows[39]["eval_loss"]
    assert (out / "expert_load.png").stat().st_size > 1000
    assert ckpt.latest(out / "checkpoints").name == "step-00000040"
    text = capsys.readouterr().out
    assert "CUDA graphs off: the run is on the CPU" in text and "held-out loss" in text


@pytest.mark.slow
def test_interrupted_and_resumed_run_gives_identical_losses(tmp_path):
    args = ["run", "specs/deepseek-shared.yaml", "--steps", "12", "--checkpoint-every", "4", "--no-progress",
            "--eval-every", "6"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert moedsl_cli(*args, "--out", a).returncode == 0
    killed = moedsl_cli(*args, "--out", b, env={"MOEDSL_FAULT": "exit@10"})
    assert killed.returncode == 3 and ckpt.latest(b / "checkpoints").name == "step-00000008"
    resumed = moedsl_cli(*args, "--out", b, "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]  # bit for bit
    assert [r.get("eval_loss") for r in ra] == [r.get("eval_loss") for r in rb]


@pytest.mark.slow
def test_checkpoint_of_4_ranks_resumes_on_2_and_on_1(tmp_path):
    base = ["run", "specs/switch.yaml", "--steps", "4", "--no-progress", "--eval-every", "4"]
    four = moedsl_cli(*base, "--nproc", "4", "--checkpoint-every", "2", "--out", tmp_path / "4")
    assert four.returncode == 0, four.stderr[-2000:]
    saved = tmp_path / "4" / "checkpoints" / "step-00000002"
    ref = metrics(tmp_path / "4")[2:]
    for n, out in (("2", tmp_path / "2"), ("1", tmp_path / "1")):
        res = moedsl_cli(*base, "--nproc", n, "--out", out, "--resume", saved)
        assert res.returncode == 0, res.stderr[-2000:]
        got = metrics(out)
        assert [r["step"] for r in got] == [3, 4]
        for x, y in zip(ref, got):
            assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4
        assert abs(ref[-1]["eval_loss"] - got[-1]["eval_loss"]) < 1e-5


def test_checkpoint_loads_into_one_process_for_inference(tmp_path):
    s = spec("mixtral")
    o = RunOptions.from_spec(s, steps=3, out=tmp_path, progress=False, eval_every=3)
    summary = run(s, o)
    model = moedsl.build_model(s)
    meta = ckpt.load(Path(summary.checkpoint), model, None, s)
    assert meta["step"] == 3
    batch = make_source(s, "synthetic", 0).batch(0, 16, 64, split="eval")
    with torch.no_grad():
        model.eval()
        loss = torch.nn.functional.cross_entropy(model(batch.inputs).output.flatten(0, 1), batch.targets.flatten())
    assert abs(float(loss) - metrics(tmp_path)[-1]["eval_loss"]) < 0.2  # one of the 4 eval batches


def test_checkpoint_from_another_spec_is_refused(tmp_path, capsys):
    s = spec("switch")
    summary = run(s, RunOptions.from_spec(s, steps=1, out=tmp_path, progress=False))
    assert main(["run", str(ROOT / "specs" / "mixtral.yaml"), "--steps", "2", "--out", str(tmp_path / "m"),
                 "--resume", summary.checkpoint, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "saved from spec 'switch-small'" in err and "kv_heads" in err and "Traceback" not in err


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    s = spec("switch")
    summary = run(s, RunOptions.from_spec(s, steps=2, out=tmp_path, progress=False))
    good = Path(summary.checkpoint)
    (tmp_path / "checkpoints" / "step-00000009.tmp").mkdir()  # a save that died half-way
    assert ckpt.latest(tmp_path / "checkpoints") == good
    assert (good / "meta.json").exists()


def test_nan_stops_the_run_naming_step_and_layer(tmp_path, capsys):
    env = os.environ.copy()
    os.environ["MOEDSL_FAULT"] = "nan@3"
    try:
        rc = main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "6", "--checkpoint-every", "2",
                   "--out", str(tmp_path), "--no-progress"])
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert rc == 1
    err = capsys.readouterr().err
    assert "is nan at step 3" in err and "layers.2.experts" in err and "step-00000002" in err
    assert ckpt.latest(tmp_path / "checkpoints").name == "step-00000002"


@pytest.mark.slow
def test_a_dead_worker_stops_the_others_with_a_clear_error(tmp_path):
    t = time.perf_counter()
    res = moedsl_cli("run", "specs/switch.yaml", "--nproc", "2", "--steps", "20", "--out", tmp_path,
                     "--no-progress", "--timeout", "60", env={"MOEDSL_FAULT": "exit@3:1"}, timeout=120)
    assert res.returncode == 1
    assert "rank 1 (exit code 3)" in res.stderr and "the other ranks were stopped" in res.stderr
    assert time.perf_counter() - t < 90


def test_bad_run_options_are_clear_errors(tmp_path, capsys):
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--seq", "1000", "--out", str(tmp_path)]) == 2
    assert "exceeds model.max_seq_len" in capsys.readouterr().err
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--data", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--resume", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_data_is_deterministic_and_shared_out_by_rank():
    src = Synthetic(256, seed=5)
    whole = src.batch(7, 8, 32)
    halves = [src.batch(7, 8, 32, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([h.inputs for h in halves]), whole.inputs)
    assert torch.equal(whole.targets[:, :-1], whole.inputs[:, 1:])
    assert not torch.equal(src.batch(8, 8, 32).inputs, whole.inputs)
    assert not torch.equal(src.batch(7, 8, 32, split="eval").inputs, whole.inputs)


def test_pystdlib_corpus_holds_out_whole_files():
    train, held, files = pystdlib_bytes(limit=2 * 2**20)
    assert files > 100 and len(train) > 10 * len(held) > 0
    assert b"def " in train and b"import" in held


def test_lr_schedule_warms_up_then_decays():
    o = RunOptions.from_spec(spec("switch"), steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(55, o) == pytest.approx(0.55) and lr_at(99, o) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_aux_loss_free_bias_moves_towards_balance(tmp_path):
    s = spec("deepseek-shared")
    run(s, RunOptions.from_spec(s, steps=5, out=tmp_path, progress=False))
    model = moedsl.build_model(s)
    ckpt.load(ckpt.latest(tmp_path / "checkpoints"), model, None, s)
    bias = model.get_submodule("layers.2.gate").expert_bias
    assert bias.abs().max() > 0 and bias.abs().max() <= 5 * 0.001 + 1e-9  # at most rate per step


def test_vectors_spec_trains_on_the_regression_task(tmp_path):
    data = {"moedsl": 1, "name": "one-layer", "model": {"input": "vectors", "d_model": 16, "max_seq_len": 32},
            "layers": [{"moe": {"experts": {"count": 4, "hidden": 32}, "gate": {"type": "topk", "k": 2}}}],
            "train": {"batch_size": 8, "seq_len": 16}}
    s = moedsl.load_spec(data)
    summary = run(s, RunOptions.from_spec(s, steps=30, out=tmp_path, progress=False, lr=1e-2))
    assert summary.train_loss < summary.first_loss


def test_eval_of_a_run_repeats_the_runs_own_last_evaluation(tmp_path, capsys):
    """`moedsl eval RUN` evaluates as the run did: its --seq (not the spec's seq_len), its batch and
    --eval-batches, and the bfloat16 autocast it trained under. On one process it is the run's own
    evaluation repeated (the same batches through the same forward, the losses summed in the same
    order), so the loss equals the run's last eval_loss exactly, not to a tolerance."""
    data = json.loads(json.dumps(spec("switch").data))
    data["model"]["dtype"] = "bfloat16"
    assert data["train"]["seq_len"] != 24 and data["train"]["batch_size"] != 4
    spec_file = tmp_path / "switch-bf16.json"
    spec_file.write_text(json.dumps(data))
    out = tmp_path / "run"
    assert main(["run", str(spec_file), "--steps", "2", "--batch", "4", "--seq", "24", "--eval-batches", "3",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["seq"], r["batch"], r["examples"], r["dtype"]) == (24, 4, 12, "bfloat16")
    assert r["loss"] == metrics(out)[-1]["eval_loss"]
    assert main(["eval", str(out), "--seq", "32", "--json"]) == 0  # a flag still overrides the run's
    longer = json.loads(capsys.readouterr().out)
    assert longer["seq"] == 32 and longer["loss"] != r["loss"]
