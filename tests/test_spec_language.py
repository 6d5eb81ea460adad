"""The spec language: example specs, the typed Spec, YAML hazards, schema/dataclass agreement."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import moedsl
from moedsl import SpecError, load_spec
from moedsl.errors import format_path
from moedsl import spec as S
from moedsl.cli import main
from moedsl.params import count_parameters
from moedsl.schema import schema
from moedsl.mesh import resolve_mesh

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
SMALL = ["shazeer-lstm-moe", "hierarchical-moe", "gshard", "switch", "st-moe", "glam", "expert-choice",
         "mixtral", "dropless", "hash", "deepseek-shared"]
HUGE = ["switch-c-2048", "glam-64e", "mixtral-8x7b", "shazeer-131k"]

BASE = """\
moedsl: 1
name: t
model: {vocab_size: 64, d_model: 16, max_seq_len: 32}
layers:
  - embedding: {}
  - moe:
      experts: {count: 4, hidden: 8}
      gate: {type: switch}
  - head: {}
"""


def errors_of(text: str) -> list:
    with pytest.raises(SpecError) as ei:
        load_spec(text)
    return ei.value.issues


def test_every_system_has_an_example_spec():
    names = {p.stem for p in SPECS}
    assert set(SMALL + HUGE) <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_specs_validate(path):
    spec = load_spec(path)
    assert spec.moe_layers or path.stem in ("dense", "vit-dense", "t5-small-dense"), "every example but the dense baselines has an MoE layer"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema="), "specs carry the editor modeline"
    assert "et al." in path.read_text() or "MegaBlocks" in path.read_text(), "header names the paper"


def test_cli_validate_all_specs(capsys):
    assert main(["validate", *map(str, SPECS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(SPECS) and all(": ok: " in line for line in out)


@pytest.mark.parametrize("name,total,active", [
    ("switch-c-2048", 1.571e12, 1.55e9),   # the paper: 1571B
    ("mixtral-8x7b", 46.7e9, 12.9e9),      # the paper: 46.7B total, 12.9B active
    ("shazeer-131k", 138e9, None),         # the paper: 137B in the MoE layer
])
def test_full_size_parameter_counts(name, total, active):
    t, a = count_parameters(load_spec(ROOT / "specs" / f"{name}.yaml"))
    assert t == pytest.approx(total, rel=0.01)
    if active is not None:
        assert a == pytest.approx(active, rel=0.01)


def test_repeat_and_cycle_expand():
    spec = load_spec(ROOT / "specs" / "gshard.yaml")
    kinds = [layer.kind for layer in spec.layers]
    assert kinds == ["embedding"] + ["attention", "ffn", "attention", "moe"] * 2 + ["norm", "head"]
    assert [m.moe_index for m in spec.moe_layers] == [0, 1]
    # the expanded layers remember the YAML item they came from
    assert spec.moe_layers[0].path == ("layers", 1, "block", 1, "cycle", 1)
    assert spec.moe_layers[0].config is spec.moe_layers[1].config


def test_gate_defaults_follow_the_papers():
    spec = load_spec(BASE)
    g = spec.moe_layers[0].config.gate
    assert (g.k, g.capacity_factor, g.drop_policy, g.jitter) == (1, 1.25, "drop", 0.01)
    g = load_spec(BASE.replace("type: switch", "type: gshard")).moe_layers[0].config.gate
    assert (g.k, g.capacity_factor, g.second_expert, g.normalize) == (2, 1.0, "random", True)
    g = load_spec(BASE.replace("type: switch", "type: topk, k: 2")).moe_layers[0].config.gate
    assert (g.capacity_factor, g.drop_policy) == (None, "dropless")
    g = load_spec(BASE.replace("type: switch", "type: expert_choice")).moe_layers[0].config.gate
    assert (g.capacity_factor, g.drop_policy, g.k) == (2.0, "drop", 0)


def test_capacity_formula():
    g = S.Gate(type="topk", k=2, capacity_factor=1.25, min_capacity=4)
    assert g.capacity(tokens=1000, experts=8) == 313  # ceil(1.25 * 2 * 1000 / 8) = ceil(312.5)
    assert g.capacity(tokens=8, experts=8) == 4  # min_capacity
    assert S.Gate(type="switch", k=1, capacity_factor=1.0).capacity(64, 8) == 8  # exact, no float fuzz
    ec = S.Gate(type="expert_choice", k=0, capacity_factor=2.0)
    assert ec.capacity(tokens=64, experts=8) == 16
    assert ec.capacity(tokens=4, experts=1) == 4  # an expert cannot pick more tokens than exist
    ev = S.Gate(type="switch", k=1, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert (ev.capacity(64, 8, training=True), ev.capacity(64, 8, training=False)) == (8, 16)


def test_yaml_12_scalars_and_anchors():
    text = """\
moedsl: 1
name: t
model: {vocab_size: 64, d_model: 16, max_seq_len: 32}
experts: &e {count: 4, hidden: 8}
"""
    # a top-level anchor holder is an unknown key; anchors inside layers are fine:
    text = BASE.replace("gate: {type: switch}", "gate: {type: switch}\n      losses: {balance: 1e-2, z_loss: 1E-3}")
    spec = load_spec(text)
    assert spec.moe_layers[0].config.losses.balance == 0.01
    assert spec.moe_layers[0].config.losses.z_loss == 0.001
    anchored = """\
moedsl: 1
name: t
model: {vocab_size: 64, d_model: 16, max_seq_len: 32}
layers:
  - embedding: {}
  - moe: &moe
      experts: {count: 4, hidden: 8}
      gate: &g {type: topk, k: 2}
  - moe:
      <<: *moe
      gate: {<<: *g, k: 1}
  - head: {}
"""
    spec = load_spec(anchored)
    assert [m.config.gate.k for m in spec.moe_layers] == [2, 1]


def test_norway_problem_and_strings():
    # YAML 1.1 would read `no` as false; here it stays a string and the schema names it
    issues = errors_of(BASE.replace("type: switch", "type: no"))
    assert "'no' is not one of" in issues[0].message


def test_dict_path_text_and_spec_inputs(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(BASE)
    a = load_spec(p)
    b = load_spec(str(p))
    c = load_spec(BASE)
    import yaml

    d = load_spec(yaml.safe_load(BASE))
    assert a == b == c == d
    assert load_spec(a) is a
    with pytest.raises(SpecError, match="cannot load a spec from int"):
        load_spec(42)


def test_several_errors_reported_together():
    text = """\
moedsl: 1
name: t
model: {vocab_size: 64, d_model: 18, max_seq_len: 32}
layers:
  - embedding: {}
  - attention: {heads: 4}
  - moe:
      experts: {count: 4, hidden: 8}
      gate: {type: topk, k: 5}
  - head: {}
train: {seq_len: 64}
"""
    issues = errors_of(text)
    where = {moedsl.errors.format_path(i.path): i.line for i in issues}
    assert where == {"layers[1].attention.heads": 6, "layers[2].moe.gate.k": 9, "train.seq_len": 11}


def test_error_lines_point_at_the_value():
    issues = errors_of(BASE.replace("count: 4", "count: 0"))
    (i,) = issues
    assert (i.line, i.column) == (7, 24)
    assert moedsl.errors.format_path(i.path) == "layers[1].moe.experts.count"
    assert "must be >= 1" in i.message


def test_unknown_key_suggests_and_points_at_the_key():
    issues = errors_of(BASE.replace("hidden: 8", "hiden: 8"))
    assert {i.message for i in issues} == {"unknown key 'hiden'", "missing required key 'hidden'"}
    i = next(i for i in issues if i.message.startswith("unknown"))
    assert (i.line, i.column) == (7, 27) and i.message == "unknown key 'hiden'" and "did you mean 'hidden'?" in i.hint
    (i,) = errors_of(BASE.replace("count: 4, hidden: 8", "count: 4, hidden: 8, k: 2"))
    assert "option of" in i.hint and "gate" in i.hint


def test_explicit_placement_and_replicas():
    text = BASE + """\
placement:
  mesh: {nodes: 2, devices_per_node: 1}
  experts:
    strategy: explicit
    map: [0, 0, [0, 1], 1]
    replicas: {2: 2}
"""
    spec = load_spec(text)
    assert spec.placement.map == ((0,), (0,), (0, 1), (1,))
    assert spec.placement.replicas == ((2, 2),)
    issues = errors_of(text.replace("replicas: {2: 2}", "replicas: {3: 1}"))
    assert any("placed on 2 rank(s)" in i.message for i in issues)
    issues = errors_of(text.replace("[0, 0, [0, 1], 1]", "[0, 0, [0, 1], 2]"))
    assert any("rank 2, which does not exist" in i.message for i in issues)


def test_resolve_mesh_against_world_size():
    spec = load_spec(ROOT / "specs" / "switch.yaml")  # no mesh: adapts to the run
    assert resolve_mesh(spec, 4).expert_parallel == 4
    with pytest.raises(SpecError, match="do not divide over 3 expert-parallel ranks"):
        resolve_mesh(spec, 3)
    glam = load_spec(ROOT / "specs" / "glam-64e.yaml")
    shape = resolve_mesh(glam, 1024)
    assert (shape.expert_parallel, shape.data_parallel, shape.nodes) == (64, 16, 128)
    with pytest.raises(SpecError, match="the run has 8 processes"):
        resolve_mesh(glam, 8)


def test_schema_defaults_match_the_dataclasses():
    """The schema's `default` annotations (what editors show) equal what the Spec uses."""
    defs = schema()["$defs"]
    pairs = [("model", S.Model), ("attention", S.Attention), ("lstm", S.LSTM), ("ffn", S.FFN),
             ("experts", S.Experts), ("train", S.Train), ("embedding", S.Embedding), ("head", S.Head),
             ("sublayer", S.FFN), ("capacity", S.Gate), ("gate", S.Gate), ("sub_gate", S.SubGate)]
    checked = 0
    for name, cls in pairs:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, sub in defs[name].get("properties", {}).items():
            if "default" in sub and key in fields and fields[key].default is not dataclasses.MISSING:
                assert fields[key].default == sub["default"], f"{name}.{key}"
                checked += 1
    assert checked >= 30


def test_schema_is_valid_draft_2020_12_and_printed_by_cli(capsys):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["$schema"].endswith("2020-12/schema")


def test_importing_moedsl_does_not_import_torch():
    code = "import sys, moedsl; moedsl.load_spec('specs/switch.yaml'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_validate_world_size_option(capsys):
    assert main(["validate", "--world-size", "4", str(ROOT / "specs" / "switch.yaml")]) == 0
    assert main(["validate", "--world-size", "3", str(ROOT / "specs" / "switch.yaml")]) == 2
    assert "expert-parallel ranks" in capsys.readouterr().err


def test_dtype_names_are_one_table_that_the_schema_enum_lists():
    import torch

    from moedsl import dtypes

    assert tuple(schema()["$defs"]["dtype"]["enum"]) == dtypes.NAMES
    spelled = [p.relative_to(ROOT).as_posix() for folder in ("moedsl", "compiler", "runtime")
               for p in (ROOT / folder).rglob("*.py")
               if '"bfloat16"' in p.read_text() and p.name != "dtypes.py"]
    assert not spelled, f"dtype names written again in {spelled}"
    for name in dtypes.NAMES:
        assert torch.tensor([], dtype=dtypes.torch_dtype(name)).element_size() == dtypes.itemsize(name) == dtypes.BYTES[name]
    assert dtypes.autocast_dtype("float32") is None and dtypes.autocast_dtype("bfloat16") is torch.bfloat16


def test_the_mesh_lives_in_moedsl_mesh_without_torch():
    from moedsl import validate

    assert not hasattr(validate, "MeshShape") and not hasattr(validate, "resolve_mesh")  # one home
    code = "import sys, moedsl.mesh; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_layer_that_is_also_a_repeat_inside_a_block_is_one_located_error():
    text = BASE.replace("  - moe:\n", "  - repeat: 1\n    block:\n    - attention: {heads: 2}\n      repeat: 2\n  - moe:\n")
    issues = errors_of(text)
    assert [(format_path(i.path), i.message) for i in issues] == [
        ("layers[1].block[0]", "a layer cannot be both 'attention' and 'repeat'")]


def test_validate_world_size_also_checks_that_the_batch_splits_over_the_processes(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(BASE.replace("gate: {type: switch}", "gate: {type: switch, routing_groups: 2}")
                    + "train: {batch_size: 6}\n")
    assert main(["validate", "--world-size", "2", str(path)]) == 0
    capsys.readouterr()
    assert main(["validate", "--world-size", "4", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size: the batch of 6 sequences does not split over 4 processes" in err[0]
