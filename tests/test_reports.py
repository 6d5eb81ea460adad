"""What runs and the other commands leave for a person: loss.png, and tables that fit 80 columns."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from moedsl.cli import main
from moedsl.runtime import report

ROOT = Path(__file__).resolve().parents[1]
SWITCH = str(ROOT / "specs" / "switch.yaml")
TINY = ["--batch", "4", "--seq", "16", "--eval-batches", "1", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deep(tmp_path: Path) -> Path:
    """A run folder whose paths are longer than a line: they must be folded, not cut."""
    return tmp_path.joinpath(*(f"folder-{i}-of-a-deeply-nested-experiment" for i in range(4)), "run")


@pytest.fixture
def drawn(monkeypatch):
    """The loss figures a run draws, as (train steps, train losses, eval steps, eval losses)."""
    seen, real = [], report.loss_figure

    def spy(rows, title):
        fig = real(rows, title)
        lines = {line.get_label(): line for line in fig.axes[0].lines}
        seen.append((list(lines["train loss"].get_xdata()), list(lines["train loss"].get_ydata()),
                     list(lines["held-out loss"].get_xdata()), list(lines["held-out loss"].get_ydata())))
        return fig
    monkeypatch.setattr(report, "loss_figure", spy)
    return seen


def test_loss_figure_draws_every_logged_train_loss_and_a_held_out_marker_at_each_evaluation():
    rows = [{"step": s, "loss": 6.0 / s} for s in range(1, 31)]
    for r in rows[4::5]:
        r.update(eval_loss=r["loss"] + 0.1)
    rows[7]["loss"] = float("nan")  # a float16 step that overflowed: left out, not drawn as a gap in the axis
    fig = report.loss_figure(rows, "switch-small")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    kept = [r for r in rows if r["step"] != 8]
    assert list(lines["train loss"].get_xdata()) == [r["step"] for r in kept]
    assert list(lines["train loss"].get_ydata()) == [r["loss"] for r in kept]
    smooth = lines["train loss (smoothed)"].get_ydata()
    assert smooth[0] == kept[0]["loss"] and np.all(np.diff(smooth) < 0)  # the trend, from the first point
    assert lines["held-out loss"].get_linestyle() == "None" and lines["held-out loss"].get_marker() == "o"
    assert list(lines["held-out loss"].get_xdata()) == [5, 10, 15, 20, 25, 30]
    assert list(lines["held-out loss"].get_ydata()) == [r["eval_loss"] for r in rows[4::5]]
    assert ax.get_yscale() == "log"  # 6.0 down to 0.2: a factor of 30
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss") and "switch-small" in ax.get_title()
    assert len(fig.axes) == 1  # no accuracy: no second axis
    plt.close(fig)


def test_loss_figure_keeps_a_linear_axis_for_a_narrow_range_and_puts_image_accuracy_on_a_second_axis():
    rows = [{"step": s, "loss": 2.4 - 0.01 * s} for s in range(1, 21)]
    for r in rows[9::10]:
        r.update(eval_loss=r["loss"], accuracy=0.5 + r["step"] / 100)
    fig = report.loss_figure(rows, "v-moe")
    assert fig.axes[0].get_yscale() == "linear"
    acc = fig.axes[1]
    assert acc.get_ylabel() == "held-out accuracy" and acc.get_ylim() == (0, 1)
    assert [list(line.get_xdata()) for line in acc.lines] == [[10, 20]]
    assert [list(line.get_ydata()) for line in acc.lines] == [[0.6, 0.7]]
    plt.close(fig)


def test_run_writes_loss_png_and_after_a_resume_it_covers_the_whole_run_from_step_1(tmp_path, drawn, capsys):
    out = tmp_path / "run"
    assert main(["run", SWITCH, *TINY, "--steps", "6", "--eval-every", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # written through a temporary file, replaced whole
    rows = metrics(out)
    assert drawn[-1] == ([r["step"] for r in rows], [r["loss"] for r in rows], [2, 4, 6],
                         [r["eval_loss"] for r in rows if "eval_loss" in r])
    assert "loss plot" in capsys.readouterr().out
    drawn.clear()
    assert main(["run", SWITCH, *TINY, "--steps", "8", "--eval-every", "2", "--out", str(out),
                 "--resume", str(out / "checkpoints" / "step-00000004")]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    steps, losses, eval_steps, _ = drawn[-1]
    assert steps == list(range(1, 9)) and losses == [r["loss"] for r in rows]  # steps 1-4 from before the resume
    assert eval_steps == [2, 4, 6, 8]


def test_loss_png_is_drawn_as_the_run_goes_so_a_run_that_fails_keeps_its_curve(tmp_path, drawn, monkeypatch, capsys):
    monkeypatch.setenv("MOEDSL_FAULT", "nan@5")
    out = tmp_path / "run"
    assert main(["run", SWITCH, *TINY, "--steps", "8", "--eval-every", "2", "--out", str(out)]) == 1
    assert "is nan at step 5" in capsys.readouterr().err
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert drawn[0][0] == [1, 2] and drawn[0][2] == [2]  # at the first evaluation


def assert_fits_80_columns(text: str, whole: list):
    """Every line at most 80 characters, nothing cut with an ellipsis, and each of ``whole``
    (paths) there in full: read across the lines it is folded over."""
    long = [line for line in text.splitlines() if len(line) > 80]
    assert not long, f"{len(long)} line(s) over 80 columns:\n" + "\n".join(long)
    assert "…" not in text
    joined = "".join(text.split())
    for value in whole:
        assert "".join(str(value).split()) in joined, f"{value} is not shown whole"


def test_run_summary_piped_fits_80_columns_with_the_checkpoint_path_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # what rich takes when stdout is not a terminal
    monkeypatch.chdir(tmp_path)  # the paths are shown from here: shorter, and as usable
    out = deep(tmp_path)
    assert main(["run", SWITCH, *TINY, "--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = text[text.index("switch-small: 2 steps"):]
    shown = [p.relative_to(tmp_path) for p in (out / "checkpoints" / "step-00000002", out / "metrics.jsonl",
                                               out / "loss.png", out / "expert_load.png")]
    assert len(str(shown[0])) > 80 and str(tmp_path) not in "".join(summary.split())
    assert_fits_80_columns(summary, shown)
    labels = re.findall(r"^  (\S+(?: \S+)*?) {2,}", summary, re.M)
    assert max(map(len, labels)) <= 17  # no label wider than "held-out accuracy"


@pytest.mark.parametrize("command,columns", [("plan", 80), ("plan", 60), ("compile", 80), ("compile", 60)])
def test_plan_tables_fit_the_width_without_cutting_a_name(command, columns, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))  # 80: piped; 60: a narrow terminal
    assert main([command, SWITCH, "--world-size", "4"]) == 0
    text = capsys.readouterr().out
    tables = text[:text.index("graph of rank 0 of 4")]  # compile: then the torch.fx code, not a table
    long = [line for line in tables.splitlines() if len(line) > columns]
    assert not long and "…" not in tables, tables
    joined = "".join(tables.split())
    for layer in ("layers.2", "layers.4", "layers.6", "layers.8"):
        assert f"{layer}local" in joined  # each MoE layer's name whole, beside its routing


def test_eval_tables_piped_fit_80_columns_with_the_checkpoint_path_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # `moedsl eval` sets the OpenMP wait policy
    out = deep(tmp_path)
    assert main(["run", SWITCH, *TINY, "--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--capacity-factor", "1,0"]) == 0
    text = capsys.readouterr().out
    assert_fits_80_columns(text, [out / "checkpoints" / "step-00000002"])
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["0"])]
    assert [row[0] for row in rows] == ["1", "0"] and rows[1][1] == "(dropless)"


def test_verify_table_piped_fits_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["verify", SWITCH, "--nproc", "2", "--batch", "4", "--seq", "16"]) == 0
    text = capsys.readouterr().out
    assert_fits_80_columns(text, [])
    assert "".join(text.split()).count("equalyes") == 2  # each rank's row whole, to its last column


def test_verify_table_folds_a_long_router_difference_and_shows_its_brackets():
    from rich.console import Console

    from moedsl.runtime.equivalence import Difference

    bad = Difference(world=2, output=1e-9, aux_loss=0.0, grad=3e-8, worst_param="layers.10.experts.w1_and_more",
                     params_checked=40, dropped=0, excess=0.0, router=2.0,
                     worst_router="layers.3 dropped: [4, 0] on 2 ranks, [2, 0] in one process")
    console = Console(width=80, record=True)
    console.print(report.verify_table("a title", [bad]))
    text = console.export_text()
    assert_fits_80_columns(text, [])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    row = next(i for i, line in enumerate(lines) if line.startswith("0 "))

    def cell(name, after):  # a column's text in the row, read down the lines it is folded over
        start = header.index(name)
        end = header.index(after, start)
        folded = [lines[row]] + [line for line in lines[row + 1:] if line[:4].isspace()]  # the rank column blank
        return "".join("".join(line[start:end].split()) for line in folded)
    assert cell("parameter", "after step") == bad.worst_param
    assert cell("router", "ok") == "".join(bad.worst_router.split())  # [4, 0]: shown, not read as markup
    assert lines[row].rstrip().endswith("NO")
