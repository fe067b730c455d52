"""Shared fixtures: offline environment, the bundled real seeds, tiny params."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "data" / "seeds" / "neon-trees"


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
