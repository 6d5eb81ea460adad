"""The trainer: one step shared by eager and CUDA-graph modes, that skips a non-finite update,
scales float16's loss, reports router figures that do not depend on the number of processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moedsl
from moedsl.runtime.train import RunOptions, Trainer

ROOT = Path(__file__).resolve().parents[1]


def trainer(name_or_data, layout="auto", **options) -> Trainer:
    data = name_or_data if isinstance(name_or_data, dict) else ROOT / "specs" / f"{name_or_data}.yaml"
    spec = moedsl.load_spec(data)
    options = {"batch": 4, "seq": 16, "steps": 4, **options}
    return Trainer(spec, RunOptions.from_spec(spec, device="cpu", progress=False, **options), layout=layout)


def state(t: Trainer) -> dict:
    """Everything a step may update: weights, buffers (the balancing bias), the optimizer's tensors."""
    out = {f"p/{n}": p.detach().clone() for n, p in t.model.named_parameters()}
    out.update({f"b/{n}": b.clone() for n, b in t.model.named_buffers() if not n.endswith(("rng_step", "load_acc"))})
    for i, st in enumerate(t.opt.state.values()):
        out.update({f"o/{i}/{k}": v.clone() for k, v in st.items()})
    return out


class HostSyncs(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (what a CUDA graph cannot hold)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_captured_step_reads_nothing_back_to_the_host():
    """The step CUDA graphs capture is the eager step; run on a CPU with a static layout, it
    makes no host read, so skipping a non-finite update cannot depend on a Python branch."""
    t = trainer("switch", layout="static")
    b = t.source.batch(0, 4, 16)
    with HostSyncs() as probe:
        t.step(b, 1e-3)
    assert probe.seen == []
    with HostSyncs() as probe:  # the probe sees a host read where there is one
        float(t.step(b, 1e-3).grad_norm)
    assert probe.seen


def test_a_step_with_a_nonfinite_gradient_updates_nothing():
    t = trainer("deepseek-shared")  # aux-loss-free balancing: a bias buffer the step moves
    t.step(t.source.batch(0, 4, 16), 1e-3)  # a normal step: optimizer state exists, bias has moved
    before = state(t)
    with torch.no_grad():
        next(p for n, p in t.model.named_parameters() if ".experts." in n).view(-1)[0] = float("nan")
    poisoned = state(t)
    out = t.step(t.source.batch(1, 4, 16), 1e-3)
    assert bool(out.skipped) and not torch.isfinite(out.grad_norm)
    after = state(t)
    changed = [k for k in poisoned if not torch.equal(poisoned[k].nan_to_num(), after[k].nan_to_num())]
    assert changed == []
    assert any(not torch.equal(before[k], after[k].nan_to_num()) for k in before if "experts" in k)  # the NaN itself
    gate = t.model.get_submodule("layers.2.gate")
    assert gate.expert_bias.abs().max() > 0  # it had moved in the first step, and kept that


def vectors_spec(dtype: str) -> dict:
    return {"moedsl": 1, "name": "fp16", "model": {"input": "vectors", "d_model": 16, "max_seq_len": 16,
                                                   "dtype": dtype},
            "layers": [{"moe": {"experts": {"count": 4, "hidden": 32}, "gate": {"type": "topk", "k": 2},
                                "residual": False}}],
            "train": {"batch_size": 2, "seq_len": 8}}


def in_float16(t):
    """The experts' products in float16 itself: on a CPU without native float16 GEMMs they are
    computed in float32 (Experts._cpu_choice), whose gradients neither flush nor overflow."""
    t.model.get_submodule("layers.0.experts").cpu_path = "torch"


def first_step_gradient(dtype: str, loss_scaling: bool) -> torch.Tensor:
    t = trainer(vectors_spec(dtype), batch=2, seq=8, grad_clip=0.0)
    with torch.no_grad():  # tiny output weights: the gradients behind them fall below float16's range
        t.model.get_submodule("layers.0.experts").w_out.mul_(1e-6)
    in_float16(t)
    if not loss_scaling:
        t.train_step.loss_scale = None
    t.step(t.source.batch(0, 2, 8), 0.0)
    return t.model.get_submodule("layers.0.experts").w_in.grad.clone()


def test_float16_scales_the_loss_so_small_gradients_do_not_flush_to_zero():
    reference = first_step_gradient("float32", False)
    assert reference.abs().max() > 0
    unscaled = first_step_gradient("float16", False)
    scaled = first_step_gradient("float16", True)
    assert unscaled.abs().max() == 0  # what float16 without loss scaling gives: nothing to learn from
    # float16's precision (and routing near ties) leave about 0.1 of relative error, as bfloat16 does
    assert (scaled - reference).norm() / reference.norm() < 0.25


def test_float16_overflow_skips_the_step_leaving_weights_and_optimizer_state_and_halves_the_loss_scale():
    t = trainer(vectors_spec("float16"), batch=2, seq=8)
    in_float16(t)
    assert t.loss_scale is not None
    assert not bool(t.step(t.source.batch(0, 2, 8), 1e-3).skipped)  # AdamW's moments and step count exist now
    assert int(t.loss_scale.clean_steps) == 1
    t.loss_scale.scale.fill_(2.0**40)  # the scaled loss's gradient overflows float16
    before = state(t)
    assert any(k.startswith("o/") for k in before)
    out = t.step(t.source.batch(1, 2, 8), 1e-3)
    assert bool(out.skipped) and not torch.isfinite(out.grad_norm)
    after = state(t)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # weights, buffers, moments, step
    assert float(t.loss_scale.scale) == 2.0**39 and int(t.loss_scale.clean_steps) == 0


def test_float16_loss_scale_doubles_after_its_growth_interval_of_finite_steps_counted_since_a_skip():
    """Micikevicius et al. 2018, §3.2: S doubles after N steps in a row without an overflow; a skipped
    step halves it and starts the count again."""
    t = trainer(vectors_spec("float16"), batch=2, seq=8)
    t.loss_scale.growth_interval = 3
    t.loss_scale.scale.fill_(16.0)  # low enough that no finite step here overflows
    scales = []
    for step in range(7):
        b = t.source.batch(step, 2, 8)
        if step == 2:  # a non-finite gradient: an infinite input
            b.inputs[0, 0, 0] = float("inf")
        out = t.step(b, 1e-3)
        assert bool(out.skipped) == (step == 2)
        scales.append(float(t.loss_scale.scale))
    assert scales == [16.0, 16.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_float16_run_reports_skipped_steps_and_trains(tmp_path):
    s = moedsl.load_spec(vectors_spec("float16"))
    summary = moedsl.runtime.train.run(s, RunOptions.from_spec(s, steps=20, out=tmp_path, progress=False, lr=1e-2))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_scale" in r and "skipped" in r for r in rows)
    assert summary.train_loss < summary.first_loss


@pytest.mark.slow
def test_dropped_fraction_on_two_processes_equals_one_process(tmp_path):
    """A layer routed over the whole batch (ST-MoE's, on 2 ranks) reports the batch's drops once."""
    def first_row(out, *extra):
        res = subprocess.run([sys.executable, "-m", "moedsl", "run", str(ROOT / "specs" / "st-moe.yaml"), "--steps",
                              "1", "--batch", "8", "--seq", "32", "--eval-batches", "1", "--out", str(out),
                              "--no-progress", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    one, two = first_row(tmp_path / "one"), first_row(tmp_path / "two", "--nproc", "2")
    assert one["dropped"] > 0
    assert two["dropped"] == pytest.approx(one["dropped"], abs=1e-9)
    assert two["expert_load"].keys() == one["expert_load"].keys()
    for layer, load in one["expert_load"].items():
        assert two["expert_load"][layer] == pytest.approx(load, abs=1e-9)
