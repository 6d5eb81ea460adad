"""`moedsl run --nproc N`: the workers live and die with their launcher."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _foreground_signals() -> None:
    """SIGINT as a terminal's foreground job has it. A test run started in the background of a
    shell without job control (``pytest &`` in a script) inherits SIGINT ignored, which Python
    then keeps ignoring: no KeyboardInterrupt would ever reach the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out: Path) -> subprocess.Popen:
    """A 2-process run long enough to be stopped, in a session of its own (as a terminal's job)."""
    return subprocess.Popen([sys.executable, "-m", "moedsl", "run", "specs/switch.yaml", "--nproc", "2", "--steps",
                             "100000", "--batch", "2", "--seq", "8", "--eval-every", "100000", "--no-progress",
                             "--timeout", "30", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_foreground_signals)


def wait_for_training(proc: subprocess.Popen, out: Path, limit: float = 120) -> None:
    metrics, t = out / "metrics.jsonl", time.monotonic()
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - t < limit, "the workers did not start training"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_a_2_process_run_with_one_line_and_exit_130(tmp_path):
    proc = start(tmp_path)
    try:
        wait_for_training(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground job
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["moedsl: interrupted"]


@pytest.mark.slow
def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    proc = start(tmp_path)
    workers = []
    try:
        wait_for_training(proc, tmp_path)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=30)  # (not communicate: workers that outlive it keep its pipes open)
        t = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - t < 15:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "workers kept training without their launcher"
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
