"""Starting worker processes: in-process spawning for checks and tests (gloo on CPU)."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, backend: str, timeout: float, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()
    # The result is reported; leave without the interpreter's teardown, where a C++ thread
    # still joinable at exit (a backend's) can abort the process ("terminate called without
    # an active exception") after its work succeeded. Flush the queue's feeder thread first.
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes with torch.distributed set up;
    returns the per-rank results (picklable), or raises with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = mp.start_processes(_entry, args=(fn, world, port, backend, timeout, args, queue), nprocs=world,
                               join=False, start_method="spawn")
    results: dict = {}
    errors = []
    while len(results) + len(errors) < world:
        rank, status, value = queue.get(timeout=timeout * 3)
        if status == "ok":
            results[rank] = value
        else:
            errors.append((rank, value))
            break
    try:
        procs.join(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a crashed worker: the error from the queue says more
        if not errors:
            raise
        del e
    if errors:
        rank, text = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{text}")
    return [results[r] for r in range(world)]
