"""The spec language defined once: every layer kind and gate type in one registered module,
the defaults in the JSON Schema only, and nothing downstream that lists the kinds again."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import moedsl
from moedsl import spec as S
from moedsl.kinds import LayerKind, layer_kind, layer_kinds, register
from moedsl.kinds.gates import gate_types
from moedsl.schema import schema

ROOT = Path(__file__).resolve().parents[1]


def test_every_layer_kind_of_the_schema_has_a_module_and_every_module_a_schema_entry():
    defs = schema()["$defs"]
    in_schema = set(defs["layer_kinds"]["enum"])
    assert set(layer_kinds()) == in_schema
    for where in ("layer", "block_layer"):
        admitted = set(defs[where]["properties"]) - {"repeat", "block", "cycle"}
        branches = {b["required"][0] for b in defs[where]["oneOf"]} - {"repeat", "cycle"}
        assert admitted == branches == in_schema, where
    for name, kind in layer_kinds().items():
        assert name in defs, f"the schema has no $defs entry for the layer kind {name!r}"
        assert kind.__module__ == f"moedsl.kinds.{name}", "one module per kind, named for it"
        assert dataclasses.is_dataclass(kind.config)


def test_every_gate_type_of_the_schema_has_a_module_and_every_module_a_schema_entry():
    defs = schema()["$defs"]
    registered = {name for name, g in gate_types().items() if g.in_schema}
    assert registered == set(defs["gate_types"]["enum"])
    assert {n for n, g in gate_types().items() if g.sub_gate_options} == set(defs["sub_gate"]["properties"]["type"]["enum"])
    gate_keys = set(defs["gate"]["properties"]) | set(defs["capacity"]["properties"])
    for name, g in gate_types().items():
        assert g.__module__ == f"moedsl.kinds.gates.{name}", "one module per gate type, named for it"
        assert issubclass(g.module_class(), torch.nn.Module)
        assert g.options <= gate_keys, f"{name}: options the schema does not have: {g.options - gate_keys}"


def _schema_defaulted_fields(cls, defs_name):
    return {k for k in _schema_defaults(defs_name) if k in {f.name for f in dataclasses.fields(cls)}}


def _schema_defaults(name):
    from moedsl.schema import defaults

    return defaults(name)


# the dataclass of each schema definition whose defaults it takes
SECTIONS = [("model", S.Model), ("train", S.Train), ("experts", S.Experts), ("gate", S.Gate),
            ("sub_gate", S.SubGate), ("moe", S.MoE)] + [(name, kind.config) for name, kind in layer_kinds().items()]


@pytest.mark.parametrize("defs_name,cls", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_a_default_is_written_once_in_the_schema_and_read_by_the_dataclass(defs_name, cls):
    """No field whose schema property has a `default` restates it as a literal: the dataclass
    reads it from the schema, so the two cannot drift (and agree, as editors show them)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    literal = {node.target.id for node in ast.walk(tree)
               if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant)}
    wanted = _schema_defaulted_fields(cls, defs_name)
    assert not (literal & wanted), f"{cls.__name__} writes schema defaults again: {sorted(literal & wanted)}"
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    for key in wanted:
        assert values[key] == _schema_defaults(defs_name)[key], f"{defs_name}.{key}"


def test_placement_defaults_come_from_the_schema():
    tree = ast.parse(textwrap.dedent(inspect.getsource(S.Placement)))
    literal = {node.target.id for node in ast.walk(tree)
               if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant)}
    assert not literal & {"strategy", "all_to_all"}


# ----------------------------------------------------------------------------- a new kind, in one place

@dataclass(frozen=True)
class Scale:
    residual: bool = True
    prenorm: bool = False


class ScaleModule(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x * self.weight


class ScaleKind(LayerKind):
    """A learned per-channel scale: a layer kind defined entirely in this test."""

    name = "scale"
    config = Scale
    sublayer = True

    def module(self, cfg, model):
        return ScaleModule(model.d_model)


@pytest.fixture
def scale_kind():
    from moedsl import kinds

    register(ScaleKind())
    yield layer_kind("scale")
    kinds._KINDS.pop("scale")
    kinds._meta_numel.cache_clear()


def test_a_kind_registered_in_one_module_is_counted_lowered_and_planned(scale_kind):
    base = moedsl.load_spec(ROOT / "specs" / "switch.yaml")
    layers = list(base.layers)
    layers.insert(1, S.Layer(kind="scale", config=Scale(), index=1, path=("layers", 1)))
    layers = tuple(dataclasses.replace(layer, index=i) for i, layer in enumerate(layers))
    spec = dataclasses.replace(base, layers=layers)

    from moedsl.params import count_parameters

    assert count_parameters(spec)[0] == count_parameters(base)[0] + 128
    model = moedsl.build_model(spec)
    assert "layers_1_scale" in model.code and model.get_submodule("layers.1.scale").weight.shape == (128,)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(spec)[0]
    out = model(torch.randint(0, 256, (4, 8)))
    assert out.output.shape == (4, 8, 256)
    _, plan = moedsl.compile(spec)
    _, base_plan = moedsl.compile(base)
    assert plan.flops_per_token_forward == base_plan.flops_per_token_forward + 2 * 128


def test_nothing_outside_a_kind_module_names_the_lstm():
    """The eight places that spelled out one layer kind are one: its module (and its nn.Module's
    home among the building blocks, and the schema)."""
    allowed = {"moedsl/kinds/lstm.py", "moedsl/nn/layers.py", "moedsl/spec.py"}
    found = []
    for folder in ("moedsl", "compiler"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in allowed and "lstm" in path.read_text().lower():
                found.append(rel)
    assert not found, found
