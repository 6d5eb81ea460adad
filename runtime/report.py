"""What a person reads of a run and of the checks on it: the loss and expert-load plots, the run
summary, and the tables of `moedsl eval` and `moedsl verify`."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table
from rich.text import Text

from moedsl.plan_report import key_value_table

LOG_Y_RATIO = 5.0  # losses spanning more than this factor: a log axis keeps the late, small gains visible


def read_metrics(metrics: Path) -> list:
    """The rows of ``metrics.jsonl``: the whole run, a resumed one's earlier steps included."""
    return [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, png: Path) -> Path:
    """Write ``fig`` to ``png`` atomically: a reader (an image viewer refreshing as the run goes)
    sees the previous plot or this one, never half a file."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, png)
    return png


def smoothed(values: np.ndarray) -> np.ndarray:
    """An exponential moving average spanning about 1/20 of the steps, bias-corrected at the start
    (as TensorBoard's smoothing), so the first points are not pulled towards zero."""
    span = max(len(values) / 20, 1.0)
    beta = 1 - 2 / (span + 1)
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1)) if beta > 0 else v
    return out


def loss_figure(rows: list, title: str):
    """The figure of ``loss.png`` from metrics rows: train loss per logged step (raw, and smoothed),
    held-out loss at each evaluation as markers, held-out accuracy (image classifiers) on a second
    axis. ``None`` where no row has a finite loss."""
    def finite(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)

    steps, loss = finite("loss")
    if not len(steps):
        return None
    eval_steps, eval_loss = finite("eval_loss")
    acc_steps, acc = finite("accuracy")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss")
    if len(steps) > 2:
        ax.plot(steps, smoothed(loss), color="tab:blue", linewidth=1.8, label="train loss (smoothed)")
    if len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o", color="tab:orange", markersize=5, label="held-out loss")
    shown = np.concatenate([loss, eval_loss])
    if shown.min() > 0 and shown.max() / shown.min() > LOG_Y_RATIO:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(FormatStrFormatter("%g"))  # 0.6, 2, 4: not 6×10⁻¹
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(acc_steps):
        ax2 = ax.twinx()
        ax2.plot(acc_steps, acc, "s--", color="tab:green", markersize=4, linewidth=1, label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title(f"{title}: loss over steps")
    fig.tight_layout()
    return fig


def plot_losses(metrics: Path, png: Path, title: str):
    """``loss.png`` from the whole of ``metrics.jsonl``; rewritten as the run goes. ``None``
    (and nothing written) before the first step."""
    fig = loss_figure(read_metrics(metrics), title)
    if fig is None:
        return None
    try:
        return _save(fig, png)
    finally:
        _pyplot().close(fig)


def plot_expert_load(metrics: Path, png: Path, title: str):
    """One heat map per MoE layer: the share of assignments each expert computed, over steps."""
    rows = [r for r in read_metrics(metrics) if r.get("expert_load")]
    if not rows:
        return None
    plt = _pyplot()
    layers = list(rows[0]["expert_load"])
    n = len(layers)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, layer in zip(axes.flat, layers):
        load = np.array([r["expert_load"][layer] for r in rows]).T  # [E, steps]
        E = load.shape[0]
        window = max(len(steps) // 60, 1)  # a moving average: the trend, not every step's noise
        if window > 1:
            kernel = np.ones(window) / window
            load = np.stack([np.convolve(row, kernel, mode="same") for row in load])
        im = ax.imshow(load * E, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(load.max() * E)),
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5), interpolation="nearest")
        ax.set_title(f"{layer} ({E} experts)")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="load × E (1 = even)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{title}: expert load per layer")
    fig.tight_layout()
    try:
        return _save(fig, png)
    finally:
        plt.close(fig)


def shown_path(path) -> str:
    """``path`` as the summary shows it: relative to the working directory where that is shorter,
    so it stays short enough to read and whole to copy."""
    text = str(path)
    try:
        rel = os.path.relpath(text)
    except ValueError:  # another drive (Windows)
        return text
    return rel if len(rel) < len(text) else text


def summary_table(s):
    t = key_value_table(f"{s.spec}: {s.steps} steps on {s.world} process(es)")
    rows = [("train loss", f"{s.first_loss:.4f} → {s.train_loss:.4f} (first → last)")]
    if s.eval_loss is not None:
        rows.append(("held-out loss", f"{s.eval_loss:.4f}" + (f" (perplexity {s.eval_ppl:.2f})" if s.eval_ppl else "")))
    if getattr(s, "eval_accuracy", None) is not None:
        rows.append(("held-out accuracy", f"{s.eval_accuracy:.4f}"))
    rows += [("tokens", f"{s.tokens:,}"), ("time", f"{s.seconds:.1f} s"), ("tokens / s", f"{s.tokens_per_s:,.0f}"),
             ("expert load", f"{s.balance:.2f} max / mean (1 = even)"),
             ("dropped", f"{s.dropped:.2%} of assignments")]
    per_layer = getattr(s, "balancedness", None) or {}
    if per_layer and s.world > 1:  # the last logging step's; every step's is in metrics.jsonl
        worst = min(per_layer, key=per_layer.get)
        rows.append(("balancedness", f"{per_layer[worst]:.2f} mean / max tokens per rank, at {worst} "
                                     f"(the least even of {len(per_layer)} MoE layers; 1 = even)"))
    rows.append(("CUDA graphs", "on" if s.cuda_graphs else "off"))
    for label, path in (("checkpoint", s.checkpoint), ("metrics", s.metrics), ("loss plot", s.loss_plot),
                        ("load plot", s.plot)):
        rows.append((label, shown_path(path) if path else "-"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def verify_table(title: str, diffs: list) -> Table:
    """``moedsl verify``'s table: one row per rank, each the largest |Δ| against one process. In
    80 columns (rich's width when piped): short headers, one space between columns, and the
    names (the worst parameter, where a router count differs) folded, never cut."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, padding=0)
    for col in ("rank", "output", "aux loss", "gradient", "worst parameter", "after step", "hooks", "router", "ok"):
        t.add_column(col, overflow="fold")
    for rank, d in enumerate(diffs):
        router = Text("equal") if d.router == 0 else Text(d.worst_router, style="red")  # holds [...]: not markup
        t.add_row(str(rank), f"{d.output:.2e}", f"{d.aux_loss:.2e}", f"{d.grad:.2e}", d.worst_param,
                  f"{d.param:.2e}", f"{d.from_hooks}/{d.buckets}", router,
                  "yes" if d.ok() else Text("NO", style="red"))
    return t


def eval_tables(sweep: list) -> list:
    """``moedsl eval``'s tables: what was evaluated (the checkpoint's path whole, folded where it
    is longer than a line), then one row per evaluation capacity factor."""
    r = sweep[0]
    head = key_value_table(f"{r['spec']} at step {r['step']}: {r['examples']} held-out examples")
    head.add_row("checkpoint", shown_path(r["checkpoint"]))
    note = {"spec": " (the spec's train.data: an import holds no held-out data of its own)"}.get(r["data_from"], "")
    head.add_row("data", f"{r['data']}{note}")
    accuracy = any(x["accuracy"] is not None for x in sweep)
    bpb = any(x.get("bits_per_byte") is not None for x in sweep)  # text: comparable across tokenizers
    t = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col in (("eval capacity factor", "loss") + (("accuracy",) if accuracy else ()) + (("bits/byte",) if bpb else ())
                + ("dropped", "MoE layers set")):
        t.add_column(col, overflow="fold", justify="left" if col == "eval capacity factor" else "right")
    for x in sweep:
        cap = ("as trained" if x["capacity_factor"] is None else "0 (dropless)" if x["capacity_factor"] == 0 else
               f"{x['capacity_factor']:g}")
        acc = (f"{x['accuracy']:.4f}" if x["accuracy"] is not None else "-",) if accuracy else ()
        acc += (f"{x['bits_per_byte']:.4f}" if x.get("bits_per_byte") is not None else "-",) if bpb else ()
        t.add_row(cap, f"{x['loss']:.4f}", *acc, f"{x['dropped']:.2%}", str(x["gates"]))
    return [head, t]
