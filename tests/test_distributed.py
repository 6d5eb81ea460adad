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


@pytest.mark.parametrize("world,layout", [(2, "grouped"), (4, "grouped"), (2, "static"), (4, "static")])
def test_examples_equal_single_process(world, layout):
    """Capacity layers both ways: their kept rows grouped (a CPU's default) and the padded
    static buffers with their fixed-size all-to-alls (a GPU's, capturable)."""
    names = EXAMPLES if layout == "grouped" else ["switch", "gshard", "st-moe", "expert-choice"]
    results = check([ROOT / "specs" / f"{n}.yaml" for n in names], world, layout=layout)
    assert_equal(results, names)
    # the checks exercised drops (capacity), not only dropless layers
    assert results[names.index("switch")][0].dropped > 0


def test_placements_equal_single_process():
    """On 4 ranks: the two-stage all-to-all over 2 nodes × 2 devices; replicated hot experts
    (uneven slots, static and dropless layouts); expert data parallelism (2 × 2)."""
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
    }
    results = check(list(specs.values()), 4, layout="static")
    assert_equal(results, list(specs))
    grouped = {k: v for k, v in specs.items() if "static" in k or "map" in k or "dp" in k}
    assert_equal(check(list(grouped.values()), 4, layout="grouped"), list(grouped))


def test_verify_command(capsys):
    from moedsl.cli import main

    assert main(["verify", str(ROOT / "specs" / "gshard.yaml"), "--nproc", "2", "--layout", "static"]) == 0
    out = capsys.readouterr().out
    assert "2 processes against one" in out and "NO" not in out
    assert main(["verify", str(ROOT / "specs" / "switch.yaml"), "--nproc", "3"]) == 2  # 8 experts on 3 ranks
    assert "expert-parallel ranks" in capsys.readouterr().err

