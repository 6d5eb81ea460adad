"""``moedsl run --nproc N``: start N workers on this machine through torch's elastic launcher
(what torchrun uses), each running ``python -m moedsl run`` with the same options. If a worker
fails or dies, the launcher stops the others and this reports which rank and how.

The workers live and die with the launcher:

- Ctrl-C (SIGINT to the launcher; the elastic agent starts each worker in a session of its
  own, so the terminal's signal reaches only the launcher) raises ``KeyboardInterrupt`` here;
  the agent then ends the workers with SIGTERM, whose default action ends a process without
  a word, and the CLI prints one line and exits 130.
- If the launcher itself dies (``kill -9``), each worker gets SIGTERM from the kernel: a worker
  asks for it at start with ``prctl(PR_SET_PDEATHSIG)`` (``bind_to_launcher``; Linux, see
  prctl(2)), which fires when the thread that started it exits, here the launcher's main
  thread, where the agent runs.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import uuid

import torch.distributed.elastic.agent.server.api  # noqa: F401 - creates the loggers to quiet
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from moedsl.errors import MoedslError

from .cpu import configure_threads

LAUNCHER_PID = "MOEDSL_LAUNCHER_PID"  # set for the workers this launcher starts
SIGNALS = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # the elastic launcher sets it from LaunchConfig.signals_to_handle
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launch(nproc: int, argv: list, monitor_interval: float = 0.5) -> None:
    _quiet_elastic_logs(logging)
    configure_threads(nproc)  # the workers inherit it: the cores split between them, threads that sleep
    saved = {k: os.environ.get(k) for k in (LAUNCHER_PID, SIGNALS)}
    os.environ[LAUNCHER_PID] = str(os.getpid())
    # SIGINT stays Python's KeyboardInterrupt here: the agent would otherwise turn it into its own
    # SignalException (a traceback) and send SIGINT on to the workers, each of which would say so
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"moedsl-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=monitor_interval, start_method="spawn",
                          signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "moedsl", *argv)
    except ChildFailedError as e:
        parts = []
        for rank, failure in sorted(e.failures.items()):
            how = f"exit code {failure.exitcode}" if failure.exitcode is not None and failure.exitcode >= 0 else \
                f"signal {-failure.exitcode}" if failure.exitcode is not None else "unknown"
            parts.append(f"rank {rank} ({how})")
        raise MoedslError(f"the run failed: {', '.join(parts)}; the other ranks were stopped") from None
    except Exception as e:  # the agent's SignalException (SIGTERM, SIGHUP, SIGQUIT): it has stopped the workers
        if isinstance(e, SignalException):
            raise MoedslError(f"the launcher got signal {signal.Signals(e.sigval).name}; the workers were stopped") \
                from None
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_elastic_logs(logging) -> None:
    """The agent's own warnings ("Sending process … closing signal") are not the user's business;
    its loggers set their own level when created, so set each one's."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launched_worker() -> bool:
    """Whether this process is a worker that ``launch`` started."""
    return LAUNCHER_PID in os.environ and "RANK" in os.environ


def bind_to_launcher() -> None:
    """In a worker ``launch`` started: end this process when the launcher dies.

    The kernel sends SIGTERM when the launcher's thread that started us exits; if the launcher
    died before we asked, our parent is already someone else, and we stop now."""
    if not launched_worker() or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(os.environ[LAUNCHER_PID]):
        os._exit(128 + int(signal.SIGTERM))
