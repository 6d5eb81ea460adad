"""Micro-batches (train.micro_batches M, gradient accumulation in runtime/step.py): a dropless step
equals one batch of M× the size, on 1 and 2 processes, with one gradient sync after the last
micro-batch; capacity and balancing losses are per micro-batch; the step's figures cover it all."""
from __future__ import annotations

import pytest
import torch

import moedsl
from moedsl.errors import MoedslError
from moedsl.runtime.spawn import spawn
from moedsl.runtime.train import RunOptions, Trainer

B, T = 8, 8  # the global batch


def tiny(gate: dict, losses=None) -> dict:
    return {"moedsl": 1, "name": "tiny", "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16},
            "layers": [{"embedding": {}},
                       {"repeat": 2, "block": [{"attention": {"heads": 2}},
                                               {"moe": {"experts": {"count": 4, "hidden": 32, "activation": "swiglu"},
                                                        "gate": gate, "losses": losses or {}}}]},
                       {"norm": {}}, {"head": {}}],
            "train": {"batch_size": B, "seq_len": T}}


# dropless, with the gate's training noise: the draws are keyed by the token's place in the global batch
DROPLESS = tiny({"type": "noisy_topk", "k": 2, "drop_policy": "dropless"})


def trainer(data: dict, micro: int, out="runs/unused", **options) -> Trainer:
    spec = moedsl.load_spec(data)
    o = RunOptions.from_spec(spec, steps=1, device="cpu", progress=False, micro_batches=micro, compile="off",
                             out=out, **options)
    return Trainer(spec, o)


def one_step(data: dict, micro: int, rank: int = 0, world: int = 1, **options):
    """The Trainer after one step of ``micro`` micro-batches on this rank, and the step's outputs."""
    t = trainer(data, micro, **options)
    return t, t.step(t.source.batch(0, B, T, rank, world), t.options.lr)


def params(t) -> dict:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def close(a: dict, b: dict, atol: float) -> list:
    return [n for n in a if not torch.allclose(a[n], b[n], rtol=1e-5, atol=atol)]


@pytest.mark.parametrize("micro", [2, 4])
def test_dropless_micro_batches_equal_one_batch_of_m_times_the_size(micro):
    ref, ref_out = one_step(DROPLESS, 1)
    got, out = one_step(DROPLESS, micro)
    # the gradients before AdamW (clipped alike), then the weights after it: float32 tolerance
    grads = {n: p.grad for n, p in ref.model.named_parameters()}
    assert not close(grads, {n: p.grad for n, p in got.model.named_parameters()}, 1e-7)
    assert not close(params(ref), params(got), 1e-6), close(params(ref), params(got), 1e-6)[:5]
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-6) and torch.allclose(out.grad_norm, ref_out.grad_norm,
                                                                                 rtol=1e-5)
    for s, r in zip(out.router_stats, ref_out.router_stats):  # every token's experts, counted over the step
        assert torch.equal(s.tokens_per_expert, r.tokens_per_expert) and s.assignments == r.assignments
    # the noise counter advanced once for the step, as the one batch's did
    assert [g.rng_step.item() for g in got.train_step.routers] == [1] * 2


def _sync_worker(rank: int, world: int, data: dict, micro: int, out, recompute: str):
    torch.set_num_threads(1)
    t = trainer(data, micro, out, bucket_mb=0.005, recompute=recompute)
    sync, starts, launches = t.sync, [], []
    start, launch = sync.start, sync._launch
    sync.start = lambda: (starts.append(1), start())[1]
    sync._launch = lambda b: (launches.append(b.key), launch(b))[1]
    outputs = t.step(t.source.batch(0, B, T, rank, world), t.options.lr)
    # plain lists: tensors would go through shared memory the exiting worker takes with it
    return dict(params={n: p.tolist() for n, p in params(t).items()}, starts=len(starts), launches=launches,
                experts={n: m.expert_ids.tolist() for n, m in t.model.named_modules() if n.endswith(".experts")},
                buckets=len(sync.buckets),
                from_hooks=sync.from_hooks, loss=float(outputs.loss))


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "layers"])
def test_two_processes_in_micro_batches_sync_once_and_equal_one_process_on_the_whole_batch(tmp_path, recompute):
    """Each rank holds 2 of the 4 experts. With ``layers`` the recomputed sublayers' all-to-alls
    run in backward while the sync's hooks launch their all-reduces."""
    ref, ref_out = one_step(DROPLESS, 1)
    ranks = spawn(_sync_worker, 2, DROPLESS, 2, str(tmp_path / "two"), recompute)
    for rank, r in enumerate(ranks):
        # the hooks were armed for the last backward only: each bucket all-reduced once, most while it ran
        assert r["starts"] == 1 and len(r["launches"]) == r["buckets"] == len(set(r["launches"])) > 2, r
        assert r["from_hooks"] > 0
        want = {n: p[r["experts"][n.rsplit(".", 1)[0]]] if ".experts." in n else p for n, p in params(ref).items()}
        differ = close(want, {n: torch.tensor(p) for n, p in r["params"].items()}, 1e-6)  # this rank's experts
        assert not differ, f"rank {rank}: {differ[:5]}"
    assert abs(sum(r["loss"] for r in ranks) / 2 - float(ref_out.loss)) < 1e-5


def test_capacity_and_balancing_losses_are_those_of_each_micro_batch():
    # no jitter: the halves below are routed as the step routes them, draws and all
    t = trainer(tiny({"type": "switch", "capacity_factor": 0.8, "jitter": 0.0}, losses={"balance": 0.01}), 2)
    batch = t.source.batch(0, B, T, 0, 1)
    t.model.train()  # each half of the batch routed alone, and the whole, with the weights before the step
    halves = [t.model(x) for x in batch.inputs.chunk(2)]  # (with autograd recording, as the step computes)
    whole = t.model(batch.inputs)
    out = t.step(batch, t.options.lr)
    spec = t.train_step.routers[0].spec
    half_cap, whole_cap = spec.capacity(B * T // 2, 4, True), spec.capacity(B * T, 4, True)
    assert 2 * half_cap != whole_cap  # the test tells the two apart
    for layer, s in enumerate(out.router_stats):
        assert s.capacity == 2 * half_cap
        assert int(s.dropped) == sum(int(h.router_stats[layer].dropped) for h in halves) > 0
        assert torch.equal(s.tokens_per_expert, sum(h.router_stats[layer].tokens_per_expert for h in halves))
        for name, value in s.losses.items():  # the unweighted balance loss: the micro-batches' mean
            assert torch.allclose(value, sum(h.router_stats[layer].losses[name] for h in halves) / 2, rtol=1e-6)
    aux = (halves[0].aux_loss + halves[1].aux_loss) / 2
    assert torch.allclose(out.aux_loss, aux, rtol=1e-6) and not torch.allclose(whole.aux_loss, aux, rtol=1e-4)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused_by_name(tmp_path):
    from moedsl.runtime.preflight import check_run

    spec = moedsl.load_spec(DROPLESS)
    o = RunOptions.from_spec(spec, steps=1, device="cpu", out=tmp_path / "r", micro_batches=3)
    with pytest.raises(MoedslError, match="micro_batches 3: the 8 sequences of each of 1 processes do not split "
                                          "into 3 equal micro-batches"):
        check_run(spec, o, 1)
    with pytest.raises(moedsl.SpecError, match="train.micro_batches: micro_batches 3 does not split batch_size 8"):
        moedsl.load_spec({**DROPLESS, "train": {**DROPLESS["train"], "micro_batches": 3}})


def test_run_flags_set_recompute_and_micro_batches(tmp_path, monkeypatch):
    import yaml

    from moedsl import cli
    from moedsl.runtime import train as train_mod

    seen = {}

    def stop(spec, o):
        seen["o"] = o
        raise MoedslError("stopped after reading the options")

    monkeypatch.setattr(train_mod, "run", stop)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(DROPLESS))
    argv = ["run", str(path), "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress", "--ignore-memory-check"]
    assert cli.main(argv + ["--recompute", "layers", "--micro-batches", "2"]) != 0
    assert (seen["o"].recompute, seen["o"].micro_batches) == ("layers", 2)
    assert cli.main(argv + ["--overwrite"]) != 0  # without the flags: the spec's train section
    assert (seen["o"].recompute, seen["o"].micro_batches) == ("none", 1)


def test_a_masked_loss_in_micro_batches_is_the_whole_batchs():
    """Instruction data: the micro-batches hold 3 and 21 of the step's marked targets; each
    divides its sum by the step's count, so the mean of their losses and the summed gradients
    are the whole batch's."""
    from moedsl.runtime.step import TrainStep

    spec = moedsl.load_spec(DROPLESS)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 32, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :3] = True
    mask[B // 2:, 5:] = True
    results = []
    for micro in (1, 2):
        model = moedsl.build_model(spec, seed=0, dtype=torch.float32)
        step = TrainStep.for_run(model, spec, RunOptions.from_spec(spec, micro_batches=micro), 0, 1, amp=None,
                                 capturable=False)
        step.lr.fill_(1e-3)
        out = step(inputs, inputs.roll(-1, 1), mask)
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert not close(ref_grads, grads, 1e-7)


@pytest.mark.parametrize("setting", [{"micro_batches": 2}, {"recompute": "experts"}])
def test_a_gpu_run_in_micro_batches_or_recomputing_steps_eagerly_and_says_why(setting):
    """The captured CUDA-graph step is not checked with either yet: ``auto`` runs eagerly and
    says so, ``on`` is refused (decided from the device's type: no GPU needed here)."""
    from moedsl.runtime.train import _use_cuda_graphs

    spec = moedsl.load_spec(tiny({"type": "switch", "capacity_factor": 1.25}))  # static: capturable otherwise
    compiled = moedsl.build_model(spec, device="meta", init=False, layout="static").compiled
    said = []
    say = type("Say", (), {"once": staticmethod(said.append)})
    cuda = torch.device("cuda")
    plain = RunOptions.from_spec(spec)
    assert _use_cuda_graphs(plain, cuda, compiled, say)
    o = RunOptions.from_spec(spec, **setting)
    assert not _use_cuda_graphs(o, cuda, compiled, say)
    name, value = next(iter(setting.items()))
    assert said == [f"CUDA graphs off: train.{name} {value} runs the step eagerly (its capture is not checked on a "
                    "GPU yet); running eager"]
    o.cuda_graphs = "on"
    with pytest.raises(MoedslError, match=f"--cuda-graphs on: cannot capture, train.{name} {value} runs"):
        _use_cuda_graphs(o, cuda, compiled, say)


def test_a_checkpoint_resumes_with_other_micro_batches_and_recomputation_and_names_the_change(tmp_path, capsys):
    spec = moedsl.load_spec(DROPLESS)
    first = RunOptions.from_spec(spec, steps=1, device="cpu", progress=False, out=tmp_path / "run", compile="off",
                                 eval_every=1, eval_batches=1)
    Trainer(spec, first).fit()
    capsys.readouterr()
    then = RunOptions.from_spec(spec, steps=2, device="cpu", progress=False, out=tmp_path / "run", compile="off",
                                eval_every=1, eval_batches=1, resume=True, micro_batches=2, recompute="layers")
    summary = Trainer(spec, then).fit()
    assert summary.steps == 2 and len(summary.losses) == 1
    said = capsys.readouterr().out
    assert "resuming with training-only changes" in said and "micro_batches 1 -> 2" in said, said
    assert "recompute" not in said.split("resuming")[1].splitlines()[0]
