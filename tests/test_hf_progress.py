"""Progress of ``moedsl import`` and ``moedsl export``: tensors and bytes written out of the
total, a plain line every 10% when stdout is not a terminal, a bar on one; on by default only
past ``progress.AUTO_BYTES``, never with ``--no-progress``, and never from the Python API
unless asked."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl.hf.write_progress as progress  # noqa: E402
from moedsl.cli import main  # noqa: E402
from moedsl.hf.convert import import_checkpoint  # noqa: E402
from moedsl.hf.files import header  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
LINE = re.compile(r"^(import|export) +(\d+)%  (\d+)/(\d+) tensors  ([\d.,]+)/([\d.,]+) (\w+)  \S+ \w+/s(  .+)?$")


def _hf(folder: Path) -> Path:
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).save_pretrained(folder)
    return folder


def _on_disk(folder: Path) -> tuple:
    """(tensors, bytes of tensor data) in the safetensors files of ``folder``, from their headers."""
    tensors = data = 0
    for f in folder.glob("*.safetensors"):
        head, _ = header(f)
        for name, v in head.items():
            if name != "__metadata__":
                tensors += 1
                data += v["data_offsets"][1] - v["data_offsets"][0]
    return tensors, data


def _lines(text: str, what: str) -> list:
    """The progress lines of ``what`` in ``text``, parsed; every one of them must parse."""
    found = [line for line in text.splitlines() if line.startswith(what + " ")]
    parsed = [LINE.match(line) for line in found]
    assert all(parsed), found
    return [(int(m[2]), int(m[3]), int(m[4]), m[5], m[6], m[7]) for m in parsed]


def _counts_up_to(lines: list, folder: Path) -> None:
    """Percent and tensors only go up, and the last line is every tensor and byte in ``folder``."""
    tensors, data = _on_disk(folder)
    assert 2 <= len(lines) <= 11, lines  # a line per tenth crossed, not per tensor
    assert [p for p, *_ in lines] == sorted({p for p, *_ in lines})
    assert [n for _, n, *_ in lines] == sorted({n for _, n, *_ in lines})
    pct, n, of, done, total, unit = lines[-1]
    assert (pct, n, of) == (100, tensors, tensors)
    assert f"{done}/{total} {unit}" == progress._sizes(data, data) and done == total


def test_import_reports_every_tensor_and_byte_it_writes_in_plain_lines_when_piped(tmp_path, capsys):
    src = _hf(tmp_path / "hf")
    capsys.readouterr()
    done = import_checkpoint(str(src), tmp_path / "imp", progress=True)
    out = capsys.readouterr().out
    assert "\x1b" not in out  # not a terminal: no bar, no colour codes
    lines = _lines(out, "import")
    _counts_up_to(lines, tmp_path / "imp")
    assert lines[-1][1] == done["tensors"]


def test_export_reports_every_tensor_and_byte_it_writes_and_a_tiny_import_stays_quiet(tmp_path, capsys):
    src = _hf(tmp_path / "hf")
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(tmp_path / "imp")]) == 0
    assert capsys.readouterr().out.startswith("imported ")  # under AUTO_BYTES: the summary line alone
    assert main(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "exp"), "--progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    _counts_up_to(_lines(out, "export"), tmp_path / "exp")
    assert out.splitlines()[-1].startswith("exported ")


def test_progress_shows_past_the_size_threshold_unless_no_progress_and_never_from_the_api_by_default(
        tmp_path, capsys, monkeypatch):
    src = _hf(tmp_path / "hf")
    monkeypatch.setattr(progress, "AUTO_BYTES", 1)  # every job is past it
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(tmp_path / "a")]) == 0
    _counts_up_to(_lines(capsys.readouterr().out, "import"), tmp_path / "a")
    assert main(["import", str(src), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    import_checkpoint(str(src), tmp_path / "d")
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["imported", "exported"], out


def test_on_a_terminal_a_bar_shows_bytes_tensors_and_rate(tmp_path):
    src = _hf(tmp_path / "hf")
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "moedsl", "import", str(src), "--out", str(tmp_path / "imp"),
                          "--progress"], stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    text = seen.decode()
    tensors, data = _on_disk(tmp_path / "imp")
    assert "\x1b[" in text  # drawn and redrawn, not printed as lines
    drawn = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", s) for s in text[:text.index("imported ")].split("\r")]
    plain = [s for s in drawn if " tensors" in s][-1]  # the bar as it was left, before the summary line
    assert f"{tensors}/{tensors} tensors" in plain, plain
    assert progress._sizes(data, data) in plain and "B/s" in plain, plain
    assert "imported " in text


def test_empty_tensors_after_the_last_byte_still_count_before_the_hundred_percent_line(capsys):
    with progress.Written("export", 4, 300, True) as written:
        for nbytes in (100, 200, 0, 0):  # zero-width shared experts last (DeepSeek-V3, n_shared_experts 0)
            written(nbytes)
    lines = _lines(capsys.readouterr().out, "export")
    assert [(pct, n) for pct, n, *_ in lines] == [(33, 1), (99, 2), (100, 4)]
