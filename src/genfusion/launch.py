"""How a command's computation starts on this machine: how many threads it computes on, and
whether it runs again as several processes under torch's elastic launcher.

Neither changes what a stage computes (params `threads` and `diffusion.processes` give the same
files at any value), so no stage declares this module (dvc.yaml, tests/test_dvc_declarations.py).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def use_threads(threads: int | None) -> int:
    """Compute on `threads` cores (params `threads`), by default the cores this process may run on
    (its CPU set, not every core of the machine): libraries that size their pools from the machine
    oversubscribe a shared one, and then run many times slower. Set before torch is imported, the
    variables size its pool and OpenMP's; child processes inherit them."""
    # Processes of one stage on one machine (`diffusion.processes`, torchrun) share its cores.
    count = threads or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    for name in THREAD_VARS:
        os.environ[name] = str(count)
    if "torch" in sys.modules:  # imported already (a test): resize its pool
        sys.modules["torch"].set_num_threads(count)
    log.debug("computing on %d threads", count)
    return count


def relaunch_as_processes(processes: int) -> bool:
    """Run this command again as `processes` processes on this machine (torch's elastic launcher,
    what `torchrun --standalone` runs) when that is more than one and this is not one of them
    already. True when they have run it, so that this process has nothing left to do."""
    if processes == 1 or "LOCAL_RANK" in os.environ:
        return False
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from genfusion.errors import GenfusionError

    # The launcher's own progress notes are noise here; a failure is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    log.info("running on %d processes (torchrun)", processes)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "genfusion.cli", *sys.argv[1:])
    except ChildFailedError as exc:
        # A GenfusionError exits 2, its message in the process's error file (genfusion.cli.main).
        said = sorted(
            r for r, f in exc.failures.items() if f.exitcode == 2 and "message" in f.error_file_data
        )
        if said:
            raise GenfusionError(exc.failures[said[0]].message) from exc
        rank, failure = exc.get_first_failure()
        raise GenfusionError(f"process {rank} of {processes} failed (exit code {failure.exitcode})") from exc
    return True
