"""``placement.shard``: sharded training states train exactly as the unsharded run does, hold
1/N of the sharded states per rank, and their checkpoints load at another world size and
another shard mode (runtime/shard.py)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_helpers import exports_as
from moedsl.runtime.spawn import spawn

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def tiny(ep: int = 1, dp: int = 1, shard: str = "none", dtype: str = "float32") -> dict:
    """A two-block Mixtral-shaped spec at test size, with ``ep`` × ``dp`` ranks."""
    d = yaml.safe_load((ROOT / "specs" / "mixtral.yaml").read_text())
    d = copy.deepcopy(d)
    d["name"] = f"tiny-{shard}"
    d["model"].update(vocab_size=63, d_model=32, max_seq_len=16, dtype=dtype)
    block = d["layers"][1]
    block["repeat"] = 2
    block["block"][0]["attention"].update(heads=2, kv_heads=1)
    # uneven splits: the 63-row embedding and head over 2 (32, 31) and 4 ranks (16, 16, 16, 15), a
    # 6-row router over 4 (2, 2, 2, none)
    block["block"][1]["moe"]["experts"].update(count=6, hidden=40)
    # a tight clip, so every step clips: the sharded update must read the clipped gradient
    d["train"] = {"batch_size": 8, "seq_len": 16, "steps": STEPS, "lr": 3.0e-2, "grad_clip": 0.05, "warmup": 1}
    d["placement"] = {"shard": shard}
    if ep * dp > 1:
        d["placement"].update(expert_parallel=ep, data_parallel=dp)
    return d


def _batches(spec, world: int, rank: int):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, spec.model.vocab_size, (8, 16), generator=g)
        share = 8 // world
        out.append(x[rank * share:(rank + 1) * share])
    return out


def _train(rank: int, world: int, data: dict, amp=None, nan_at: int = -1):
    """STEPS steps of the run's step (TrainStep.for_run) on ``data``: the losses, skipped flags,
    the parameters after them (experts: per global id) and the step itself."""
    from moedsl.api import build_model, load_spec
    from moedsl.runtime.optim import lr_at
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    torch.manual_seed(0)
    spec = load_spec(data)
    model = build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32)
    options = RunOptions.from_spec(spec)
    step = TrainStep.for_run(model, spec, options, rank, world, amp=amp, capturable=False)
    losses, skipped, still = [], [], []
    for i, x in enumerate(_batches(spec, world, rank)):
        before = _params(model)
        step.lr.fill_(lr_at(i, options))
        step.opt.zero_grad(set_to_none=True)
        if i == nan_at:  # a non-finite gradient on one rank (the embedding's): every rank must skip the step
            hook = model.get_submodule("embedding").register_forward_hook(_overflow if rank == 0 else _nothing)
        out = step(x, x)
        if i == nan_at:
            hook.remove()
        losses.append(float(out.loss))
        skipped.append(float(out.skipped))
        after = _params(model)
        still.append(all(torch.equal(after[k], v) for k, v in before.items()))
    step.sync.close()
    step.still = still  # per step: whether no parameter moved
    return losses, skipped, _params(model), step


def _overflow(module, args, out) -> None:
    out.register_hook(lambda g: g * float("inf"))


def _nothing(module, args, out) -> None:
    pass


def _params(model) -> dict:
    """Every parameter, an expert parameter per global expert id (the same keys on any mesh)."""
    out = {}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        whole = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # full: a DTensor
        if ".experts." in name:
            for slot, e in enumerate(model.get_buffer(f"{owner}.expert_ids").tolist()):
                out[f"{name}/e{e}"] = whole[slot].clone()
        else:
            out[name] = whole.clone()
    return out


def _compare_worker(rank: int, world: int, plain: dict, sharded: dict, amp_name, nan_at: int):
    torch.set_num_threads(1)
    amp = getattr(torch, amp_name) if amp_name else None
    ref_losses, ref_skipped, ref, ref_step = _train(rank, world, plain, amp, nan_at)
    losses, skipped, got, step = _train(rank, world, sharded, amp, nan_at)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    ref_grads, grads = _grads(ref_step.model), _grads(step.model)
    grad = max(((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item() for k, g in ref_grads.items())
    moved = max((got[k] - v).abs().max().item() for k, v in _params_at_init(rank, world, sharded).items())
    state, ref_state = _moments(step), _moments(ref_step)
    held, ref_held = (sum(_local(p).numel() for p in s.model.parameters()) for s in (step, ref_step))
    counted = {int(v) for st in step.opt.state.values() for k, v in st.items() if k == "step"}
    return dict(losses=losses, ref_losses=ref_losses, skipped=skipped, ref_skipped=ref_skipped, worst=worst,
                moved=moved, state=state, ref_state=ref_state, held=held, ref_held=ref_held,
                keys=sorted(ref) == sorted(got), grad=grad,
                steps_counted=counted.pop() if len(counted) == 1 else counted, still=step.still,
                scale=None if step.loss_scale is None else float(step.loss_scale.scale),
                ref_scale=None if ref_step.loss_scale is None else float(ref_step.loss_scale.scale),
                grads=sorted(ref_grads) == sorted(grads))


def _micro_worker(rank: int, world: int, plain: dict, sharded: dict, one: dict):
    """``plain`` and ``sharded`` with 2 micro-batches a step, ``one`` (sharded) with one: FSDP2's
    reduce-scatters counted in the sharded runs."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    torch.set_num_threads(1)
    ref_losses, _, _, ref_step = _train(rank, world, plain)
    real, runs = group.foreach_reduce, []
    for data in (sharded, one):
        calls = []
        group.foreach_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            runs.append((_train(rank, world, data), len(calls)))
        finally:
            group.foreach_reduce = real
    ((losses, _, _, step), reduces), (_, reduces_one) = runs
    grads = _grads(step.model)
    ref_grads = _grads(ref_step.model)
    grad = max(((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item() for k, g in ref_grads.items())
    return dict(losses=losses, ref_losses=ref_losses, grad=grad, reduces=reduces, reduces_one_batch=reduces_one)


@pytest.mark.slow
def test_full_sharding_with_micro_batches_reduce_scatters_once_a_step_and_trains_as_unsharded():
    """train.micro_batches 2 under FSDP2: each unit's gradients are reduce-scattered once a step, after
    the last micro-batch's backward (the unsharded gradients accumulate until then), as often as
    with one batch a step; and the run equals the unsharded one with the same micro-batches: its
    losses, and the last step's gradients (synced and clipped). Parameters are not compared element
    by element: an element whose gradient is ~1e-9 (rounding) takes a step of about lr in either
    direction in AdamW's first steps."""
    plain, sharded, one = tiny(1, 2), tiny(1, 2, "full"), tiny(1, 2, "full")
    for d in (plain, sharded):
        d["train"]["micro_batches"] = 2
    for r in spawn(_micro_worker, 2, plain, sharded, one):
        # float32 rounding only: FSDP sums the accumulated gradients in another order (the third
        # loss differs by ~2e-6 of itself); a second reduce-scatter would double the first half's
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5), r
        assert r["grad"] <= 1e-2, r  # after 3 steps whose weights moved apart as above (1.4e-3 seen)
        assert r["reduces_one_batch"] > 0 and r["reduces"] == r["reduces_one_batch"], r


def _grads(model) -> dict:
    """The last step's gradients (synced and clipped), whole."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _moments(step) -> int:
    """AdamW's moment elements this rank holds (a DTensor's: its rows), found from the model's
    parameters as runtime/memory.py's held_bytes finds them: ``optimizer.state[parameter]``."""
    return sum(_local(v).numel() for p in step.model.parameters() for v in step.opt.state.get(p, {}).values()
               if torch.is_tensor(v) and v.dim())


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _params_at_init(rank, world, data):
    from moedsl.api import build_model, load_spec

    return _params(build_model(load_spec(data), seed=0, rank=rank, world_size=world, dtype=torch.float32))


@pytest.mark.parametrize("world,ep,dp", [(1, 1, 1), (2, 1, 2), pytest.param(4, 2, 2, marks=pytest.mark.slow)])
def test_optimizer_sharding_trains_as_the_unsharded_run(world, ep, dp):
    """Loss and every parameter after 3 clipped AdamW steps equal the unsharded run's on the same
    ranks (float32): dense states split over every rank, experts' over their expert-data-parallel
    copies (2 × 2: each expert on 2 ranks). Each rank then holds about 1/N of the moments."""
    plain, sharded = tiny(ep, dp), tiny(ep, dp, "optimizer")
    if world == 1:
        results = [_compare_worker(0, 1, plain, sharded, None, -1)]
    else:
        results = spawn(_compare_worker, world, plain, sharded, None, -1)
    for r in results:  # the same gradients, the same fused kernel on each row: bit for bit
        assert r["keys"] and r["grads"]
        assert r["losses"] == r["ref_losses"]
        assert r["grad"] == 0.0 and r["worst"] == 0.0, r
        assert r["moved"] > 1e-3  # the steps did train
        if world > 1:  # 1/2 of the moments (2 × 2: dense ones 1/4, the experts' 1/2), padding aside
            assert 0.2 * r["ref_state"] <= r["state"] <= 0.55 * r["ref_state"], r
            assert r["held"] == r["ref_held"]  # the weights stay whole


@pytest.mark.parametrize("world,ep,dp", [(2, 1, 2), (2, 2, 1), pytest.param(4, 2, 2, marks=pytest.mark.slow)])
def test_full_sharding_trains_as_the_unsharded_run(world, ep, dp):
    """FSDP2 over each layer (experts on their expert-data-parallel mesh dimension, of one rank
    when each expert is held once): loss and every parameter after 3 clipped AdamW steps as the
    unsharded run's (float32), with about 1/N of the parameters and of the moments on each rank."""
    results = spawn(_compare_worker, world, tiny(ep, dp), tiny(ep, dp, "full"), None, -1)
    lr = tiny()["train"]["lr"]
    for r in results:
        assert r["keys"] and r["grads"]
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-6, abs=1e-6)
        # FSDP's hooks add autograd nodes, so backward sums a tensor's gradient contributions in
        # another order: the first step's gradients differ in their last bits (~2e-7 of each
        # tensor's largest), and AdamW, lr·g/(|g| + eps), turns the rounding of a near-zero g into
        # a sliver of lr; a wrong reduction (a mean, a missing copy) would be off by a factor
        assert r["worst"] <= 1e-3 * lr * STEPS, r
        assert r["grad"] <= 1e-3, r  # the last step's, after the weights moved apart by the above
        assert r["moved"] > 1e-3
        # 1/2 of the weights and moments (2 × 2: dense ones 1/4, the experts' 1/2), padding aside
        if dp > 1:
            assert 0.2 * r["ref_state"] <= r["state"] <= 0.55 * r["ref_state"], r
            assert 0.2 * r["ref_held"] <= r["held"] <= 0.55 * r["ref_held"], r
        else:  # the experts, each on one rank, are not split: only the dense half of the states is
            assert 0.55 * r["ref_held"] <= r["held"] < 0.95 * r["ref_held"], r


@pytest.mark.parametrize("shard", ["optimizer", "full"])
def test_a_skipped_float16_step_is_skipped_alike_when_sharded(shard):
    """float16 with its loss scale: a gradient made infinite on one rank at the second step is
    found by the global norm on every rank; the fused AdamW skips it (no weight, moment or step
    count moves), the scale halves, and the run goes on as the unsharded one does."""
    plain, sharded = tiny(1, 2, dtype="float16"), tiny(1, 2, shard, dtype="float16")
    for r in spawn(_compare_worker, 2, plain, sharded, "float16", 1):
        assert r["skipped"] == r["ref_skipped"] == [0.0, 1.0, 0.0]
        assert r["still"] == [False, True, False]  # the skipped step moved no weight on any rank
        assert r["steps_counted"] == STEPS - 1  # nor AdamW's step count
        assert r["scale"] == r["ref_scale"] == 2.0**15  # the scale halved once
        assert 0.2 * r["ref_state"] <= r["state"] <= 0.55 * r["ref_state"], r  # and the states were sharded
        if shard == "optimizer":  # the same gradients: bit for bit
            assert r["losses"] == r["ref_losses"] and r["worst"] == 0.0, r
        else:  # float16 rounds FSDP's other order of summing gradient contributions at ~1e-4
            assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-4)


def _state(model, optimizer) -> dict:
    """The checkpoint's tensors of this rank, whole (a DTensor gathered): key -> numpy array (a
    tensor's shared memory would not outlive the worker that returns it)."""
    from moedsl.runtime.ckpt_format import state_dict

    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).numpy().copy()
            for k, v in state_dict(model, optimizer, {}).items()}


def _save_worker(rank: int, world: int, data: dict, path: str):
    from moedsl.api import load_spec
    from moedsl.runtime import checkpoint as ckpt

    torch.set_num_threads(1)
    _, _, _, step = _train(rank, world, data)
    ckpt.save(Path(path), STEPS, step.model, step.opt, load_spec(data), {}, rank, world)
    return _state(step.model, step.opt)


def _load_worker(rank: int, world: int, data: dict, path: str, saved: dict):
    """A fresh model and optimizer of ``data`` on this mesh, filled from the checkpoint at ``path``:
    the largest difference from what was saved, and the keys compared."""
    from moedsl.api import build_model, load_spec
    from moedsl.runtime import checkpoint as ckpt
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    torch.set_num_threads(1)
    spec = load_spec(data)
    model = build_model(spec, seed=1, rank=rank, world_size=world, dtype=torch.float32)  # other weights
    step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), rank, world, amp=None, capturable=False)
    meta = ckpt.load(Path(path) / f"step-{STEPS:08d}", model, step.opt, spec)
    mine = _state(model, step.opt)
    worst = max(float(abs(mine[k] - saved[k]).max(initial=0.0)) for k in mine)
    return dict(worst=worst, keys=sorted(mine), world=meta["world"])


@pytest.mark.slow
@pytest.mark.parametrize("saved_as,loads", [
    (("optimizer", 2, 1, 2), [("none", 1, 1, 1), ("full", 4, 2, 2)]),
    (("full", 2, 1, 2), [("optimizer", 2, 2, 1), ("none", 1, 1, 1)]),
])
def test_a_sharded_checkpoint_loads_at_another_world_size_and_shard_mode(tmp_path, saved_as, loads):
    """DCP reshards the DTensor rows: the weights, both moments and the step count a sharded run
    saved are what a run of another shard mode and world size reads back, every key of it."""
    shard, world, ep, dp = saved_as
    saved = {}
    for per_rank in spawn(_save_worker, world, tiny(ep, dp, shard), str(tmp_path)):
        saved.update(per_rank)
    assert any(k.endswith("/exp_avg_sq") for k in saved) and any("/e5/" in k for k in saved)
    for shard2, world2, ep2, dp2 in loads:
        data = tiny(ep2, dp2, shard2)
        results = [_load_worker(0, 1, data, str(tmp_path), saved)] if world2 == 1 else \
            spawn(_load_worker, world2, data, str(tmp_path), saved)
        assert set().union(*(r["keys"] for r in results)) == set(saved), (shard2, world2)
        for r in results:
            assert r["world"] == world and r["worst"] == 0.0, (shard2, world2, r)


def _moedsl_run(spec: Path, out: Path, shard: str, steps: int, *extra) -> subprocess.CompletedProcess:
    """``moedsl run SPEC --nproc 2 --shard SHARD`` for ``steps`` steps of 4 × 8 tokens into ``out``."""
    r = subprocess.run([sys.executable, "-m", "moedsl", "run", str(spec), "--nproc", "2", "--shard", shard,
                        "--steps", str(steps), "--batch", "4", "--seq", "8", "--eval-batches", "1", "--out", str(out),
                        "--no-progress", "--ignore-memory-check", *extra], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["optimizer", "full"])
def test_moedsl_run_shard_trains_on_two_processes_and_its_run_exports_to_hugging_face(tmp_path, shard):
    """``moedsl run --nproc 2 --shard MODE`` (over the spec's placement.shard none): the run says
    its states are sharded, and its checkpoint exports as a Mixtral that transformers loads and
    that computes the run's logits."""
    pytest.importorskip("transformers")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny(1, 2)))
    run = tmp_path / "run"
    r = _moedsl_run(spec, run, shard, 2)
    assert f"training states sharded ({shard})" in r.stdout + r.stderr
    assert (run / "checkpoints" / "step-00000002").is_dir()
    exports_as(run, tmp_path / "hf", "MixtralForCausalLM", 63)


@pytest.mark.slow
def test_moedsl_verify_checks_a_sharded_step_against_one_process():
    """``moedsl verify`` of a spec with placement.shard: the two processes' step (ZeRO-1's gathered
    rows, FSDP2's DTensor gradients and parameters made whole) equals one process's."""
    from moedsl.runtime.equivalence import check

    names = ["optimizer", "full"]
    for name, per_rank in zip(names, check([tiny(1, 2, s) for s in names], 2)):
        for d in per_rank:
            assert d.ok() and d.params_checked > 10, (name, d)


@pytest.mark.slow
def test_a_run_resumed_under_another_shard_mode_continues_the_unsharded_trajectory(tmp_path):
    """Two steps with --shard optimizer, then a resume with --shard full to step 4: the fourth
    step's loss, which the resumed moments shaped (the third step's update), is the uninterrupted
    unsharded run's (to float32 rounding: full's sums)."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny(1, 2)))

    def run(out, steps, shard, *extra):
        _moedsl_run(spec, tmp_path / out, shard, steps, "--checkpoint-every", "2", *extra)
        return [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    whole = run("whole", 4, "none")
    run("split", 2, "optimizer")
    resumed = run("split", 4, "full", "--resume")
    assert len(resumed) == 4 and resumed[:2] == whole[:2]  # the optimizer run's steps: bit for bit
    assert resumed[2:] == pytest.approx(whole[2:], rel=1e-5)


def _refusal_worker(rank: int, world: int, data: dict):
    from moedsl.api import build_model, load_spec
    from moedsl.errors import MoedslError
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    spec = load_spec(data)
    model = build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32)
    try:
        TrainStep.for_run(model, spec, RunOptions.from_spec(spec), rank, world, amp=None, capturable=False)
    except MoedslError as e:
        return str(e)
    return None


def test_full_sharding_of_an_expert_copied_inside_an_ep_group_is_refused_naming_the_layer():
    data = tiny(2, 1, "full")
    data["placement"]["experts"] = {"strategy": "contiguous", "replicas": {0: 2}}
    for message in spawn(_refusal_worker, 2, data):
        assert message is not None and message.startswith("placement.shard full: layers.2 copies expert 0 on 2 ranks")
        assert "use placement.shard optimizer" in message


def test_run_refuses_full_sharding_with_compile_on_in_one_line(tmp_path, capsys):
    from moedsl.cli import main

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny()))
    assert main(["run", str(spec), "--shard", "full", "--compile", "on", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moedsl: error: --compile on: --shard full gathers each layer's parameters in FSDP's module "
                   "hooks, which the compiled dense segments are not run with"]
    assert not (tmp_path / "run").exists()


def test_run_refuses_sharded_states_with_replication_that_moves_experts_in_one_line(tmp_path, capsys):
    """placement.replication moves experts and their moments between ranks; ZeRO's row views and
    FSDP2's DTensors do not follow such a move, so the run is refused before it starts."""
    from moedsl.cli import main

    data = tiny()
    data["placement"]["replication"] = {"policy": "eplb"}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["run", str(spec), "--shard", "optimizer", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "moedsl: error: --shard optimizer: placement.replication moves experts and their AdamW moments between "
        "ranks, which sharded states do not follow yet"]
    assert not (tmp_path / "run").exists()
