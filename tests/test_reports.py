"""What a run leaves for a person: loss.png."""
from __future__ import annotations

import json
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
