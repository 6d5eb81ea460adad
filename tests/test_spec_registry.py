"""The spec language defined once: every layer kind and gate type in one registered module,
the defaults in the JSON Schema only, and nothing downstream that lists the kinds again."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
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
            ("sub_gate", S.SubGate), ("moe", S.MoE)] + [(name, kind.config) for name, kind in layer_kinds().items()] \
    + [("gate", g.Options) for g in gate_types().values()]


@pytest.mark.parametrize("defs_name,cls", SECTIONS, ids=[f"{s[0]}-{s[1].__module__}.{s[1].__qualname__}" for s in SECTIONS])
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


# ----------------------------------------------------------------------------- a gate asked, not named

def _names_a_gate_type(node: ast.Compare, names: set) -> bool:
    """A comparison of something holding a type (``gate.type``, ``gate_type``) with a gate
    type's name, or with a tuple / set / list holding one."""
    consts = []
    for side in [node.left, *node.comparators]:
        items = side.elts if isinstance(side, (ast.Tuple, ast.Set, ast.List)) else [side]
        consts += [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    return bool(set(consts) & names) and "type" in ast.unparse(node)


def test_nothing_outside_a_gate_types_module_compares_a_gate_type_with_its_name():
    """Decoding, inspection, evaluation, a resume and the routing ask the gate type
    (``gate_type(g.type).dense``, ``.experts_choose``, ``.capacity_is_budget``, ``.cannot_decode``,
    ``.noise``, ``.resume_may_change``): a gate type's knowledge stays in its module, and a new type
    gets the answers its module gives, not a default some comparison elsewhere falls into."""
    names = set(gate_types())
    found = []
    for folder in ("moedsl", "runtime", "compiler"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            own = {path.stem} if rel.startswith("moedsl/kinds/gates/") else set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and _names_a_gate_type(node, names - own):
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_each_gate_type_has_its_own_options_dataclass_with_the_fields_it_takes():
    """A gate's options are its type's ``Options`` (``Gate``'s fields plus its own): an option
    of one type is not a field of another's."""
    for name, g in gate_types().items():
        assert issubclass(g.Options, S.Gate) and dataclasses.is_dataclass(g.Options), name
        own = {f.name for f in dataclasses.fields(g.Options)} - {f.name for f in dataclasses.fields(S.Gate)}
        written = {"bias_balancing": "bias_balancing_rate"}
        assert own <= {written.get(o, o) for o in g.options}, f"{name}: fields it does not take: {own}"
    ec = moedsl.load_spec(ROOT / "specs" / "expert-choice.yaml").moe_layers[0].config.gate
    assert "max_experts_per_token" in {f.name for f in dataclasses.fields(ec)}
    assert not hasattr(ec, "noise_epsilon") and not hasattr(ec, "hash_seed")


@pytest.mark.parametrize("section", ["model", "attention", "ffn", "lstm", "latent_attention"])
def test_every_section_with_a_dropout_lets_a_resume_change_it(section):
    from moedsl.runtime.checkpoint import training_only

    names = ("model", "dropout") if section == "model" else ("layers", section, "dropout")
    assert training_only(names, 0.0, 0.1)


def test_a_new_kinds_dropout_is_a_change_a_resume_may_make(scale_kind):
    """No table to extend: dropout is training-only for every kind, declared on ``LayerKind``."""
    from moedsl.runtime.checkpoint import training_only

    assert training_only(("layers", "scale", "dropout"), 0.0, 0.1)
    assert not training_only(("layers", "scale", "residual"), True, False)


# ----------------------------------------------------------------------------- added as a contributor would

GATE_MODULE = '''"""``temperature``: top-k gating over softmax(x·W_g / temperature)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from moedsl.schema import defaults

from . import CAPACITY_KEYS, GateType, check_k, register
from .topk import Options as TopKOptions


@dataclass(frozen=True)
class Options(TopKOptions):
    temperature: float = defaults("gate")["temperature"]


class Temperature(GateType):
    name = "temperature"
    module = "TemperatureGate"
    Options = Options
    options = frozenset({"k", "temperature", "jitter", *CAPACITY_KEYS})
    losses = frozenset({"balance", "z_loss"})

    def check(self, g, path, experts, checks):
        check_k(g, path, experts, checks)

    @functools.cache
    def module_class(self):
        from moedsl.nn.gates import TopKGate

        class TemperatureGate(TopKGate):
            def logits(self, x, gidx):
                return super().logits(x, gidx) / self.spec.temperature

        return TemperatureGate


register(Temperature())
'''

KIND_MODULE = '''"""``scale``: a learned per-channel scale with dropout after it."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_SCALE = defaults("scale")


@dataclass(frozen=True)
class Scale:
    dropout: float = _SCALE["dropout"]
    residual: bool = _SCALE["residual"]
    prenorm: bool = _SCALE["prenorm"]


class ScaleKind(LayerKind):
    name = "scale"
    config = Scale
    sublayer = True

    def module(self, cfg, model):
        import torch

        scale = torch.nn.Parameter(torch.full((model.d_model,), 0.5))
        return torch.nn.Sequential(torch.nn.Dropout(cfg.dropout), _Scale(scale))


def _Scale(weight):
    import torch

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x * self.weight

    return Scale()


register(ScaleKind())
'''

SPEC = """moedsl: 1
name: contributed
model: {vocab_size: 32, d_model: 16, max_seq_len: 16}
layers:
  - embedding: {}
  - scale: {dropout: 0.1}
  - moe:
      experts: {count: 4, hidden: 16}
      gate: {type: temperature, k: 2, temperature: 2.0, capacity_factor: 1.5}
      losses: {balance: 0.01}
  - norm: {}
  - head: {}
train: {batch_size: 2, seq_len: 8, steps: 1}
"""

CHECK = """
import sys
from pathlib import Path

import moedsl
from moedsl.cli import main
from moedsl.errors import SpecError
from moedsl.runtime.checkpoint import training_only

assert Path(moedsl.__file__).parent == Path(sys.argv[1]), moedsl.__file__  # the contributor's tree
spec = moedsl.load_spec("contributed.yaml")
gate = spec.moe_layers[0].config.gate
print("gate", type(gate).__qualname__, gate.temperature, gate.k, gate.capacity_factor)
print("kind", spec.layers[1].kind, spec.layers[1].config)
assert main(["run", "contributed.yaml", "--out", "run", "--no-progress"]) == 0
print("resume", training_only(("layers", "scale", "dropout"), 0.1, 0.2),
      training_only(("layers", "moe", "gate", "temperature"), 2.0, 1.0, "temperature"),
      training_only(("layers", "moe", "gate", "capacity_factor"), 1.5, 2.0, "temperature"))
bad = Path("bad.yaml")
bad.write_text(Path("contributed.yaml").read_text().replace("temperature: 2.0", "temperature: 2.0, hash_seed: 3"))
try:
    moedsl.load_spec(bad)
except SpecError as e:
    print("refused", str(e).splitlines()[0])
"""


def _contribute(tree: Path) -> list[str]:
    """What a contributor writes to add the ``temperature`` gate (one option of its own) and the
    ``scale`` layer kind: their modules, their schema entries, and a spec naming them. Returns
    the files touched, relative to the repository."""
    (tree / "moedsl" / "kinds" / "gates" / "temperature.py").write_text(GATE_MODULE)
    (tree / "moedsl" / "kinds" / "scale.py").write_text(KIND_MODULE)
    path = tree / "moedsl" / "schema" / "moedsl.schema.json"
    s = json.loads(path.read_text())
    defs = s["$defs"]
    defs["gate_types"]["enum"].append("temperature")
    defs["gate"]["properties"]["temperature"] = {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                                                 "description": "Divides the router logits."}
    defs["scale"] = {"type": "object", "unevaluatedProperties": False, "$ref": "#/$defs/sublayer",
                     "properties": {"dropout": {"$ref": "#/$defs/probability", "default": 0.0}}}
    defs["layer_kinds"]["enum"].append("scale")
    for where in ("layer", "block_layer"):
        defs[where]["properties"]["scale"] = {"$ref": "#/$defs/scale"}
        defs[where]["oneOf"].append({"required": ["scale"]})
    path.write_text(json.dumps(s, indent=2))
    (tree / "contributed.yaml").write_text(SPEC)
    return ["moedsl/kinds/gates/temperature.py", "moedsl/kinds/scale.py", "moedsl/schema/moedsl.schema.json",
            "contributed.yaml"]


@pytest.mark.slow
def test_a_gate_type_and_a_layer_kind_added_as_a_contributor_would_validate_and_train_a_step(tmp_path):
    """A copy of the package, and in it only the new modules, their schema entries and a spec
    that names them: the spec validates (an option of another gate is refused), trains a step,
    and a resume may change the new kind's dropout but not the new gate's own option. The gate
    took three files (its module, the schema, the spec); nothing else lists the gate types."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "moedsl", tree / "moedsl", ignore=ignore)
    shutil.copytree(ROOT / "compiler", tree / "moedsl" / "compiler", ignore=ignore)
    shutil.copytree(ROOT / "runtime", tree / "moedsl" / "runtime", ignore=ignore)
    touched = _contribute(tree)
    assert len([f for f in touched if "scale" not in f]) == 3
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, "-c", CHECK, str(tree / "moedsl")], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "gate Options 2.0 2 1.5" in out
    assert "kind scale Scale(dropout=0.1, residual=True, prenorm=True)" in out
    assert "resume True False True" in out
    assert "refused" in out and "'hash_seed' does not apply to a temperature gate" in r.stdout + r.stderr
    metrics = (tree / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1]


# ----------------------------------------------------------------------------- one name, one module

def _package_modules():
    for folder in ("moedsl", "runtime", "compiler"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_two_modules_of_the_package_share_a_file_name():
    """A module's name says its job: two ``report.py`` (a plan's tables, a run's plot) or two
    ``mesh.py`` (its shape, its process groups) make every import a question. The one exception
    is a layer kind's module, named for its YAML key, beside its building block in ``moedsl/nn``."""
    seen: dict = {}
    for path in _package_modules():
        if path.name != "__init__.py":
            seen.setdefault(path.name, []).append(path.relative_to(ROOT).as_posix())
    kinds = {f"moedsl/kinds/{name}.py" for name in layer_kinds()}
    shared = {name: paths for name, paths in seen.items()
              if len(paths) > 1 and not (len(paths) == 2 and set(paths) - kinds == {f"moedsl/nn/{name}"})}
    assert not shared, shared


# being replaced by one model resolver (issue 22): its callers go with it
PRIVATE_LEFT: set = set()


def test_no_module_imports_a_private_name_of_another():
    """A helper two modules share is public (or lives where both can import it)."""
    found = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and (node.module, alias.name) not in PRIVATE_LEFT:
                        found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {alias.name} from "
                                     f"{'.' * node.level}{node.module}")
    assert not found, "\n".join(found)
