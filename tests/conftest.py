"""Shared fixtures: offline environment, the bundled real seeds, tiny params."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from process_state import process_state_kept
from tiny_pipeline import TinyRun, copy_of, run_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "data" / "seeds" / "neon-trees"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--train-seed",
        type=int,
        default=0,
        help="seed of the detectors that tests train for a few seconds; a test on such a detector"
        " must pass for any seed (docs/contributing.md, 'Tests that hold on any machine')",
    )


# The modules whose tests read the tiny pipeline (the `tiny_run` fixture).
TINY_PIPELINE_MODULES = (
    "tests/test_pipeline.py",
    "tests/test_dvc_declarations.py",
    "tests/test_team_remote.py",
    "tests/test_parallel_experiments.py",
)


# The longest work units, longest first: the tiny pipeline's modules (its one run, then their
# tests) and the modules of whole-pipeline runs, measured on CI's 2 cores (docs/contributing.md).
# Started first, they leave the many short modules to fill in beside them, so both workers end
# together; pytest-xdist's own order (most tests first) left one worker idle for two minutes.
LONGEST_FIRST = (
    "tiny pipeline",
    "tests/test_processes.py",
    "tests/test_cross_scene.py",
    "tests/test_train.py",
    "tests/test_segment.py",
    "tests/test_inspection.py",
)


def work_unit(nodeid: str) -> str:
    """The tests that run on one worker together: a module, or the tiny pipeline's modules."""
    module = nodeid.split("::", 1)[0]
    return "tiny pipeline" if module in TINY_PIPELINE_MODULES else module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest work units first (stable: the rest keep their order)."""
    rank = {unit: position for position, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under pytest-xdist with `--dist loadscope` (make test): a work unit's tests share one worker,
    so its module fixtures are made once and the tiny pipeline runs once, and the units start in
    the collection's order, the longest first. (pytest-xdist's own xdist_group marks do nothing on
    pytest 9.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    # The collection's order, not pytest-xdist's (the units with the most tests first).
    config.option.loadscopereorder = False
    return WorkUnitScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker and every process it starts compute on cores of their own
    (on CI's 2 cores, one each). Stages size their threads from the cores they may use
    (`launch.use_threads`), so unpinned, two workers ran four threads on two cores: the
    segmentation pipeline beside a copy of itself took 110 s unpinned and 79 s pinned (75 s
    alone; 2026-12-07, docs/contributing.md)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker is None:
        return
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw"))
    # More workers than cores share them round the cores.
    mine = cores[index::workers] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


@pytest.fixture(scope="session")
def train_seed(request: pytest.FixtureRequest) -> int:
    """The seed of the tiny detectors the tests train (`pytest --train-seed N`, default 0)."""
    return request.config.getoption("--train-seed")


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach a hub or write to the user's home."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(tmp_path_factory.mktemp("yolo-config"))


@pytest.fixture(scope="session")
def neon_seeds() -> Path:
    """The project's bundled real seeds (fetched by `dvc pull`, as `make test` does)."""
    if not (SEEDS / "OSBS_029.xml").exists():
        pytest.fail(f"{SEEDS} is missing: run `dvc pull data/seeds/neon-trees.dvc` (make test does)")
    return SEEDS


@pytest.fixture
def seeds_copy(neon_seeds: Path, tmp_path: Path) -> Path:
    """A writable copy of the real seeds, for tests that damage or add files."""
    return Path(shutil.copytree(neon_seeds, tmp_path / "neon-trees"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The tiny pipeline, reproduced once per test run (tests/tiny_pipeline.py): read it, never
    change it; a test that changes the project takes `tiny_project`."""
    return run_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture
def tiny_project(tiny_run: TinyRun, tmp_path: Path) -> Path:
    """A copy of the reproduced tiny pipeline of this test's own."""
    return copy_of(tiny_run, tmp_path / "project")


@pytest.fixture(scope="module", autouse=True)
def module_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module's tests and fixtures leave the process as they found it, and compute on the
    module's `TORCH_THREADS` threads when it sets them (some compare bytes with another
    process's, and a thread count can change a float's last bit)."""
    with process_state_kept():
        threads = getattr(request.module, "TORCH_THREADS", None)
        if threads is not None:
            torch.set_num_threads(threads)
        yield


@pytest.fixture(autouse=True)
def test_state() -> Iterator[None]:
    """Each test leaves the process as it found it, so no test depends on the order they run in."""
    with process_state_kept():
        yield
