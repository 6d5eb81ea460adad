"""A run that cannot work is refused before it builds a model or starts a worker: every
reason at once, one line each, exit 2, nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import moedsl
from moedsl.cli import main
from moedsl.nn import cpu_caps
from moedsl.nn.cpu_caps import CpuCaps
from moedsl.runtime import checkpoint as ckpt
from moedsl.runtime import preflight
from moedsl.runtime.train import RunOptions

ROOT = Path(__file__).resolve().parents[1]
SWITCH = str(ROOT / "specs" / "switch.yaml")
TINY = ["--batch", "4", "--seq", "16", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the run was checked")

    monkeypatch.setattr(moedsl.api, "build_model", refuse)


def refused(capsys, *argv) -> list:
    assert main(["run", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


@pytest.mark.parametrize("lr", ["nan", "-1", "0", "inf"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_one_line(tmp_path, capsys, no_model, lr):
    lines = refused(capsys, SWITCH, "--lr", lr, "--steps", "1", "--out", tmp_path / "run")
    assert len(lines) == 1 and lines[0].startswith(f"moedsl: error: --lr {float(lr)!r}: the learning rate must be")
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


def test_timeout_0_and_negative_warmup_are_refused_with_every_other_mistake_at_once(tmp_path, capsys, no_model):
    lines = refused(capsys, SWITCH, "--timeout", "0", "--warmup", "-1", "--lr", "nan", "--seq", "1000",
                    "--eval-every", "0", "--steps", "1", "--out", tmp_path / "run")
    assert [line.split(":")[2].split()[0] for line in lines] == ["--eval-every", "--lr", "--warmup", "--timeout",
                                                                 "--seq"]
    assert "--seq 1000: exceeds model.max_seq_len 128" in lines[-1]


def test_warmup_0_is_a_schedule_without_warm_up():
    from moedsl.runtime import preflight
    from moedsl.runtime.train import RunOptions, lr_at

    o = RunOptions.from_spec(moedsl.load_spec(SWITCH), steps=10, warmup=0, lr=1.0, min_lr=0.0)
    preflight.check_run(moedsl.load_spec(SWITCH), o, 1)  # accepted
    assert lr_at(0, o) == pytest.approx(1.0) and lr_at(10, o) == pytest.approx(0.0)


@pytest.mark.parametrize("where", ["under /proc", "under a file", "an existing file"])
def test_an_out_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys, no_model, where):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    out = {"under /proc": Path("/proc/moedsl-run"), "under a file": afile / "run", "an existing file": afile}[where]
    lines = refused(capsys, SWITCH, "--steps", "1", "--out", out)
    assert len(lines) == 1 and lines[0].startswith(f"moedsl: error: --out {out}")
    assert afile.read_text() == "mine"


def test_an_out_folder_refused_for_another_reason_is_not_left_behind(tmp_path, capsys, no_model):
    refused(capsys, SWITCH, "--lr", "-1", "--steps", "1", "--out", tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []


def test_data_that_is_a_directory_or_too_short_to_hold_out_a_sequence_says_so(tmp_path, capsys, no_model):
    lines = refused(capsys, SWITCH, "--data", tmp_path, "--steps", "1", "--out", tmp_path / "run")
    assert lines == [f"moedsl: error: --data '{tmp_path}' is a directory but not a prepared folder (no manifest.json): "
                     "give a prepared folder (moedsl data prepare), a text file, synthetic or pystdlib"]
    text = tmp_path / "short.txt"
    text.write_bytes(b"x" * 2000)  # its held-out 5% (100 bytes) is shorter than a sequence of 128
    lines = refused(capsys, SWITCH, "--data", text, "--seq", "128", "--steps", "1", "--out", tmp_path / "run")
    assert len(lines) == 1 and "held-out last 5% (100 bytes) is shorter than a sequence of 128" in lines[0]


def test_a_spec_too_large_for_the_machine_is_refused_with_both_figures_before_allocating(tmp_path, capsys):
    data = yaml.safe_load(Path(SWITCH).read_text())
    data["model"]["d_model"] = 1_000_000
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(data))
    lines = refused(capsys, big, "--out", tmp_path / "run")
    assert len(lines) == 1
    assert "needs about 233 TiB per process" in lines[0] and " available: --ignore-memory-check" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_memory_check_counts_every_process_and_can_be_ignored(tmp_path, capsys, monkeypatch):
    from moedsl.runtime import preflight
    monkeypatch.setattr(preflight, "memory_available", lambda o, here: (2**20, "available", here))
    lines = refused(capsys, SWITCH, "--nproc", "2", *TINY, "--steps", "1", "--out", tmp_path / "run")
    assert "per process × 2 processes" in lines[0] and "1 MiB available" in lines[0]
    lines = refused(capsys, SWITCH, "--nproc", "2", *TINY, "--lr", "-1", "--out", tmp_path / "run",
                    "--ignore-memory-check")
    assert lines == ["moedsl: error: --lr -1.0: the learning rate must be a finite number > 0"]  # memory not checked


def test_nproc_mistakes_are_found_before_any_worker_starts_all_at_once(tmp_path, capsys, monkeypatch):
    import moedsl.runtime.launcher as launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("workers started"))
    lines = refused(capsys, SWITCH, "--nproc", "3", "--steps", "1", "--out", tmp_path / "run")
    assert len(lines) == 2
    assert lines[0] == ("moedsl: error: train.batch_size 16 does not split over 3 processes (--nproc 3): give a "
                        "multiple of 3 (15 or 18)")
    assert "switch.yaml:" in lines[1] and "8 experts" in lines[1] and "3 expert-parallel ranks" in lines[1]


def test_under_torchrun_only_rank_0_prints_the_refusal(tmp_path, capsys, monkeypatch):
    for key, value in {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["run", SWITCH, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["run", SWITCH, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "does not split over 3 processes (WORLD_SIZE 3)" in capsys.readouterr().err


def steps(out: Path) -> list:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_new_run_into_an_earlier_one_is_refused_unless_resumed_or_overwritten(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", SWITCH, *TINY, "--steps", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    lines = refused(capsys, SWITCH, *TINY, "--steps", "2", "--out", out)
    assert lines == [f"moedsl: error: --out {out} already holds a run (metrics up to step 3, checkpoint "
                     "step-00000003): --resume to continue it, --overwrite to replace it, or another --out"]
    assert steps(out) == [1, 2, 3] and ckpt.latest(out / "checkpoints").name == "step-00000003"

    monkeypatch.setenv("MOEDSL_FAULT", "nan@1")  # an --overwrite whose run fails before its first step
    assert main(["run", SWITCH, *TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 1
    assert steps(out) == [1, 2, 3] and ckpt.latest(out / "checkpoints").name == "step-00000003"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "expert_load.png", "loss.png", "metrics.jsonl"]

    monkeypatch.delenv("MOEDSL_FAULT")
    assert main(["run", SWITCH, *TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert steps(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert not (out / ".replaced").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    lines = refused(capsys, SWITCH, "--resume", "--overwrite", "--out", tmp_path)
    assert lines == ["moedsl: error: --resume and --overwrite: choose one (continue the run in --out, or replace it)"]


def test_a_run_set_aside_by_a_start_that_was_killed_is_not_forgotten(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".replaced" / "checkpoints").mkdir(parents=True)  # what a launcher killed mid-start leaves
    lines = refused(capsys, SWITCH, "--out", out)
    assert len(lines) == 1 and f"set aside in {out / '.replaced'}" in lines[0]
    assert (out / ".replaced" / "checkpoints").is_dir()


def test_a_batch_the_routing_groups_do_not_divide_is_refused_naming_the_layer(tmp_path, capsys, no_model):
    lines = refused(capsys, SWITCH, "--batch", "3", "--seq", "10", "--steps", "1", "--out", tmp_path / "run")
    assert len(lines) == 1  # the four repeated MoE layers: one line
    assert ("moe.gate.routing_groups: routing_groups = 4 does not divide the batch of 3 sequences × 10 tokens "
            "(30 tokens)") in lines[0]
    assert "--batch is 3" in lines[0]


# ----------------------------------------------------------------------------- 16 bits on a CPU

AVX2_ONLY = CpuCaps("AVX2", bf16=False, fp16=False)
BF16_ONLY = CpuCaps("AVX512", bf16=True, fp16=False, flags=("avx512_bf16",))
# what a 16-bit run on an AVX2-only CPU gets: oneDNN without its 16-bit kernels, ATen's AVX2 code
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def tiny_spec(dtype: str = "bfloat16", router_dtype: str = "float32") -> dict:
    return {"moedsl": 1, "name": "sixteen", "model": {"input": "vectors", "d_model": 16, "max_seq_len": 16,
                                                      "dtype": dtype, "router_dtype": router_dtype},
            "layers": [{"moe": {"experts": {"count": 4, "hidden": 32}, "gate": {"type": "topk", "k": 2},
                                "residual": False}}],
            "train": {"batch_size": 2, "seq_len": 8}}


def slow_fields(dtype="bfloat16", router_dtype="float32", device="auto", caps=AVX2_ONLY, cuda=False) -> list:
    spec = moedsl.load_spec(tiny_spec(dtype, router_dtype))
    o = RunOptions.from_spec(spec, steps=1, device=device)
    return [f for f, _ in preflight.slow_sixteen_bit(spec, o, caps, cuda)]


def test_a_sixteen_bit_spec_is_slow_only_on_a_cpu_without_a_native_gemm_for_its_type():
    assert slow_fields() == ["model.dtype"]
    assert slow_fields("float16", "bfloat16") == ["model.dtype", "model.router_dtype"]
    assert slow_fields("float32", "bfloat16") == ["model.router_dtype"]
    assert slow_fields("float32") == []
    assert slow_fields(caps=BF16_ONLY) == []  # native bfloat16 (avx512_bf16, AMX)
    assert slow_fields("float16", caps=BF16_ONLY) == ["model.dtype"]  # but not float16
    assert slow_fields(cuda=True) == []  # auto: the run goes to the GPU
    assert slow_fields(device="cuda") == []
    assert slow_fields(device="cpu", cuda=True) == ["model.dtype"]  # --device cpu beside a GPU


def test_the_sixteen_bit_warning_names_the_cpu_the_measured_slowdown_and_what_to_do():
    spec = moedsl.load_spec(tiny_spec())
    o = RunOptions.from_spec(spec, steps=1)
    measured = []

    def slowdown(dt):
        measured.append(dt)
        return 43.4

    line = preflight.sixteen_bit_warning(spec, o, AVX2_ONLY, cuda=False, slowdown=slowdown)
    assert measured == [torch.bfloat16]
    assert "\n" not in line and line.startswith("moedsl: warning: model.dtype bfloat16 ")
    assert "(AVX2)" in line and "43×" in line and "set model.dtype to float32" in line and "GPU" in line

    def never(dt):
        raise AssertionError("measured where nothing is slow")

    assert preflight.sixteen_bit_warning(spec, o, BF16_ONLY, cuda=False, slowdown=never) is None
    assert preflight.sixteen_bit_warning(spec, o, AVX2_ONLY, cuda=True, slowdown=never) is None


@pytest.mark.slow
def test_moedsl_run_warns_once_before_training_bfloat16_on_an_avx2_only_cpu(tmp_path):
    """The real thing: torch and oneDNN limited to AVX2 (as on a CPU without avx512_bf16/AMX), the
    probe and the timed matmul run as they would there."""
    if cpu_caps.probe().capability not in ("AVX2", "AVX512"):
        pytest.skip(f"ATEN_CPU_CAPABILITY=avx2 needs an x86 CPU with AVX2 (this one: {cpu_caps.probe().capability})")
    spec = tmp_path / "bf16.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    res = subprocess.run([sys.executable, "-m", "moedsl", "run", str(spec), "--steps", "1", "--eval-batches", "1",
                          "--out", str(tmp_path / "run"), "--no-progress", "--json"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **AVX2_ENV, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if line.startswith("moedsl: warning:")]
    assert len(warned) == 1, res.stderr
    assert "model.dtype bfloat16" in warned[0] and "(AVX2)" in warned[0] and "set model.dtype to float32" in warned[0]
    assert json.loads(res.stdout[res.stdout.index("{"):])["steps"] == 1  # and then it trains


def test_moedsl_run_does_not_warn_where_the_cpu_has_native_bfloat16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu_caps, "probe", lambda: BF16_ONLY)
    spec = tmp_path / "bf16.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    assert main(["run", str(spec), "--steps", "1", "--eval-batches", "1", "--out", str(tmp_path / "run"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
