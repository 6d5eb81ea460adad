"""Replication policies (compiler/replication.py): DeepSeek's EPLB, ported and checked against its
published example; FasterMoE's shadowing rule on the plan's cost model; the placement interface
the runtime calls; and `moedsl plan --load`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedsl
from moedsl.cli import main
from moedsl.compiler.replication import (LayerCost, balanced_packing, balancedness, eplb, model_step, place,
                                         rank_tokens, shadow)
from moedsl.errors import SpecError
from moedsl.spec import Replication

ROOT = Path(__file__).resolve().parents[1]

# deepseek-ai/EPLB README, "Interface and Example": its weight and the phy2log it prints
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def per_rank(phy2log, ep: int) -> list:
    per = len(phy2log) // ep
    return [list(phy2log[r * per:(r + 1) * per]) for r in range(ep)]


def test_eplb_reproduces_the_example_of_deepseeks_readme_exactly():
    phy2log, log2phy, logcnt = eplb(torch.tensor(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    for layer in range(2):  # log2phy lists each expert's slots, logcnt counts them
        for e in range(12):
            slots = [s for s in log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, e] and all(phy2log[layer, s] == e for s in slots)


def test_eplb_never_gives_an_expert_more_replicas_than_there_are_devices():
    # DeepSeek's code gives expert 0 three of the 6 slots on 2 devices: [0, 0, 3, 0, 1, 2]
    phy2log, _, logcnt = eplb([[100.0, 5.0, 1.0, 1.0]], 6, 1, 1, 2)
    assert logcnt.tolist() == [[2, 2, 1, 1]]
    assert all(len(set(r)) == 3 for r in per_rank(phy2log[0].tolist(), 2))


def test_two_replicas_of_one_expert_go_to_different_devices():
    # every expert gets 2 replicas; DeepSeek's code packs them [1, 1, 0, 0 | 2, 2, 3, 3]: both
    # copies of each expert on one device, so replication evens nothing
    phy2log = eplb([[40.0, 60.0, 60.0, 40.0]], 8, 1, 1, 2)[0][0].tolist()
    assert sorted(phy2log) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(sorted(r) == [0, 1, 2, 3] for r in per_rank(phy2log, 2))


def test_packing_separates_an_expert_the_greedy_order_left_twice_on_one_pack():
    # heaviest first: 10 → pack 0, 10 → pack 1, 5 → pack 0 (full); the last item (expert 3) has only
    # pack 1 left, which holds expert 3 already: a swap separates them
    weight, labels = torch.tensor([[2.0, 10.0, 10.0, 5.0]]), torch.tensor([[3, 0, 3, 2]])
    pack, rank = balanced_packing(weight, 2, labels=labels)
    packs = [[labels[0, i].item() for i in range(4) if pack[0, i] == p] for p in range(2)]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in packs)
    assert sorted(zip(pack[0].tolist(), rank[0].tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@st.composite
def layouts(draw):
    ep = draw(st.sampled_from([1, 2, 4, 8]))
    nodes = draw(st.sampled_from([n for n in (1, 2, 4) if ep % n == 0]))
    per = draw(st.integers(1, 3))  # logical experts per rank
    E = ep * per
    R = ep * draw(st.integers(0, min(per * (ep - 1) // ep, 2) if ep > 1 else 0))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if E % g == 0]))
    load = draw(st.lists(st.one_of(st.integers(0, 1000), st.floats(0, 1e6)), min_size=E, max_size=E))
    return E, R, ep, nodes, groups, load


COST = LayerCost(flops_per_assignment=6 * 2 * 64 * 256, row_bytes=256, grad_bytes=4 * 2 * 64 * 256,
                 device_flops=1e10, intra_node_bandwidth=1e10, inter_node_bandwidth=1e9, devices_per_node=4)


@pytest.mark.parametrize("policy", ["eplb", "shadow"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts())
def test_every_expert_has_a_slot_and_no_rank_holds_one_twice_for_any_load(policy, layout):
    E, R, ep, nodes, groups, load = layout
    phy2log = place(Replication(policy=policy, redundant=R), load, ep, nodes, groups, cost=COST)
    assert len(phy2log) == E + R and (E + R) % ep == 0  # equal slot counts per rank
    assert set(phy2log) == set(range(E))  # every logical expert has at least one slot
    for r, slots in enumerate(per_rank(phy2log, ep)):
        assert len(set(slots)) == len(slots), f"rank {r} holds {slots}"


def zipf(E: int, s: float, tokens: float = 4096.0) -> list:
    w = [1.0 / (i + 1) ** s for i in range(E)]
    return [x / sum(w) * tokens for x in w]


def test_one_redundant_slot_per_rank_brings_a_zipf_skewed_layer_to_a_balancedness_of_0_9():
    E, ep = 16, 4
    for s in (1.0, 1.6):  # the hottest expert at 4.7 and 8.1 times the mean
        load = zipf(E, s)
        before = balancedness(rank_tokens(tuple(range(E)), load, ep))
        phy2log = place(Replication(policy="eplb", redundant=ep), load, ep)
        after = balancedness(rank_tokens(phy2log, load, ep))
        assert before < 0.5 and after >= 0.9, (s, before, after)


def test_modelled_all_to_all_leaves_a_ranks_own_tokens_off_the_wire():
    load = [400.0] * 4  # one expert per rank, 100 tokens from each source
    m = model_step((0, 1, 2, 3), load, 4, COST)
    # 300 of a rank's tokens leave it and 300 come back computed, each way forward and backward
    assert m.sent_bytes == [4 * 300 * COST.row_bytes] * 4
    assert m.rank_tokens == [400.0] * 4 and m.sync_s == 0.0
    shadowed = model_step((0, 1, 1, 2, 1, 3, 1, 0), load, 4, COST)  # expert 1 on every rank (2 slots each)
    assert shadowed.sent_bytes[0] < m.sent_bytes[0] and shadowed.sync_s > 0


def test_shadow_copies_the_hottest_expert_to_every_rank_where_that_shortens_the_modelled_step():
    load = [300.0, 250.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]
    eplb_only = place(Replication(policy="eplb", redundant=4), load, 4)  # what the slots hold unshadowed
    phy2log = shadow(load, 4, 4, COST)
    assert all(0 in slots for slots in per_rank(phy2log, 4)) and Counter(eplb_only)[0] < 4
    assert model_step(phy2log, load, 4, COST).total_s < model_step(eplb_only, load, 4, COST).total_s


def test_shadow_copies_nothing_to_every_rank_where_the_load_is_even():
    load = [100.0] * 8
    assert shadow(load, 4, 4, COST) == place(Replication(policy="eplb", redundant=4), load, 4)


def test_place_refuses_slots_that_do_not_divide_over_the_ranks():
    with pytest.raises(ValueError, match="8 experts \\+ 2 redundant slots do not divide over 4"):
        place(Replication(policy="eplb", redundant=2), [1.0] * 8, 4)
    with pytest.raises(ValueError, match="the shadow policy needs the cost figures"):
        place(Replication(policy="shadow", redundant=4), [1.0] * 8, 4)


def hash_spec(tmp_path: Path, **placement) -> Path:
    d = yaml.safe_load((ROOT / "specs" / "hash.yaml").read_text())
    d["layers"][1]["repeat"] = 1
    d["placement"] = placement
    p = tmp_path / "hash.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_placement_hardware_has_defaults_and_takes_the_figures_written(tmp_path):
    default = moedsl.load_spec(hash_spec(tmp_path)).placement.hardware
    assert default.device_flops > 0 and default.intra_node_bandwidth > default.inter_node_bandwidth
    spec = moedsl.load_spec(hash_spec(tmp_path, hardware={"device_flops": 5.0e10, "inter_node_bandwidth": 1.0e9}))
    assert (spec.placement.hardware.device_flops, spec.placement.hardware.inter_node_bandwidth) == (5.0e10, 1.0e9)
    assert spec.placement.hardware.intra_node_bandwidth == default.intra_node_bandwidth
    with pytest.raises(SpecError, match="device_flops"):
        moedsl.load_spec(hash_spec(tmp_path, hardware={"device_flops": 0}))


@pytest.mark.parametrize("policy,given,want", [("shadow", None, "nearest"), ("eplb", None, "position"),
                                                ("shadow", "position", "position"), ("eplb", "source", "source")])
def test_a_policy_without_a_dispatch_takes_its_own_shadow_serves_its_rank_eplb_splits_by_position(
        tmp_path, policy, given, want):
    """FasterMoE's shadows save all-to-all bytes only if each rank computes its own tokens of the
    shadowed expert (nearest); EPLB's placement assumes each copy gets an equal share (position)."""
    replication = {"policy": policy, "redundant": 4, **({"dispatch": given} if given else {})}
    spec = moedsl.load_spec(hash_spec(tmp_path, expert_parallel=4, replication=replication))
    assert spec.placement.replication.dispatch == want


def plan_spec(tmp_path: Path, **replication) -> Path:
    placement = {"mesh": {"nodes": 1, "devices_per_node": 4}}
    if replication:
        placement["replication"] = replication
    return hash_spec(tmp_path, **placement)


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_load_prints_each_ranks_tokens_before_and_after_eplb_from_inspect_output(tmp_path, capsys):
    spec = plan_spec(tmp_path, policy="eplb", redundant=4)
    load = zipf(8, 1.0, 1.0)
    (tmp_path / "inspect.json").write_text(json.dumps({"tokens": 4096, "layers": [{"layer": "layers.2",
                                                                                    "load": load}]}))
    out = plan_json(capsys, spec, "--load", tmp_path / "inspect.json")
    (layer,) = out["replication"]
    step = 16 * 64  # the spec's batch × seq, k = 1 (hash)
    before, after = layer["before"]["rank_tokens"], layer["after"]["rank_tokens"]
    assert before == pytest.approx([step * sum(load[2 * r:2 * r + 2]) for r in range(4)])  # contiguous: 2 per rank
    assert sum(after) == pytest.approx(step) and len(layer["phy2log"]) == 12
    assert layer["balancedness_before"] == pytest.approx(sum(before) / 4 / max(before))
    assert layer["balancedness_before"] < 0.5 < 0.9 < layer["balancedness_after"]
    assert main(["plan", str(spec), "--load", str(tmp_path / "inspect.json")]) == 0
    text = capsys.readouterr().out
    assert "tokens before" in text and f"balancedness (mean/max tokens per rank) {layer['balancedness_before']:.3f}" \
        in text


def test_plan_load_reads_a_runs_metrics_over_the_policys_window(tmp_path, capsys):
    spec = plan_spec(tmp_path, policy="eplb", redundant=4, window=2)
    hot = [0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    rows = [{"step": 10, "expert_load": {"layers.2": [1 / 8] * 8}},  # outside the window: not counted
            {"step": 20, "expert_load": {"layers.2": hot}}, {"step": 30, "loss": 1.0},
            {"step": 40, "expert_load": {"layers.2": hot}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (layer,) = plan_json(capsys, spec, "--load", tmp_path / "metrics.jsonl")["replication"]
    assert layer["before"]["rank_tokens"][0] == pytest.approx(16 * 64 * 0.7)


def test_plan_load_without_a_policy_says_how_to_name_one(tmp_path, capsys):
    spec = plan_spec(tmp_path)
    (tmp_path / "inspect.json").write_text(json.dumps({"layers": [{"layer": "layers.2", "load": [1] * 8}]}))
    assert main(["plan", str(spec), "--load", str(tmp_path / "inspect.json")]) == 2
    assert "name a policy with --policy eplb|shadow" in capsys.readouterr().err
    out = plan_json(capsys, spec, "--load", tmp_path / "inspect.json", "--policy", "shadow", "--redundant", "4")
    assert out["replication"][0]["policy"] == "shadow" and len(out["replication"][0]["phy2log"]) == 12


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), per_node=st.sampled_from([1, 2, 4]), policy=st.sampled_from(["eplb", "shadow"]))
def test_the_even_split_shortcut_models_what_the_per_source_loop_models(layout, per_node, policy):
    E, R, ep, nodes, groups, load = layout
    cost = LayerCost(**{**COST.__dict__, "devices_per_node": per_node})
    phy2log = place(Replication(policy=policy, redundant=R), load, ep, cost=cost)
    even = model_step(phy2log, load, ep, cost)  # a flat load: the shortcut
    loop = model_step(phy2log, [[x / ep for x in load]] * ep, ep, cost)  # per source: the loop
    assert even.rank_tokens == pytest.approx(loop.rank_tokens, rel=1e-9, abs=1e-6)
    assert even.sent_bytes == pytest.approx(loop.sent_bytes, rel=1e-9, abs=1e-3)
    assert (even.all_to_all_s, even.sync_s) == pytest.approx((loop.all_to_all_s, loop.sync_s), rel=1e-9, abs=1e-12)
