"""What a run leaves for a person: the expert-load plot and the summary table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table


def plot_expert_load(metrics: Path, png: Path, title: str):
    """One heat map per MoE layer: the share of assignments each expert computed, over steps."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("expert_load")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def summary_table(s):
    t = Table(title=f"{s.spec}: {s.steps} steps on {s.world} process(es)", box=box.SIMPLE_HEAVY,
              show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    rows = [("train loss (first → last)", f"{s.first_loss:.4f} → {s.train_loss:.4f}")]
    if s.eval_loss is not None:
        rows.append(("held-out loss", f"{s.eval_loss:.4f}" + (f"  (perplexity {s.eval_ppl:.2f})" if s.eval_ppl else "")))
    if getattr(s, "eval_accuracy", None) is not None:
        rows.append(("held-out accuracy", f"{s.eval_accuracy:.4f}"))
    rows += [("tokens", f"{s.tokens:,}"), ("time", f"{s.seconds:.1f} s"), ("tokens / s", f"{s.tokens_per_s:,.0f}"),
             ("expert load, max / mean (1 = even)", f"{s.balance:.2f}"), ("assignments dropped", f"{s.dropped:.2%}"),
             ("CUDA graphs", "on" if s.cuda_graphs else "off"),
             ("checkpoint", s.checkpoint or "-"), ("metrics", s.metrics), ("plot", s.plot or "-")]
    for k, v in rows:
        t.add_row(k, v)
    return t
