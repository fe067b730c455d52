"""The tiny pipeline: the whole project on tiny settings, run once per test session.

Its `dvc repro` runs every stage with a tracing `genfusion` first on PATH, so the same run gives
tests/test_pipeline.py its outputs and tests/test_dvc_declarations.py what each stage read
(tests/dependency_trace.py). Tests that change the project work on a copy (`copy_of`).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from project import commit, project_repo, run

TESTS = Path(__file__).resolve().parent
# The tiny pipeline's own variants and one seed, not params.yaml's: a change of the default run
# changes no test. It builds the dataset of every variant the registry builds by default
# (tests/test_variants.py checks the list against the registry), and tests/test_pipeline.py checks
# each one as Ultralytics checks a dataset before it trains. It trains two: real and composite (a
# made set, and the two-phase row's first phase). Every variant trains through the same stages,
# so another would test only their cost: five stages, 25 s alone (2026-12-07) and more beside the
# suite's other worker. A detector trained on generated images alone is test_segment.py's.
# tests/test_pipeline.py checks the seed matrix with `dvc status`.
BUILT = ["synthetic", "mixed", "variations", "composite", "inpaint"]
BUILT += ["composite-filtered", "inpaint-filtered"]
VARIANTS = ["real", "composite"]
TINY = {
    "train": {
        "variants": VARIANTS,
        "seeds": [0],
        "init_from": ["composite"],
        "epochs": 1,
        "imgsz": 64,
        "batch": 4,
        "workers": 0,
    },
    "diffusion": {"resolution": 32, "pretrain_steps": 2, "pretrain_vae_steps": 2},
    "finetune": {"steps": 2, "num_class_images": 2},
    "generate": {"n": 2, "steps": 2},
    "variations": {"per_image": 1, "steps": 2, "strength": 0.5},
    "composite": {"per_image": 1},
    "inpaint": {"per_image": 1, "steps": 2, "strength": 1.0},
    # 2 of the 20 real train tiles: as many synthetic images as generate.n makes.
    "datasets": {"variants": BUILT, "mixed_ratio": 0.1},
    "filter": {"sets": {"composite": "data/composites", "inpaint": "data/inpainted/canopy"}},
    # A labelled set scored by every detector besides the test split (one seed scene, copied in).
    "evaluate": {"bootstrap": 200, "extra_sets": {"soap": "data/extra/soap"}},
}
EXTRA_SCENE = "SOAP_061"


@dataclass(frozen=True)
class TinyRun:
    """The project after the tiny pipeline's `dvc repro`, committed as `baseline`; `traces` holds
    `<stage>.json` for each stage, what dependency_trace saw it read."""

    repo: Path
    traces: Path


def add_extra_set(repo: Path) -> None:
    """TINY's extra set, copied from the pulled seeds."""
    (repo / "data/extra/soap").mkdir(parents=True)
    for suffix in (".png", ".xml"):
        shutil.copy(repo / f"data/seeds/neon-trees/{EXTRA_SCENE}{suffix}", repo / "data/extra/soap")


def tracing_genfusion(folder: Path, traces: Path) -> Path:
    """A `genfusion` in `folder` that runs the real one under dependency_trace and writes what it
    read to `traces/<stage>.json` (DVC names the stage it runs in DVC_STAGE)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "genfusion"
    script.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" -m dependency_trace "{traces}/$DVC_STAGE.json" -- genfusion "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def run_tiny_pipeline(root: Path) -> TinyRun:
    """The project with TINY params in a new git repo under `root`, reproduced under the tracer."""
    repo = project_repo(root / "project", TINY)
    run(repo, "dvc", "pull", "-q", "data/seeds/neon-trees.dvc")
    add_extra_set(repo)
    traces = root / "traces"
    traces.mkdir()
    wrapper = tracing_genfusion(root / "bin", traces)
    # The copy's own code (the files its dvc.yaml declares) and the tracer beside its tests.
    env = {
        "PATH": str(wrapper),
        "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(TESTS)]),
    }
    run(repo, "dvc", "repro", env=env)
    commit(repo, "baseline")
    return TinyRun(repo, traces)


def copy_of(tiny: TinyRun, dest: Path) -> Path:
    """A copy of the reproduced project (git, DVC cache and outputs) to change freely."""
    return Path(shutil.copytree(tiny.repo, dest, symlinks=True))
