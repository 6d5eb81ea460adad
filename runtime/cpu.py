"""CPU process settings for MoE training: how torch's OpenMP threads wait and how many
there are (``configure_threads``), and how malloc keeps freed memory (``keep_freed_memory``).

glibc's malloc returns every freed block of 32 MiB or more (mmap) to the kernel at once, and
trims its heap whenever 2x its mmap threshold of it is free. A training step allocates
and frees the same large activations and gradients every step, so each step page-faults
them all in again: measured on the project's 2-core machine, 14-32 thousand faults (64-128
MiB touched fresh) and 36-86 ms of system time per forward+backward of one 4096-token MoE
layer, a quarter of its time. ``keep_freed_memory`` makes malloc keep freed memory for
reuse, as the CUDA caching allocator does on a GPU: the steps after the first touch no
new pages. ``moedsl run`` calls it on a CPU (unless ``--no-keep-memory``);
``bench/moe_layer.py`` and ``bench/step.py`` call it for every implementation they time.

What is kept is bounded only by reuse: a process that goes on to new shapes (a benchmark's
next row, an evaluation batch of another size) can fragment the kept heap and grow it past
its live peak (a whole layer grid without a release grew to 24 GiB). ``release_freed_memory``
hands the free pages back (malloc_trim); callers do so where the shapes change: the
layer benchmark between rows, ``moedsl run`` after each evaluation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import MutableMapping, Optional

# The variables that decide how an OpenMP thread waits (libgomp, LLVM's and Intel's runtimes);
# where the user set any of them, theirs stands.
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# How long an idle OpenMP thread of libgomp spins before it sleeps, where the cores are free:
# ~0.24 ms on the project's machine (libgomp's default, 300000, is ~7 ms).
SPINCOUNT = "10000"


def cores_busy(cores: Optional[int] = None) -> bool:
    """Whether other work already keeps this machine's cores busy: the 1-minute load average
    (runnable threads, ours excluded as we have not started) at least the usable cores less
    half of one."""
    cores = usable_cores() if cores is None else cores
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return False
    return load >= cores - 0.5


def configure_threads(nproc: int = 1, environ: Optional[MutableMapping[str, str]] = None,
                      busy: Optional[bool] = None) -> bool:
    """How torch's OpenMP threads wait, and how many each of ``nproc`` processes on this
    machine gets. Call it before torch is first imported: the OpenMP runtime reads these
    variables once, when it loads (with ``import torch``). Returns whether it was in time
    for this process; either way they are in ``environ`` (default ``os.environ``) for the
    processes it starts. What the user set is left as it is.

    How a thread waits for work (between two parallel ops, at a barrier): by default libgomp
    spins about 7 ms first (GOMP_SPINCOUNT 300000, libgomp's ``initialize_env`` in env.c),
    and a training step of specs/switch.yaml runs about 820 parallel ops. While other
    processes load the cores, each thread of the team spends its time slices spinning for a
    teammate that waits for a core: measured on the project's 2-core machine while other
    processes (busy loops and other training runs) loaded it, a step took 6.3 s (70% of the
    run's CPU time in libgomp's pause loop, by perf) against 0.04 s alone. So:

    - on a machine whose cores are already busy (``busy``; default: ``cores_busy()``, the load
      average when the run starts) ``OMP_WAIT_POLICY=passive``: a waiting thread sleeps at
      once (0.07-0.18 s a step there). It costs a wake-up per parallel op, about 40 us on
      that machine, which is why it is not the default on a free one (0.079 s a step
      against 0.041 s, idle);
    - elsewhere ``GOMP_SPINCOUNT=10000`` (``SPINCOUNT``): a spin of ~0.24 ms, short enough
      that a thread gives its core back soon when load arrives later, long enough that back
      to back ops do not sleep (0.041 s a step idle, 0.10 s with two busy loops beside it).
      bench/README.md has the measurements.

    ``OMP_NUM_THREADS``: the usable cores split between ``nproc`` processes (at least one
    each), only for ``nproc > 1``: alone, torch's own choice (every core) stands.
    """
    env = os.environ if environ is None else environ
    if not any(v in env for v in _WAIT_VARS):
        if cores_busy() if busy is None else busy:
            env["OMP_WAIT_POLICY"] = "passive"
        else:
            env["GOMP_SPINCOUNT"] = SPINCOUNT
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(usable_cores() // nproc, 1)))
    return "torch" not in sys.modules


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def _libc() -> Optional[ctypes.CDLL]:
    """The C library, where it is glibc on Linux (the settings below are glibc's); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(max_block: int = 1 << 30) -> bool:
    """Serve blocks up to ``max_block`` bytes from malloc's heap and never trim it: freed
    memory is reused, not returned to the kernel. glibc only (Linux); returns whether it
    applied. Call it once, early; it holds for the whole process."""
    global _done
    if _done:
        return True
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, max_block) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(_M_TOP_PAD, 64 << 20) == 1)
    _done = ok
    return ok


def release_freed_memory() -> bool:
    """Give the kept free pages back to the kernel (glibc malloc_trim): call it where the
    shapes change, so what ``keep_freed_memory`` keeps stays near the live peak."""
    libc = _libc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
