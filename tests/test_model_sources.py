"""One resolver (what a path is, which weights it holds) and one loader: every caller goes
through them, and ``moedsl.api`` only re-exports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _imports(path: Path, package: str) -> set:
    """The modules ``path`` (a module of ``package``) imports, anywhere in it, as absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def test_no_module_of_moedsl_hf_imports_moedsl_api():
    """moedsl.api re-exports the loader, which reads imports through moedsl.hf: hf importing api back
    would be a circle."""
    for path in sorted((ROOT / "moedsl" / "hf").rglob("*.py")):
        package = "moedsl.hf" if path.parent.name == "hf" else "moedsl.hf.families"  # what `from .x` is under
        assert "moedsl.api" not in _imports(path, package), path


def test_moedsl_hf_imports_first_in_a_fresh_interpreter_without_moedsl_api():
    code = ("import sys, moedsl.hf.convert, moedsl.hf.weights; "
            "print('moedsl.api' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_moedsl_api_defines_nothing_but_re_exports():
    tree = ast.parse((ROOT / "moedsl" / "api.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["__getattr__"]  # the lazy look-up of the names that import torch


def test_no_module_but_the_resolver_decides_what_a_model_folder_is():
    """The duplicate finders are gone: which checkpoint a folder holds is asked of the resolver."""
    for path in [*(ROOT / "runtime").glob("*.py"), *(ROOT / "moedsl").rglob("*.py")]:
        text = path.read_text()
        for gone in ("def find_checkpoint", "def dcp_checkpoint", "def _source(", "def is_import_dir"):
            if path.name != "resolve.py":
                assert gone not in text, (path, gone)


@pytest.mark.parametrize("src, checkpoint, needle", [
    ("{tmp}/nothing", None, "{tmp}/nothing: no such file or folder"),
    ("{tmp}/nothing", "{tmp}/empty", "{tmp}/nothing: no such file or folder"),  # not read as YAML text
    ("{tmp}/empty", None, "{tmp}/empty: no checkpoint under it or its checkpoints/, and not an import folder"),
    ("{root}/specs/switch.yaml", None, "a spec needs a checkpoint"),
    ("{root}/specs/switch.yaml", "{tmp}/empty", "checkpoint {tmp}/empty: neither an import folder nor a moedsl"),
])
def test_a_path_that_holds_no_model_is_one_line_naming_it(tmp_path, src, checkpoint, needle):
    from moedsl.errors import UserError
    from moedsl.runtime.resolve import resolve

    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "root": ROOT}
    with pytest.raises(UserError) as e:
        resolve(src.format(**fill), checkpoint.format(**fill) if checkpoint else None)
    assert "\n" not in str(e.value) and needle.format(**fill) in str(e.value)


def test_load_model_of_a_missing_name_says_no_such_folder_like_the_cli_not_that_it_is_yaml_text(tmp_path,
                                                                                                 monkeypatch):
    import moedsl
    from moedsl.errors import SpecError, UserError

    monkeypatch.chdir(tmp_path)
    for checkpoint in (None, tmp_path):
        with pytest.raises(UserError, match="^nope: no such file or folder$"):
            moedsl.load_model("nope", checkpoint=checkpoint)
    with pytest.raises(SpecError, match="nope.*no such file"):
        moedsl.load_spec("nope")
    assert moedsl.load_spec((ROOT / "specs" / "switch.yaml").read_text()).model  # YAML text is still text
