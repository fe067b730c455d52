"""How a command's computation starts: how many threads it computes on, whether it runs again as
several processes under torch's elastic launcher, and its place among the processes of a run on
several (`diffusion.processes`, or `torchrun` on one node or several).

None of it changes what a stage computes (params `threads` and `diffusion.processes`, and the
number of nodes, give the same files at any value), so no stage declares this module (dvc.yaml,
tests/test_dvc_declarations.py).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    from accelerate import PartialState

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Set for the processes `relaunch_as_processes` starts: their launcher says their error, once.
RELAUNCHED_VAR = "GENFUSION_RELAUNCHED"
SHARED_TOKEN = ".genfusion-shared-folder-{}"


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
    os.environ[RELAUNCHED_VAR] = "1"
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


def process_state(device: str) -> PartialState:
    """This process's place among the stage's processes (`diffusion.processes`, or a `torchrun`
    / `accelerate launch` of the stage on one node or several): a CPU run joins the group over
    gloo. Work is shared out by global rank, and global rank 0 alone writes what DVC sees, so
    every process must see the same project folder: checked here, before any work."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        check_shared_folder(state, Path.cwd())
        if state.is_main_process and restarts_share_the_agents_store(os.environ):
            log.warning(
                "torchrun restarts on several nodes, with the launchers' shared store: a restart can"
                " hang or connect to a process of the last attempt (pytorch/pytorch#135712); set"
                " TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (docs/beyond-one-machine.md)"
            )
    return state


def restarts_share_the_agents_store(environ: Mapping[str, str]) -> bool:
    """Whether this torchrun process may be restarted (`--max-restarts`) in a group of several
    agents that share their rendezvous store with their processes (torch's default). Each
    attempt's keys in that store are told apart by the restart count, which each agent keeps
    for itself: an agent that restarts because another node's process failed keeps its count, so
    its processes read the last attempt's addresses. Seen here as a hang, or as "Connection
    refused", in 3 of 6 restarts (pytorch/pytorch#135712); none in 8 with the store not shared."""
    return (
        environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and int(environ.get("GROUP_WORLD_SIZE", "1")) > 1
    )


def check_shared_folder(state: PartialState, folder: Path) -> None:
    """Refuse to start unless every process sees `folder` as the same folder: global rank 0 writes
    a file with a fresh token in it, and every process must read that token back."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex if state.is_main_process else None, socket.gethostname()]
    dist.broadcast_object_list(token, src=0)
    path = folder / SHARED_TOKEN.format(token[0])
    unwritable = None
    if state.is_main_process:
        try:
            path.write_text(token[0])
        except OSError as exc:
            unwritable = exc.strerror or str(exc)
    state.wait_for_everyone()
    try:
        seen = path.read_text() == token[0]
    except OSError:
        seen = False
    answers: list = [None] * state.num_processes
    dist.all_gather_object(answers, (seen, socket.gethostname(), unwritable))
    if state.is_main_process:
        path.unlink(missing_ok=True)
    if answers[0][2] is not None:
        raise GenfusionError(f"{folder}: rank 0 (on {token[1]}) cannot write there: {answers[0][2]}")
    blind = [f"{rank} (on {host})" for rank, (ok, host, _) in enumerate(answers) if not ok]
    if blind:
        raise GenfusionError(
            f"{folder}: not the same folder for every process: rank(s) {', '.join(blind)} cannot read"
            f" the file rank 0 (on {token[1]}) wrote there; run from a project folder on a filesystem"
            " that every node mounts at the same path (docs/beyond-one-machine.md)"
        )
    log.debug("%s: seen by all %d processes", folder, state.num_processes)


def leave_process_group() -> None:
    """End this process's part in a run on several, if it had one. Left to the interpreter's exit,
    gloo's threads can abort a process that has finished its work (SIGABRT, "terminate called
    without an active exception"), which torchrun reports as a failure."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(state: PartialState, items: list) -> list:
    """Every process's items, in process order, on the main process (an empty list elsewhere)."""
    if state.num_processes == 1:
        return items
    import torch.distributed as dist

    every: list | None = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(items, every, dst=0)
    return [item for part in every or () for item in part]


def share_label(state: PartialState, count: int) -> str:
    """What a progress bar says of this process's share: "12 images, process 1 of 2"."""
    label = f"{count} images"
    if state.num_processes > 1:
        label += f", process {state.process_index} of {state.num_processes}"
    return label
