"""``configure_threads`` (what `moedsl run` calls before it imports torch): torch's OpenMP
threads sleep while they wait for work instead of spinning on a core that other processes
need, and the cores are split between the processes of one machine; what the user set stands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moedsl.runtime.cpu import configure_threads, usable_cores

# Between two parallel ops the main thread does other work (here: sleeps 4 ms, as it would
# run Python or wait on I/O): how much CPU do torch's other OpenMP threads burn meanwhile?
PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from moedsl.runtime.cpu import configure_threads
    mode = sys.argv[1]
    in_time = configure_threads(busy=mode == "busy") if mode != "default" else None
    import torch
    def cpu(who):
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime
    x = torch.ones(1 << 20)
    torch.add(x, 1, out=x)  # the team is started
    process, main = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_THREAD)
    for _ in range(40):
        torch.add(x, 1, out=x)  # a parallel op on every thread
        time.sleep(0.004)
    others = (cpu(resource.RUSAGE_SELF) - process) - (cpu(resource.RUSAGE_THREAD) - main)
    print(json.dumps({"in_time": in_time, "others_cpu_s": others, "threads": torch.get_num_threads(),
                      "policy": __import__("os").environ.get("OMP_WAIT_POLICY"),
                      "spincount": __import__("os").environ.get("GOMP_SPINCOUNT")}))
""")


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env["OMP_NUM_THREADS"] = "2"  # a team of two, whatever the machine
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
@pytest.mark.parametrize("mode", ["busy", "free"])
def test_configured_openmp_threads_sleep_while_the_main_thread_is_away(mode):
    spun, slept = probe("default"), probe(mode)
    assert spun["threads"] == slept["threads"] == 2
    assert slept["in_time"] is True
    if mode == "busy":  # cores others load: sleep at once
        assert slept["policy"] == "passive" and slept["spincount"] is None
    else:  # free cores: a short spin (~0.24 ms), then sleep
        assert slept["policy"] is None and slept["spincount"] == "10000"
    # by default libgomp spins ~7 ms after each op: of 40 waits of 4 ms, a good part is burnt
    assert spun["others_cpu_s"] > 0.03, spun
    # configured, the other thread does its half of each op and at most a short spin
    assert slept["others_cpu_s"] < max(0.02, spun["others_cpu_s"] / 5), (slept, spun)


def test_configure_threads_leaves_what_the_user_set():
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(mine)
        configure_threads(environ=env)
        assert env == mine  # any wait setting of the user's: no policy of ours on top
    env = {"OMP_NUM_THREADS": "3"}
    configure_threads(nproc=4, environ=env, busy=True)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "passive"}


def test_configure_threads_splits_the_cores_between_processes_only_when_there_are_several():
    alone, four = {}, {}
    configure_threads(environ=alone, busy=False)
    assert "OMP_NUM_THREADS" not in alone  # one process: torch's own choice, every core
    configure_threads(nproc=4, environ=four, busy=False)
    assert four["OMP_NUM_THREADS"] == str(max(usable_cores() // 4, 1))
    assert four["GOMP_SPINCOUNT"] == "10000"


def test_configure_threads_says_when_torch_was_loaded_before_it():
    import torch  # noqa: F401 - here, as in any process that imported torch first

    assert configure_threads(environ={}) is False


@pytest.mark.slow
def test_moedsl_run_sets_how_threads_wait_before_the_openmp_runtime_reads_it(tmp_path):
    """The OpenMP runtime prints what it read (OMP_DISPLAY_ENV): moedsl run's setting, not libgomp's default."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    out = subprocess.run([sys.executable, "-m", "moedsl", "run", "specs/switch.yaml", "--steps", "1", "--batch", "4",
                          "--seq", "16", "--eval-batches", "1", "--no-progress", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    shown = out.stdout + out.stderr
    # libgomp's own default is 300000; passive waits show as 0
    assert "GOMP_SPINCOUNT = '10000'" in shown or "GOMP_SPINCOUNT = '0'" in shown, shown[-3000:]
