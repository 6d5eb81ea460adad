"""What rank 0 tells the person running: one-off messages and the progress of training
(a rich bar on a terminal, a line every 5% of the steps otherwise). Other ranks stay quiet."""
from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    def __init__(self, rank: int, progress: bool):
        self.rank, self.progress_on, self.seen = rank, progress, set()

    def once(self, text: str) -> None:
        """Print ``moedsl: text`` on rank 0, once per distinct text."""
        if self.rank == 0 and text not in self.seen:
            self.seen.add(text)
            print(f"moedsl: {text}", flush=True)

    def progress(self, total: int, start: int):
        """``update(step, loss, tokens_per_s, balance, eval_loss, accuracy=None)``; ``update(None, ...)`` closes it."""
        if self.rank != 0 or not self.progress_on:
            return lambda *a, **k: None
        if sys.stdout.isatty():
            bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            task = bar.add_task("train", total=total, completed=start, info="")
            bar.start()

            def update(step, loss, tps, balance, eval_loss, accuracy=None):
                if step is None:
                    bar.stop()
                    return
                info = f"loss {loss:.3f}  {tps:,.0f} tok/s  balance {balance:.2f}"
                if eval_loss is not None:
                    info += f"  eval {eval_loss:.3f}"
                if accuracy is not None:
                    info += f"  acc {accuracy:.3f}"
                bar.update(task, completed=step, info=info)
            return update
        every = max(total // 20, 1)

        def lines(step, loss, tps, balance, eval_loss, accuracy=None):
            if step is None or (step % every and step != total):
                return
            extra = f"  eval {eval_loss:.4f}" if eval_loss is not None else ""
            extra += f"  accuracy {accuracy:.4f}" if accuracy is not None else ""
            print(f"step {step:>6}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s  balance {balance:.2f}{extra}",
                  flush=True)
        return lines
