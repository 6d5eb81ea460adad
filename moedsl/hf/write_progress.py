"""What ``moedsl import`` and ``moedsl export`` tell the person waiting: tensors and bytes
written out of the total, known before the first is written (the shapes of the plan). On a
terminal a rich bar (bytes, tensors, rate, time left); otherwise, as ``moedsl run`` does, a
plain line on stdout, here every 10% of the bytes. Updated once per tensor written, never per
byte: the cost is one call per tensor.

Whether it shows: ``show`` False never (the Python API's default), True always, None (the
CLI's default) when the job writes at least ``AUTO_BYTES``: a smaller one is done in about a
second, and the tests' many tiny imports stay quiet.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from rich import filesize
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

AUTO_BYTES = 64 * 10**6  # the CLI's --progress help names it


def _sizes(done: int, total: int) -> str:
    """``1.2/2.4 GB``: both in the total's decimal unit, as the bar's DownloadColumn shows them."""
    unit, suffix = filesize.pick_unit_and_suffix(total, ["bytes", "kB", "MB", "GB", "TB", "PB"], 1000)
    digits = 0 if unit == 1 else 1
    return f"{done / unit:,.{digits}f}/{total / unit:,.{digits}f} {suffix}"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class Written:
    """``with Written("import", tensors, total_bytes, show) as done: ... done(nbytes)`` after each
    tensor is written."""

    def __init__(self, what: str, tensors: int, total: int, show: Optional[bool]):
        self.what, self.tensors, self.total = what, tensors, total
        self.on = show if show is not None else total >= AUTO_BYTES
        self.n = self.bytes = 0
        self.tenth = 0  # tenths of the job already reported by a plain line
        self.bar = None

    def __enter__(self):
        self.start = time.perf_counter()
        if self.on and sys.stdout.isatty():
            self.bar = Progress(TextColumn(f"[bold]{self.what}"), BarColumn(), DownloadColumn(),
                                TextColumn("{task.fields[n]}/{task.fields[of]} tensors"), TransferSpeedColumn(),
                                TimeRemainingColumn(), transient=False)
            # a job of only empty tensors has no bytes to count: the bar pulses until the end
            self.task = self.bar.add_task(self.what, total=self.total or None, n=0, of=self.tensors)
            self.bar.start()
        return self

    def __call__(self, nbytes: int) -> None:
        """One more tensor written, of ``nbytes`` bytes."""
        self.n += 1
        self.bytes += nbytes
        if not self.on:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.bytes, n=self.n)
            return
        tenth = 10 if self.n == self.tensors else self._percent() // 10
        if tenth > self.tenth:
            self.tenth = tenth
            print(self._line(), flush=True)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        if self.n == self.tensors:
            when = f"in {_seconds(elapsed)}"
        else:
            when = f"{_seconds((self.total - self.bytes) / rate)} left" if rate else ""
        pct = 100 if self.n == self.tensors else self._percent()
        return (f"{self.what} {pct:>3}%  {self.n}/{self.tensors} tensors  {_sizes(self.bytes, self.total)}  "
                f"{filesize.decimal(int(rate))}/s  {when}").rstrip()

    def _percent(self) -> int:
        """Percent of the bytes written, at most 99 before the last tensor: empty tensors (a
        zero-width shared expert) may come after the last byte. A job of only empty tensors
        counts its tensors instead."""
        done = 100 * self.bytes // self.total if self.total else 100 * self.n // self.tensors
        return min(done, 99)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
