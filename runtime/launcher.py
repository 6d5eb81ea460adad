"""``moedsl run --nproc N``: start N workers on this machine through torch's elastic launcher
(what torchrun uses), each running ``python -m moedsl run`` with the same options. If a worker
fails or dies, the launcher stops the others and this reports which rank and how."""
from __future__ import annotations

import os
import sys
import uuid

from moedsl.errors import MoedslError


def launch(nproc: int, argv: list, monitor_interval: float = 0.5) -> None:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"moedsl-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=monitor_interval, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "moedsl", *argv)
    except ChildFailedError as e:
        parts = []
        for rank, failure in sorted(e.failures.items()):
            how = f"exit code {failure.exitcode}" if failure.exitcode is not None and failure.exitcode >= 0 else \
                f"signal {-failure.exitcode}" if failure.exitcode is not None else "unknown"
            parts.append(f"rank {rank} ({how})")
        raise MoedslError(f"the run failed: {', '.join(parts)}; the other ranks were stopped") from None
