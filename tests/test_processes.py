"""`diffusion.processes: 2` for real: the class_images, finetune, generate and variations stages run
through the CLI as dvc.yaml runs them, re-launched by torchrun as two gloo ranks on the CPU.

Generation must give the same bytes on any number of processes; fine-tuning must write its output
and its loss curve once, with the second rank's batches counted; an error must be said once.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genfusion.diffusion.pipelines import build_tiny_pipeline
from genfusion.formats import read_annotations
from genfusion.layout import MANIFEST
from genfusion.params import load_params
from genfusion.stages.base_model import save_builtin
from genfusion.stages.seeds import run_seeds

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "canopy"
CLI = [sys.executable, "-c", "from genfusion.cli import main; main()"]
# A hung process group fails its test instead of hanging the run.
TIMEOUT = 300
STEPS = 3
LORA = "pytorch_lora_weights.safetensors"
# Cores per process, the same under 1 and 2 processes: byte-identical images need the same thread
# count (docs/diffusion.md), and `threads: null` gives each of N processes 1/N of the cores, so
# a 1-process run would add in another order than each rank of a 2-process one.
THREADS = 1
TINY = {
    "diffusion": {"resolution": 32},
    "generate": {"n": 6, "steps": 2, "batch": 2},
    "finetune": {"steps": STEPS, "batch": 1, "num_class_images": 4},
    "variations": {"per_image": 1, "steps": 2, "strength": 0.5, "batch": 2},
}
# Output folders, relative to a project folder, as dvc.yaml's `paths` name them.
OUTPUTS = {
    "class_images": f"data/class_images/{SUBJECT}",
    "generate": f"data/generated/{SUBJECT}",
    "variations": "data/variations",
}
# A rank's progress bar: "generate@canopy (2 images, process 1 of 2) ..."
RANK_PROGRESS = re.compile(r"\((\d+) images, process (\d+) of 2\)")


@dataclass(frozen=True)
class Run:
    folder: Path  # the project folder the stage ran in (its working directory)
    output: str  # stdout and stderr


@pytest.fixture(scope="module")
def inputs(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stages' inputs, made once: data/real from the bundled seeds, an untrained builtin base
    model at models/base, and the tiny params (diffusion.processes 1)."""
    root = tmp_path_factory.mktemp("inputs")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert SUBJECT in params["subjects"], "the repo's params name the subject these tests run"
    params["subjects"] = {SUBJECT: params["subjects"][SUBJECT]}
    for section, values in TINY.items():
        params[section].update(values)
    params["diffusion"]["processes"] = 1
    params["threads"] = THREADS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    save_builtin(build_tiny_pipeline(seed=0), root / "models/base")
    return root


def project(inputs: Path, folder: Path, processes: int, **changes: dict) -> Path:
    """A project folder: a copy of the inputs with params diffusion.processes and `changes`."""
    shutil.copytree(inputs / "data/real", folder / "data/real")
    shutil.copytree(inputs / "models/base", folder / "models/base")
    params = yaml.safe_load((inputs / "params.yaml").read_text())
    params["diffusion"]["processes"] = processes
    for section, values in changes.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def dvc_command(stage: str, **paths: str) -> list[str]:
    """The stage's command line from dvc.yaml (its `paths` vars, less those in `paths`), run by
    this interpreter's `genfusion.cli`."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    variables = pipeline["vars"][0]["paths"] | paths
    spec = pipeline["stages"][stage]
    cmd = spec["do"]["cmd"] if "do" in spec else spec["cmd"]
    cmd = cmd.replace("${key}", SUBJECT)
    cmd = re.sub(r"\$\{paths\.(\w+)\}", lambda m: variables[m[1]], cmd)
    assert "${" not in cmd, cmd
    program, *args = shlex.split(cmd)
    assert program == "genfusion", cmd
    return [*CLI, *args]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what changes the stages' output or its look: a forced terminal
    (progress bars redrawn), debug tracebacks, dvclive resuming."""
    drop = {"FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "GENFUSION_DEBUG", "DVCLIVE_RESUME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {"COLUMNS": "200", "NO_COLOR": "1"} | extra


def run_stage(folder: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` in `folder` in its own process group, killed whole after TIMEOUT seconds
    (torchrun's ranks are grandchildren, which a plain timeout would leave running)."""
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{shlex.join(command)} ran over {TIMEOUT} s in {folder}:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stage(folder: Path, name: str, **paths: str) -> Run:
    """Run a dvc.yaml stage in `folder`."""
    done = run_stage(folder, dvc_command(name, **paths))
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{name} in {folder} failed ({done.returncode}):\n{output}"
    return Run(folder, output)


@pytest.fixture(scope="module")
def one(inputs: Path) -> Path:
    return project(inputs, inputs.parent / "one", processes=1)


@pytest.fixture(scope="module")
def two(inputs: Path) -> Path:
    return project(inputs, inputs.parent / "two", processes=2)


@pytest.fixture(scope="module")
def class_images(one: Path, two: Path) -> tuple[Run, Run]:
    return stage(one, "class_images"), stage(two, "class_images")


@pytest.fixture(scope="module")
def finetuned(one: Path, class_images: tuple[Run, Run]) -> Run:
    """The one-process fine-tune, in one/models/finetuned/canopy."""
    return stage(one, "finetune")


@pytest.fixture(scope="module")
def generate(one: Path, two: Path, finetuned: Run) -> tuple[Run, Run]:
    """Both with the one-process fine-tune."""
    tuned = str(finetuned.folder / "models/finetuned")
    return stage(one, "generate", finetuned=tuned), stage(two, "generate", finetuned=tuned)


@pytest.fixture(scope="module")
def variations(one: Path, two: Path) -> tuple[Run, Run]:
    return stage(one, "variations"), stage(two, "variations")


@pytest.fixture(scope="module")
def finetuned_twice(inputs: Path, one: Path, class_images: tuple[Run, Run]) -> tuple[Run, Run]:
    """Two two-process fine-tunes, each in its own project folder with the one-process run's class
    images, so that only the number of processes differs from it."""
    runs = []
    for name in ("tune-a", "tune-b"):
        folder = project(inputs, inputs.parent / name, processes=2)
        shutil.copytree(one / OUTPUTS["class_images"], folder / OUTPUTS["class_images"])
        runs.append(stage(folder, "finetune"))
    return runs[0], runs[1]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones too, by relative name."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def lora_weights(run: Run) -> dict[str, torch.Tensor]:
    return load_file(run.folder / f"models/finetuned/{SUBJECT}/{LORA}")


@pytest.mark.parametrize("name", ["class_images", "generate", "variations"])
def test_two_processes_make_the_same_bytes_as_one(name: str, request: pytest.FixtureRequest) -> None:
    single, double = request.getfixturevalue(name)
    out = OUTPUTS[name]
    expected, got = files(single.folder / out), files(double.folder / out)
    images = [f for f in expected if f.endswith(".png")]
    assert MANIFEST in expected and len(images) >= 4, sorted(expected)
    with (single.folder / out / MANIFEST).open(newline="") as f:
        assert sorted(row["file"] for row in csv.DictReader(f)) == sorted(images)
    assert sorted(got) == sorted(expected), "the same set of files"
    different = [f for f in expected if got[f] != expected[f]]
    assert not different, f"{name}: files differ between 1 and 2 processes: {different}"

    assert "running on 2 processes" in double.output, double.output
    assert "running on" not in single.output, single.output
    # Each rank rendered its share of the batches, and together all of the images.
    shares = {int(rank): int(count) for count, rank in RANK_PROGRESS.findall(double.output)}
    assert sorted(shares) == [0, 1], f"progress of both ranks expected:\n{double.output}"
    assert all(shares.values()) and sum(shares.values()) == len(images), (shares, double.output)


def test_two_process_finetune_writes_once_logs_each_step_once_and_counts_both_ranks(
    finetuned: Run, finetuned_twice: tuple[Run, Run]
) -> None:
    first, again = finetuned_twice
    assert "running on 2 processes" in first.output, first.output
    assert re.search(rf"{STEPS} steps of 1 x 1 images on 2 process\(es\)", first.output), first.output

    out = first.folder / "models/finetuned" / SUBJECT
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", LORA]
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == "lora" and record["subject"] == SUBJECT and record["steps"] == STEPS
    leftovers = [p.name for p in out.parent.iterdir() if p.name != SUBJECT]
    assert not leftovers, f"scratch folders left beside the output: {leftovers}"

    # One row per optimizer step: the main process alone logs (each rank used to, doubling them).
    live = first.folder / "metrics/finetune" / SUBJECT
    with (live / "plots/metrics/loss.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(row["step"]) for row in rows] == list(range(STEPS)), rows
    assert json.loads((live / "metrics.json").read_text())["step"] == STEPS - 1

    single, double, repeated = lora_weights(finetuned), lora_weights(first), lora_weights(again)
    assert sorted(double) == sorted(single) and single
    assert any(not torch.equal(double[k], single[k]) for k in single), (
        "the second rank's batches must change the weights"
    )
    assert all(torch.equal(repeated[k], double[k]) for k in double), "a repeated 2-process run differs"


def test_a_failing_two_process_run_says_its_error_once(inputs: Path, finetuned: Run) -> None:
    folder = project(inputs, inputs.parent / "bad", processes=2, generate={"prompts": ["{nope}"]})
    command = dvc_command("generate", finetuned=str(finetuned.folder / "models/finetuned"))
    done = run_stage(folder, command)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "running on 2 processes" in output, output
    assert output.count("error: generate.prompts[0]: cannot fill '{nope}'") == 1, output
    assert output.count("cannot fill") == 1, output
    assert not (folder / OUTPUTS["generate"]).exists()
