"""A corpus of broken specs: each file in tests/broken/ has exactly one mistake and says,
in its first comment lines, where the error must point:

    # expect: <path as moedsl prints it> @ <1-based line>
    # message: <a substring the message must contain>      (optional)
    # note: <why, for the reader>                           (optional)

``moedsl validate`` must exit 2, print no traceback, and print a line
``FILE:LINE:COL: PATH: message`` with that PATH and LINE (and the message).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moedsl import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKEN = HERE / "broken"
FILES = sorted(BROKEN.glob("*.yaml"))

_EXPECT = re.compile(r"^# expect: (?P<path>\S.*?) @ (?P<line>[1-9][0-9]*)\s*$")
_MESSAGE = re.compile(r"^# message: (?P<message>\S.*?)\s*$")

# moedsl defects, each pinned by a corpus file whose expectation is what a user should see.
# These are xfail(strict=True): once moedsl is fixed the XPASS fails, and the entry must go.
KNOWN_DEFECTS: dict[str, str] = {
}


def expectation(path: Path) -> tuple[str, int, str | None]:
    """(json path, line, message substring or None) from the file's leading comments."""
    head = path.read_text(encoding="utf-8").splitlines()[:3]
    m = _EXPECT.match(head[0]) if head else None
    assert m, f"{path.name}: the first line must be '# expect: <path> @ <line>'"
    message = None
    if len(head) > 1 and (mm := _MESSAGE.match(head[1])):
        message = mm.group("message")
    return m.group("path"), int(m.group("line")), message


def error_lines(output: str, file: str) -> list[tuple[int, int, str, str]]:
    """(line, col, path, message) of every ``FILE:LINE:COL: PATH: message`` line."""
    pat = re.compile(rf"^{re.escape(file)}:(\d+):(\d+): (.+?): (.+)$")
    return [(int(m[1]), int(m[2]), m[3], m[4]) for m in map(pat.match, output.splitlines()) if m]


def assert_reported(output: str, file: str, path: str, line: int, message: str | None) -> None:
    found = error_lines(output, file)
    assert found, f"no FILE:LINE:COL: PATH: message line in:\n{output}"
    hits = [f for f in found if f[2] == path and f[0] == line and (message is None or message in f[3])]
    want = f"{file}:{line}:COL: {path}: ...{message or ''}..."
    assert hits, f"expected a line like\n  {want}\ngot:\n{output}"


def run_validate(capsys, *files: str) -> tuple[int, str, str]:
    rc = cli.main(["validate", *files])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_subprocess(*files: str) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moedsl", "validate", *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def _param(path: Path):
    marks = ()
    if path.name in KNOWN_DEFECTS:
        marks = pytest.mark.xfail(reason=f"moedsl defect: {KNOWN_DEFECTS[path.name]}", strict=True)
    return pytest.param(path, id=path.stem, marks=marks)


# ----------------------------------------------------------------------------- every file, in-process

@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_broken_spec(path, capsys):
    want_path, want_line, want_message = expectation(path)
    rc, out, err = run_validate(capsys, str(path))
    assert "Traceback" not in out + err
    assert rc == 2, f"exit code {rc}, stdout:\n{out}\nstderr:\n{err}"
    assert ": ok:" not in out
    assert_reported(err, str(path), want_path, want_line, want_message)


# ----------------------------------------------------------------------------- the corpus itself

def _sections(path: Path) -> set[str]:
    """What a corpus file exercises: the spec section of its expected path, the layer kind and
    moe part it names, and for YAML/loader files (named NN-yaml-* / NN-load-*) that category."""
    want_path, _, _ = expectation(path)
    out = set()
    kind = path.stem.split("-")[1]
    if kind == "yaml":
        out.add("yaml syntax")
    elif kind == "load":
        out.add("loading hazards")
    parts = re.findall(r"[^.\[\]]+", want_path)
    first = parts[0]
    out.add(first if first in ("model", "layers", "placement", "train") else "(top level)")
    if first == "layers":
        for k in ("attention", "ffn", "moe"):
            if k in parts:
                out.add(k)
        if "moe" in parts:
            rest = parts[parts.index("moe") + 1:]
            out.add("moe." + rest[0] if rest else "moe")
            if "hierarchy" in kind or "hierarchy" in rest:
                out.add("moe.hierarchy")
    return out


def test_corpus_is_big_and_well_formed():
    assert len(FILES) >= 40, f"only {len(FILES)} broken specs"
    names = [p.name for p in FILES]
    assert all(re.fullmatch(r"[0-9]{2,}-[a-z0-9-]+\.yaml", n) for n in names), names
    assert len({n.split("-")[0] for n in names}) == len(names), "two files share a number"
    for p in FILES:
        expectation(p)  # every file states where its error must point
    stale = set(KNOWN_DEFECTS) - set(names)
    assert not stale, f"KNOWN_DEFECTS names files that are gone: {stale}"


def test_corpus_touches_every_section():
    covered = set().union(*(_sections(p) for p in FILES))
    required = {"(top level)", "model", "layers", "attention", "ffn", "moe", "moe.experts", "moe.gate",
                "moe.losses", "moe.hierarchy", "placement", "train", "yaml syntax", "loading hazards"}
    assert required <= covered, f"no broken spec for: {sorted(required - covered)}"


# ----------------------------------------------------------------------------- generated cases

def _big_spec(tmp_path: Path, megabytes: int = 10) -> Path:
    spec = (BROKEN / "09-top-wrong-version.yaml").read_text().replace("moedsl: 2", "moedsl: 1")
    pad = "# " + "x" * 1021 + "\n"  # 1 KiB per line
    path = tmp_path / "huge.yaml"
    path.write_text(spec + pad * (megabytes * 1024))
    assert path.stat().st_size >= megabytes * 2**20
    return path


def test_ten_megabyte_file(tmp_path, capsys):
    path = _big_spec(tmp_path)
    t0 = time.perf_counter()
    rc, out, err = run_validate(capsys, str(path))
    assert time.perf_counter() - t0 < 2.0
    assert rc == 2 and "Traceback" not in out + err
    assert re.search(rf"^{re.escape(str(path))}(:1:1)?: \(top level\): .*MiB", err, re.M), err


def test_missing_file(tmp_path, capsys):
    for path in (tmp_path / "nope.yaml", tmp_path / "nope"):
        rc, out, err = run_validate(capsys, str(path))
        assert rc == 2 and "Traceback" not in out + err, err
        assert re.search(rf"^{re.escape(str(path))}: \(top level\): no such file", err, re.M), err


def test_several_files_each_reported(capsys):
    """Validating many files reports every one and still exits 2."""
    files = [str(FILES[i]) for i in (0, len(FILES) // 2, len(FILES) - 1)]
    rc, out, err = run_validate(capsys, str(ROOT / "specs" / "switch.yaml"), *files)
    assert rc == 2 and "Traceback" not in out + err
    assert "switch.yaml: ok:" in out
    for f in files:
        assert f"{f}:" in err


# ----------------------------------------------------------------------------- end to end

SUBPROCESS_CASES = ["09-top-wrong-version.yaml", "59-placement-map-rank-missing.yaml", "68-load-python-tag.yaml",
                    "71-load-alias-bomb.yaml"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_subprocess(name):
    path = BROKEN / name
    want_path, want_line, want_message = expectation(path)
    rc, out, err, seconds = run_subprocess(str(path))
    assert rc == 2, f"exit code {rc}:\n{out}\n{err}"
    assert "Traceback" not in out + err
    assert "pwned" not in out + err  # the !!python tag ran nothing
    assert_reported(err, str(path), want_path, want_line, want_message)
    if "alias-bomb" in name:
        assert seconds < 2.0, f"the alias bomb took {seconds:.2f} s to refuse"


def test_subprocess_ten_megabyte_file(tmp_path):
    path = _big_spec(tmp_path)
    rc, out, err, seconds = run_subprocess(str(path))
    assert rc == 2 and "Traceback" not in out + err, err
    assert "MiB" in err
    assert seconds < 2.0, f"the 10 MB file took {seconds:.2f} s to refuse"


# ----------------------------------------------------------------------------- several mistakes at once

SCHEMA_MISTAKES = """\
moedsl: 1
name: several
model:
  vocab_size: 256
  d_model: 64
  dtype: bf16
layers:
  - embedding: {}
  - attention: {heads: 4, kv_head: 2}
  - moe:
      experts: {count: 4, hidden: 128}
      gate: {type: topk, k: 2}
      losses: {balence: 0.01}
  - head: {}
train:
  steps: 0
"""

SEMANTIC_MISTAKES = """\
moedsl: 1
name: several
model:
  vocab_size: 256
  d_model: 64
  max_seq_len: 128
layers:
  - embedding: {}
  - attention: {heads: 6}
  - moe:
      experts: {count: 4, hidden: 128}
      gate: {type: topk, k: 8}
  - head: {}
placement:
  experts:
    strategy: explicit
    map: [0, 1, 1]
train:
  seq_len: 256
"""

MIXED_MISTAKES = """\
moedsl: 1
name: several
model:
  vocab_size: 256
  d_model: 64
  dtype: bf16
layers:
  - embedding: {}
  - attention: {heads: 6}
  - moe:
      experts: {count: 4, hidden: 128}
      gate: {type: switch, k: 2}
  - head: {}
train:
  steps: 10
  seq_len: 0
"""


@pytest.mark.parametrize("text, expected", [
    pytest.param(SCHEMA_MISTAKES, [
        ("model.dtype", 6, "'bf16' is not one of"),
        ("layers[1].attention.kv_head", 9, "did you mean 'kv_heads'"),
        ("layers[2].moe.losses.balence", 13, "did you mean 'balance'"),
        ("train.steps", 16, "must be >= 1"),
    ], id="schema"),
    pytest.param(SEMANTIC_MISTAKES, [
        ("layers[1].attention.heads", 9, "not divisible by 6 heads"),
        ("layers[2].moe.gate.k", 12, "k = 8 exceeds the 4 experts"),
        ("placement.experts.map", 17, "the map places 3 experts"),
        ("train.seq_len", 19, "exceeds model.max_seq_len 128"),
    ], id="semantic"),
    pytest.param(MIXED_MISTAKES, [
        ("model.dtype", 6, "'bf16' is not one of"),
        ("layers[1].attention.heads", 9, "not divisible by 6 heads"),
        ("layers[2].moe.gate.k", 12, "use topk"),
        ("train.seq_len", 16, "must be >= 1"),
    ], id="schema-and-semantic"),
])
def test_several_mistakes_all_reported(tmp_path, capsys, text, expected):
    path = tmp_path / "several.yaml"
    path.write_text(text)
    rc, out, err = run_validate(capsys, str(path))
    assert rc == 2 and "Traceback" not in out + err
    for want_path, want_line, want_message in expected:
        assert_reported(err, str(path), want_path, want_line, want_message)
    lines = {line for line, *_ in error_lines(err, str(path))}
    assert {line for _, line, _ in expected} <= lines
