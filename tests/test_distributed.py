"""Expert-parallel execution on N gloo processes equals the single-process execution of the
same spec, weights and global batch: outputs, aux loss and every parameter's gradient."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from moedsl.runtime.equivalence import check

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["switch", "gshard", "mixtral", "expert-choice", "hierarchical-moe", "hash", "deepseek-shared",
            "st-moe", "dropless", "shazeer-lstm-moe"]


def data(name: str) -> dict:
    return yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())


def variant(name: str, placement: dict, **gate) -> dict:
    d = copy.deepcopy(data(name))
    d["placement"] = placement
    d["name"] = f"{d['name']}-{'-'.join(sorted(placement))}"
    if gate:
        for item in d["layers"]:
            for sub in item.get("block", []) + [item]:
                for moe in [sub.get("moe")] + [c.get("moe") for c in sub.get("cycle", [])]:
                    if moe and "gate" in moe:
                        moe["gate"].update(gate)
    return d


def assert_equal(results, names):
    for name, per_rank in zip(names, results):
        for diff in per_rank:
            assert diff.ok(), f"{name}: {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(2, "grouped"), (4, "grouped"), (2, "static"), (4, "static")])
def test_examples_equal_single_process(world, layout):
    """Capacity layers both ways: their kept rows grouped (a CPU's default) and the padded
    static buffers with their fixed-size all-to-alls (a GPU's, capturable)."""
    names = EXAMPLES if layout == "grouped" else ["switch", "gshard", "st-moe", "expert-choice"]
    results = check([ROOT / "specs" / f"{n}.yaml" for n in names], world, layout=layout)
    assert_equal(results, names)
    # the checks exercised drops (capacity), not only dropless layers
    assert results[names.index("switch")][0].dropped > 0


@pytest.mark.slow
def test_placements_equal_single_process():
    """On 4 ranks: the two-stage all-to-all over 2 nodes × 2 devices; replicated hot experts
    (uneven slots, static and dropless layouts); placement.replication's E + R slots, their rows
    split by position over copies on both nodes, through the two-stage all-to-all; expert data
    parallelism (2 × 2)."""
    two_nodes = {"mesh": {"nodes": 2, "devices_per_node": 2}, "all_to_all": "hierarchical"}
    replication = {**two_nodes, "replication": {"policy": "eplb", "redundant": 4}}
    specs = {
        "hierarchical-a2a-static": variant("switch", {"mesh": {"nodes": 2, "devices_per_node": 2},
                                                      "all_to_all": "hierarchical"}, routing_groups=4),
        "hierarchical-a2a-packed": variant("mixtral", {"mesh": {"nodes": 2, "devices_per_node": 2},
                                                       "all_to_all": "hierarchical"}),
        "replicas-static": variant("switch", {"experts": {"strategy": "contiguous", "replicas": {0: 3, 5: 2}}},
                                   routing_groups=4),
        "replicas-packed": variant("mixtral", {"experts": {"strategy": "round_robin", "replicas": {1: 2}}}),
        "explicit-map": variant("gshard", {"experts": {"strategy": "explicit",
                                                       "map": [3, 2, 1, 0, [0, 1], 1, 2, 3],
                                                       "replicas": {4: 2}}}),
        "expert-dp": variant("switch", {"expert_parallel": 2, "data_parallel": 2}, routing_groups=4),
        "replication-hierarchical-static": variant("switch", replication, routing_groups=4),
        "replication-hierarchical-packed": variant("mixtral", replication),
    }
    results = check(list(specs.values()), 4, layout="static")
    assert_equal(results, list(specs))
    grouped = {k: v for k, v in specs.items() if "static" in k or "map" in k or "dp" in k}
    assert_equal(check(list(grouped.values()), 4, layout="grouped"), list(grouped))


@pytest.mark.slow
def test_verify_command(capsys):
    from moedsl.cli import main

    assert main(["verify", str(ROOT / "specs" / "gshard.yaml"), "--nproc", "2", "--layout", "static"]) == 0
    out = capsys.readouterr().out
    assert "2 processes against one" in out and "NO" not in out
    assert main(["verify", str(ROOT / "specs" / "switch.yaml"), "--nproc", "3"]) == 2  # 8 experts on 3 ranks
    assert "expert-parallel ranks" in capsys.readouterr().err



def _faulty_worker(rank: int, world: int, fault, *args):
    """``moedsl verify``'s worker with ``fault`` in rank 1's distributed step, not in the
    single-process reference it also runs: ``after_step`` moves a weight after AdamW's step,
    ``clip`` halves the clipped gradients."""
    import torch

    from moedsl.runtime import equivalence
    from moedsl.runtime.grads import GradSync
    from moedsl.runtime.step import TrainStep

    if rank == 1 and fault == "after_step":
        step = TrainStep.__call__

        def faulty_step(self, inputs, targets):
            out = step(self, inputs, targets)
            if self.world > 1:
                with torch.no_grad():
                    next(self.model.parameters()).view(-1)[0] += 1e-3
            return out

        TrainStep.__call__ = faulty_step
    if rank == 1 and fault == "clip":
        clip = GradSync.clip

        def faulty_clip(self, max_norm, inv_scale=None):
            norm = clip(self, max_norm, inv_scale)
            if self.world > 1:
                torch._foreach_mul_([p.grad for p in self._params if p.grad is not None], 0.5)
            return norm

        GradSync.clip = faulty_clip
    return equivalence._worker(rank, world, *args)


@pytest.mark.slow
def test_verify_runs_the_runs_bucketed_sync_clip_and_adamw_and_sees_a_fault_in_either():
    """verify checks the step a run executes: the bucketed sync's hooks, registered before
    backward, launch all-reduces while it runs; a weight moved after the optimizer step, or a
    wrong clip, on one rank is found there."""
    from moedsl.runtime.spawn import spawn

    args = ([yaml.safe_load((ROOT / "specs" / "switch.yaml").read_text())], 8, 16, 0, "auto", 2e-5, 1e-4)
    clean = [r[0] for r in spawn(_faulty_worker, 2, None, *args)]
    for d in clean:
        assert d.ok(), d
        assert 0 < d.from_hooks <= d.buckets, d  # launched from backward's hooks, not after it
    after_step = [r[0] for r in spawn(_faulty_worker, 2, "after_step", *args)]
    assert after_step[0].ok() and not after_step[1].ok()
    assert after_step[1].param == pytest.approx(1e-3, rel=1e-2) and after_step[1].worst_after == "embedding.weight"
    assert after_step[1].grad == clean[1].grad  # only the weights after the step tell
    clip = [r[0] for r in spawn(_faulty_worker, 2, "clip", *args)]
    assert not clip[1].ok() and clip[1].grad > 100 * clean[1].grad


def test_verify_refuses_a_token_model_without_a_head_in_one_line(tmp_path, capsys):
    """The step verify runs is a run's: its task loss needs the head's logits."""
    from moedsl.cli import main

    d = {"moedsl": 1, "name": "headless", "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16},
         "layers": [{"embedding": {}},
                    {"moe": {"experts": {"count": 4, "hidden": 16}, "gate": {"type": "topk", "k": 2}}}]}
    (tmp_path / "headless.yaml").write_text(yaml.safe_dump(d))
    assert main(["verify", str(tmp_path / "headless.yaml"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "without a head layer has no task loss" in err
