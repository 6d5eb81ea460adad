"""Bucketed gradient sync (all-reduces launched from backward hooks) against the
after-backward flat sync, on gloo processes; and step metrics read only on logging steps."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import moedsl
from moedsl.cli import main
from moedsl.runtime import checkpoint as ckpt
from moedsl.runtime import report
from moedsl.runtime import train as train_mod
from moedsl.runtime.spawn import spawn
from moedsl.runtime.train import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
BUCKET_MB = 0.02  # ~20 KiB: several buckets of the tiny specs' gradients


def variant(name: str, placement: dict) -> dict:
    d = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
    d = copy.deepcopy(d)
    d["placement"] = placement
    return d


def forward(model, inputs, rank: int, how: str) -> torch.Tensor:
    """The objective of one forward. ``full``: task loss + aux loss; ``aux``: the aux loss alone
    (the head, the final norm and the experts get no gradient on any rank); ``head_on_rank0``:
    the full loss, with rank 0's head weight detached (no gradient there, one on the others;
    the backward's own collectives, the all-to-alls' way back, stay the same on every rank)."""
    hook = None
    if how == "head_on_rank0" and rank == 0:
        hook = model.head.register_forward_hook(lambda m, a, out: F.linear(a[0], m.weight.detach(), m.bias))
    out = model(inputs)
    if hook is not None:
        hook.remove()
    if how == "aux":
        return out.aux_loss * 1.0
    return F.cross_entropy(out.output.flatten(0, 1).float(), inputs.flatten()) + out.aux_loss


def _same(ref, got, world: int) -> bool:
    """The same sums: bit for bit on 2 ranks (a + b either way). On more, gloo's ring adds each
    element's terms in an order set by its offset in the buffer, which bucketing moves: equal to
    float32 rounding (a missing or doubled rank's term is of the gradient's own size)."""
    if ref is None or got is None:
        return ref is None and got is None
    if world == 2:
        return torch.equal(ref, got)
    return bool((ref - got).abs().max() <= 1e-6 * ref.abs().max() + 1e-30) if ref.numel() else True


def _grads(model) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _compare_worker(rank: int, world: int, cases: list, bucket_mb: float):
    from moedsl.api import build_model, load_spec
    from moedsl.runtime.grads import GradSync

    torch.set_num_threads(1)
    results = []
    for data, how in cases:
        spec = load_spec(data)
        model = build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32, layout="grouped")
        model.train()
        mesh = model.compiled.mesh
        flat = GradSync(model, mesh, rank, mode="after_backward")
        bucketed = GradSync(model, mesh, rank, mode="bucketed", bucket_mb=bucket_mb)
        g = torch.Generator().manual_seed(1 + rank)
        inputs = torch.randint(0, spec.model.vocab_size, (2, 16), generator=g)
        loss = forward(model, inputs, rank, how) / world
        loss.backward(retain_graph=True)
        flat()
        ref = _grads(model)
        steps = []
        for i in range(2):  # the first step's guessed order, then the order agreed from rank 0's record
            model.zero_grad(set_to_none=True)
            bucketed.start()
            loss.backward(retain_graph=i == 0)
            during = len(bucketed.launched)  # launched by the hooks, before backward returned
            bucketed()
            got = _grads(model)
            same = {n: _same(ref[n], got[n], world) for n in ref}
            steps.append(dict(launched=list(bucketed.launched), during=during, same=same,
                              synced=sum(1 for v in got.values() if v is not None)))
        bucketed.close()
        results.append(steps)
    return results


def _check_launch_order(per_rank_steps: list, world: int) -> None:
    """Each rank launched its buckets in increasing order of their keys, and the ranks of a
    group launched the same buckets (key, size) in the same order."""
    by_group: dict = {}
    for rank, launched in enumerate(per_rank_steps):
        keys = [key for _, key, _ in launched]
        assert keys == sorted(keys) and len(set(keys)) == len(keys), f"rank {rank} launched out of order: {keys}"
        for group, key, numel in launched:
            members = tuple(range(world)) if group == () else group
            assert rank in members
            by_group.setdefault(group, {})[rank] = by_group.get(group, {}).get(rank, []) + [(key, numel)]
    for group, seqs in by_group.items():
        members = tuple(range(world)) if group == () else group
        assert set(seqs) == set(members), f"group {group}: launches from ranks {sorted(seqs)}"
        first = seqs[members[0]]
        for r in members:
            assert seqs[r] == first, f"group {group}: rank {r} launched {seqs[r]}, rank {members[0]} {first}"


CASES = {
    2: [("mixtral", {"expert_parallel": 1, "data_parallel": 2}, "full"),  # every expert on both ranks
        ("mixtral", {"experts": {"strategy": "round_robin", "replicas": {1: 2}}}, "head_on_rank0"),
        ("switch", {"expert_parallel": 1, "data_parallel": 2}, "aux")],
    4: [("switch", {"expert_parallel": 2, "data_parallel": 2}, "full"),  # experts on 2 of 4 ranks each
        ("mixtral", {"expert_parallel": 2, "data_parallel": 2,
                     "experts": {"strategy": "round_robin", "replicas": {1: 2}}}, "head_on_rank0")],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_bucketed_sync_sums_what_the_after_backward_sync_sums_and_launches_in_one_order(world):
    cases = [(variant(name, placement), how) for name, placement, how in CASES[world]]
    per_rank = spawn(_compare_worker, world, cases, BUCKET_MB)
    for c, (name, placement, how) in enumerate(CASES[world]):
        for step in range(2):
            runs = [per_rank[r][c][step] for r in range(world)]
            for rank, r in enumerate(runs):
                differ = [n for n, ok in r["same"].items() if not ok]
                assert not differ, f"{name} {placement} {how}, step {step + 1}, rank {rank}: {differ[:5]}"
                assert r["synced"] > 0
            _check_launch_order([r["launched"] for r in runs], world)
            world_buckets = [x for x in runs[0]["launched"] if x[0] == ()]
            assert len(world_buckets) >= 3, f"{name}: {len(world_buckets)} bucket(s) of replicated gradients"
            if how == "full":  # the hooks launched buckets while backward ran
                assert all(r["during"] > 0 for r in runs), [r["during"] for r in runs]
        if how == "full" and "data_parallel" in placement:  # experts' own groups took part
            assert any(g != () for g, _, _ in per_rank[0][c][0]["launched"])


RATE = 0.01


def balancing_mixtral() -> dict:
    """mixtral with aux-loss-free balancing (DeepSeek-V3 §2.1.2) in its 4 gates: a step moves
    each gate's bias by the load summed over ranks, the gates' loads in one all-reduce. Routed
    in groups of one sequence, so each rank counts only its own tokens."""
    d = yaml.safe_load((ROOT / "specs" / "mixtral.yaml").read_text())
    d["layers"][1]["block"][1]["moe"]["gate"].update(bias_balancing={"rate": RATE}, routing_groups=4)
    return d


def _train_worker(rank: int, world: int, data: dict, modes: list, placement=None):
    from moedsl.runtime.train import Trainer

    torch.set_num_threads(1)
    spec = moedsl.load_spec({**data, "placement": placement} if placement else data)
    out = {}
    for mode in modes:
        o = RunOptions.from_spec(spec, steps=1, batch=4, seq=16, device="cpu", progress=False, grad_sync=mode,
                                 bucket_mb=BUCKET_MB)
        t = Trainer(spec, o)
        loads = []  # each gate's load of this rank's tokens, read as its forward returns
        hooks = [g.register_forward_hook(lambda m, a, r: loads.append(m.load_acc.clone())) for g in t.train_step.gates]
        outputs = t.step(t.source.batch(0, 4, 16, rank, world), o.lr)
        for h in hooks:
            h.remove()
        out[mode] = dict(norm=float(outputs.grad_norm), loads=[x.tolist() for x in loads],
                         bias=[g.expert_bias.tolist() for g in t.train_step.gates])
    return out


@pytest.mark.slow
def test_a_training_step_moves_the_balancing_bias_as_one_process_does_with_either_sync():
    data = balancing_mixtral()
    per_rank = spawn(_train_worker, 2, data, ["bucketed", "after_backward"])
    one = _train_worker(0, 1, data, ["after_backward"])["after_backward"]
    # every expert on both ranks: the experts' share of the norm is summed on each rank alone
    dp = spawn(_train_worker, 2, data, ["bucketed"], {"expert_parallel": 1, "data_parallel": 2})
    assert all(abs(r["bucketed"]["norm"] - one["norm"]) < 1e-4 * one["norm"] for r in dp), (dp, one["norm"])
    # the bias moves by the rate against the sign of (mean load - load), from zero, each gate its own
    want = [(RATE * torch.sign(torch.tensor(x).mean() - torch.tensor(x))).tolist() for x in one["loads"]]
    assert len(want) == 4 and len({tuple(w) for w in want}) == 4
    ranks_loads = [torch.tensor(r["bucketed"]["loads"]) for r in per_rank]
    assert torch.equal(sum(ranks_loads), torch.tensor(one["loads"]))  # the ranks count shares of one batch
    assert not all(torch.equal(x, ranks_loads[0]) for x in ranks_loads[1:])
    for rank, r in enumerate(per_rank):
        assert r["bucketed"]["norm"] == r["after_backward"]["norm"]  # the same sums, bit for bit on 2 ranks
        assert abs(r["bucketed"]["norm"] - one["norm"]) < 1e-4 * one["norm"]
        for mode in r:  # the loads are counts: their sums over ranks are exact
            for layer, (got, ref) in enumerate(zip(r[mode]["bias"], want)):
                assert got == ref, f"rank {rank} {mode}: gate {layer}: {got} vs {ref}"


# ----------------------------------------------------------------------------- logging steps

def tiny(name: str = "switch"):
    return moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")


def options(tmp_path, **kw) -> RunOptions:
    base = dict(steps=7, batch=4, seq=16, out=tmp_path, progress=False, eval_every=100, eval_batches=1)
    base.update(kw)
    return RunOptions.from_spec(tiny(), **base)


def test_metrics_are_read_only_on_logging_steps_and_every_steps_loss_is_kept(tmp_path, monkeypatch):
    calls = []
    real = train_mod.reduce_step

    def counted(outputs, world, history=None, *placement):
        calls.append(len(history))
        return real(outputs, world, history, *placement)

    monkeypatch.setattr(train_mod, "reduce_step", counted)
    monkeypatch.setattr(report, "plot_expert_load", lambda *a, **k: None)  # seconds of matplotlib, not tested here
    every = run(tiny(), options(tmp_path / "every"))
    assert calls == [1] * 7
    calls.clear()
    sparse = run(tiny(), options(tmp_path / "sparse", log_every=3, checkpoint_every=5))
    assert calls == [3, 2, 1, 1]  # steps 3, 5 (a checkpoint: its weights checked first), 6, 7 (the last)
    rows = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 5, 6, 7]
    assert sparse.losses == every.losses and len(sparse.losses) == 7  # every step's loss, bit for bit
    ref = {r["step"]: r for r in map(json.loads, (tmp_path / "every" / "metrics.jsonl").read_text().splitlines())}
    for r in rows:
        assert r["loss"] == ref[r["step"]]["loss"] and r["grad_norm"] == ref[r["step"]]["grad_norm"]
        assert r["tokens_per_s"] > 0


def test_nan_between_logging_steps_stops_the_run_naming_its_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEDSL_FAULT", "nan@5")
    rc = main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "8", "--batch", "4", "--seq", "16",
               "--log-every", "4", "--checkpoint-every", "3", "--eval-every", "100", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    # found at step 6 (a checkpoint step is read first), named at step 5, before step 6 was saved
    assert "is nan at step 5 (read at step 6: --log-every 4)" in err and "layers.2.experts" in err, err
    assert "step-00000003" in err and "Traceback" not in err
    assert ckpt.latest(tmp_path / "checkpoints").name == "step-00000003"


def test_log_every_0_is_refused_naming_the_flag(tmp_path, capsys):
    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--log-every", "0", "--out", str(tmp_path)]) == 2
    assert "--log-every 0: must be a whole number >= 1" in capsys.readouterr().err


def test_grad_sync_mode_and_bucket_size_are_checked_before_the_run(tmp_path):
    from moedsl.runtime.preflight import RunRefused, check_run

    with pytest.raises(RunRefused) as e:
        check_run(tiny(), options(tmp_path, grad_sync="overlapped", bucket_mb=0.0), 1)
    assert "grad_sync 'overlapped': must be bucketed or after_backward" in str(e.value)
    assert "bucket_mb 0.0: must be a number > 0 (MiB" in str(e.value)

