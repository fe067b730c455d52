"""Helpers of the tests that run the project: a copy of it in a fresh git repo, as a clean clone
has it (for tests that run DVC), and stage runs with a params file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Pipeline outputs a developer's working tree may hold; a clean clone has none of them.
OUTPUTS = (
    "data/real/",
    "data/scenes/",
    "data/predictions/",
    "data/composites/",
    "data/inpainted/",
    "data/filtered/",
    "data/datasets/",
    "models/base/",
    "models/finetuned/",
    "models/detectors/",
    "models/onnx/",
    "metrics/",
    "reports/",
)


def attempt(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in `repo` with this venv's tools first on PATH (after `env`'s PATH, when it
    has one, and with its other variables set), and return how it ended."""
    extra = dict(env or {})
    first = [extra.pop("PATH")] if "PATH" in extra else []
    path = os.pathsep.join([*first, str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run(
        args, cwd=repo, env=os.environ | extra | {"PATH": path}, capture_output=True, text=True
    )


def run(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """`attempt`, failing the test on an error; its output."""
    done = attempt(repo, *args, env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def project_repo(dest: Path, params: dict[str, dict]) -> Path:
    """The project's files (no outputs, no dvc.lock) in a new git repo at `dest`, with the
    top-level params.yaml sections updated by `params`; committed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith(OUTPUTS) and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    values = yaml.safe_load((dest / "params.yaml").read_text())
    for section, update in params.items():
        if isinstance(update, dict):
            values[section].update(update)
        else:
            values[section] = update
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run(dest, "git", "init", "-q", "-b", "main")
    commit(dest, "init")
    return dest


def generate_canopy(params: Path, base: Path, real: Path, out: Path) -> None:
    """The `generate@canopy` stage with the params file `params`, from the base model alone."""
    from genfusion.params import load_params
    from genfusion.stages import generate

    generate.main(load_params(params), subject="canopy", base=base, finetuned=None, real=real, out=out)


def not_installed(component: str) -> NoReturn:
    """A component only tests need is missing: `make test` installs it (its test-tools target).
    In CI that is a failure, so that its tests cannot vanish while the run stays green; elsewhere
    the tests that need it are skipped."""
    message = f"{component} is not installed: run `make test-tools` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
