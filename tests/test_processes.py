"""Several processes for real, the stages run through the CLI as dvc.yaml runs them, as gloo ranks
on the CPU, in the two ways a user starts them:
- `diffusion.processes: 2`: the command re-launches itself under torch's elastic launcher;
- two torchrun agents, `--nnodes 2` meeting at a c10d rendezvous on loopback: what two nodes of a
  cluster run (docs/beyond-one-machine.md), here on one machine.

Every stage that shares images (class_images, generate, variations, inpaint, prelabel) must give
the same bytes on any number of processes and nodes, and again after a process is killed and
torchrun restarts the group; fine-tuning must write its output and its loss curve once, with the
second rank's batches counted, and the same weights on two nodes as on two local processes;
processes that do not see the same project folder must refuse to start; an error must be said once.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
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
    # Four rounds of two batches of two: enough rounds for a kill to land between two of them.
    "generate": {"n": 16, "steps": 2, "batch": 2},
    "finetune": {"steps": STEPS, "batch": 1, "num_class_images": 4},
    "variations": {"per_image": 1, "steps": 2, "strength": 0.5, "batch": 2},
    "inpaint": {"per_image": 1, "steps": 2, "batch": 2},
    # Labels from the generator's attention: `generate` captures the maps beside each image.
    "prelabel": {"method": "attention"},
}
# Output folders, relative to a project folder, as dvc.yaml's `paths` name them.
OUTPUTS = {
    "class_images": f"data/class_images/{SUBJECT}",
    "generate": f"data/generated/{SUBJECT}",
    "variations": "data/variations",
    "inpaint": f"data/inpainted/{SUBJECT}",
    "prelabel": f"data/prelabels/{SUBJECT}",
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
    # A param in a path, as in prelabel's --weights: the repo's value (these tests keep it).
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cmd = re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m[1]][m[2]]), cmd)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_agents(
    folders: tuple[Path, Path],
    command: list[str],
    max_restarts: int = 0,
    kill_when: Callable[[], bool] | None = None,
) -> tuple[list[int], list[str]]:
    """Run a CLI `command` as two torchrun agents, one process each, agent i in folders[i]: the
    command a Slurm job step runs on each of two nodes (docs/beyond-one-machine.md). When
    `kill_when()` turns true, the second agent's process is killed (SIGKILL). Their exit codes
    and outputs."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    launcher += ["--rdzv-id", uuid.uuid4().hex, "--max-restarts", str(max_restarts)]
    logs = [folder.parent / f"{folder.name}-agent-{rank}.log" for rank, folder in enumerate(folders)]
    agents = [
        subprocess.Popen(
            [*launcher, "--node-rank", str(rank), "-m", "genfusion.cli", *command[len(CLI) :]],
            cwd=folder,
            # As docs/beyond-one-machine.md's Slurm job sets it: restarts need it (pytorch#135712).
            env=clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank, (folder, log) in enumerate(zip(folders, logs, strict=True))
    ]
    deadline, killed = time.monotonic() + TIMEOUT, False
    while any(agent.poll() is None for agent in agents):
        if time.monotonic() > deadline:
            for agent in agents:
                os.killpg(agent.pid, signal.SIGKILL)
            outputs = "\n".join(log.read_text() for log in logs)
            pytest.fail(f"{shlex.join(command)} on two agents ran over {TIMEOUT} s:\n{outputs}")
        if kill_when is not None and not killed and kill_when():
            workers = psutil.Process(agents[1].pid).children(recursive=True)
            assert workers, "the second agent's process ended before it could be killed"
            for worker in workers:
                worker.kill()
            killed = True
        time.sleep(0.02)
    assert kill_when is None or killed, "the run ended before the kill"
    outputs = [log.read_text() for log in logs]
    assert not any("pytorch/pytorch#135712" in output for output in outputs), outputs
    return [agent.returncode for agent in agents], outputs


def agents_stage(folder: Path, name: str, max_restarts: int = 0, kill_when=None, **paths: str) -> Run:
    """Run a dvc.yaml stage in `folder` as two torchrun agents (two nodes on one machine)."""
    codes, outputs = run_agents((folder, folder), dvc_command(name, **paths), max_restarts, kill_when)
    output = "\n".join(outputs)
    assert codes == [0, 0], f"{name} on two agents in {folder} failed ({codes}):\n{output}"
    return Run(folder, output)


@pytest.fixture(scope="module")
def one(inputs: Path) -> Path:
    return project(inputs, inputs.parent / "one", processes=1)


@pytest.fixture(scope="module")
def agents(inputs: Path) -> Path:
    """The project folder two torchrun agents share, as two nodes share a network filesystem."""
    return project(inputs, inputs.parent / "agents", processes=1)


@pytest.fixture(scope="module")
def class_images(one: Path, agents: Path) -> tuple[Run, Run]:
    return stage(one, "class_images"), agents_stage(agents, "class_images")


@pytest.fixture(scope="module")
def finetuned(one: Path, class_images: tuple[Run, Run]) -> Run:
    """The one-process fine-tune, in one/models/finetuned/canopy."""
    return stage(one, "finetune")


@pytest.fixture(scope="module")
def generated(one: Path, finetuned: Run) -> Run:
    """With the one-process fine-tune; two agents' run is test_a_killed_agent_is_restarted_..."""
    return stage(one, "generate", finetuned=str(finetuned.folder / "models/finetuned"))


@pytest.fixture(scope="module")
def variations(one: Path, agents: Path) -> tuple[Run, Run]:
    return stage(one, "variations"), agents_stage(agents, "variations")


@pytest.fixture(scope="module")
def inpaint(one: Path, agents: Path, finetuned: Run) -> tuple[Run, Run]:
    tuned = str(finetuned.folder / "models/finetuned")
    return stage(one, "inpaint", finetuned=tuned), agents_stage(agents, "inpaint", finetuned=tuned)


@pytest.fixture(scope="module")
def prelabel(one: Path, agents: Path, generated: Run) -> tuple[Run, Run]:
    """Both label the one-process run's generated images."""
    generated = str(one / "data/generated")
    return stage(one, "prelabel"), agents_stage(agents, "prelabel", generated=generated)


@pytest.fixture(scope="module")
def finetuned_twice(inputs: Path, one: Path, class_images: tuple[Run, Run]) -> tuple[Run, Run]:
    """Two two-process fine-tunes, each in its own project folder with the one-process run's class
    images, so that only the processes differ from it: one re-launched as `diffusion.processes:
    2`, the other on two torchrun agents, its second process killed after the first step and
    the group restarted (`--max-restarts 1`)."""
    folders = {}
    for name, processes in (("tune-local", 2), ("tune-agents", 1)):
        folders[name] = project(inputs, inputs.parent / name, processes=processes)
        shutil.copytree(one / OUTPUTS["class_images"], folders[name] / OUTPUTS["class_images"])
    curve = folders["tune-agents"] / "metrics/finetune" / SUBJECT / "plots/metrics/loss.tsv"

    def first_step_logged() -> bool:
        return curve.is_file() and len(curve.read_text().splitlines()) >= 2

    local = stage(folders["tune-local"], "finetune")
    on_agents = agents_stage(folders["tune-agents"], "finetune", max_restarts=1, kill_when=first_step_logged)
    return local, on_agents


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones too, by relative name."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def lora_weights(run: Run) -> dict[str, torch.Tensor]:
    return load_file(run.folder / f"models/finetuned/{SUBJECT}/{LORA}")


def listed(folder: Path) -> list[str]:
    """The files a stage's manifest lists."""
    with (folder / MANIFEST).open(newline="") as f:
        return sorted(row["file"] for row in csv.DictReader(f))


def check_shares(run: Run, count: int) -> None:
    """Each rank made its share of the files, and together all of them."""
    shares = {int(rank): int(made) for made, rank in RANK_PROGRESS.findall(run.output)}
    assert sorted(shares) == [0, 1], f"progress of both ranks expected:\n{run.output}"
    assert all(shares.values()) and sum(shares.values()) == count, (shares, run.output)


@pytest.mark.parametrize("name", ["class_images", "variations", "inpaint", "prelabel"])
def test_two_processes_make_the_same_bytes_as_one(name: str, request: pytest.FixtureRequest) -> None:
    single, double = request.getfixturevalue(name)
    out = OUTPUTS[name]
    expected, got = files(single.folder / out), files(double.folder / out)
    made = listed(single.folder / out)
    assert len(made) >= 4 and set(made) <= set(expected), sorted(expected)
    assert sorted(got) == sorted(expected), "the same set of files"
    different = [f for f in expected if got[f] != expected[f]]
    assert not different, f"{name}: files differ between 1 and 2 processes: {different}"

    # Two agents, neither re-launched (`diffusion.processes: 2` is test_two_process_finetune_...).
    assert "running on" not in single.output + double.output, single.output + double.output
    check_shares(double, len(made))
    assert not list(double.folder.glob(".genfusion-shared-folder-*")), (
        "the shared-folder check's file is left"
    )


def test_a_killed_agent_is_restarted_and_its_stage_resumes_to_the_same_bytes(
    agents: Path, generated: Run, finetuned: Run
) -> None:
    """torchrun --max-restarts 1 restarts both agents' processes after one is killed; generate
    keeps what both ranks had finished (rank 0 appends every rank's rows after each round)."""
    out = agents / OUTPUTS["generate"]

    def one_round_done() -> bool:
        # The header and a round's rows: two batches of two, one from each rank.
        return (out / MANIFEST).is_file() and len((out / MANIFEST).read_text().splitlines()) >= 5

    run = agents_stage(
        agents, "generate", max_restarts=1, kill_when=one_round_done,
        finetuned=str(finetuned.folder / "models/finetuned"),
    )  # fmt: skip
    expected, got = files(generated.folder / OUTPUTS["generate"]), files(out)
    assert sorted(got) == sorted(expected), "the same set of files"
    assert not [f for f in expected if got[f] != expected[f]], "files differ after the restart"
    # Each rank started twice: once from nothing, once after the restart, keeping both ranks'
    # images of at least the first round.
    kept = [int(k) for k in re.findall(r"\d+ images to make, (\d+) kept from earlier runs", run.output)]
    assert len(kept) == 4 and sorted(kept)[:2] == [0, 0], run.output
    assert min(sorted(kept)[2:]) >= 4, f"the restart must keep both ranks' finished round:\n{run.output}"


def test_processes_that_do_not_share_the_project_folder_refuse_to_start(inputs: Path) -> None:
    """Two agents, each in its own copy of the project: two nodes without a shared filesystem."""
    folders = (project(inputs, inputs.parent / "node-a", 1), project(inputs, inputs.parent / "node-b", 1))
    codes, outputs = run_agents(folders, dvc_command("class_images"))
    assert all(code != 0 for code in codes), outputs
    said = re.compile(
        r"^error: (.*): not the same folder for every process: rank\(s\) (\d) \(on .*\) cannot read", re.M
    )
    for output in outputs:
        found = said.findall(output)
        assert len(found) == 1, output
        assert Path(found[0][0]).name in ("node-a", "node-b"), found
    for folder in folders:
        assert not list(folder.glob(".genfusion-shared-folder-*")), "the check's file is left"
        assert not (folder / OUTPUTS["class_images"]).exists(), "nothing made before the check"


def test_two_process_finetune_writes_once_logs_each_step_once_and_counts_both_ranks(
    finetuned: Run, finetuned_twice: tuple[Run, Run]
) -> None:
    local, agents = finetuned_twice
    assert "running on 2 processes" in local.output, local.output
    started = re.findall(r"steps of 1 x 1 images on 2 process", agents.output)
    assert len(started) == 4, f"each agent's process started twice, the group restarted:\n{agents.output}"
    for run in (local, agents):
        assert re.search(rf"{STEPS} steps of 1 x 1 images on 2 process\(es\)", run.output), run.output

        out = run.folder / "models/finetuned" / SUBJECT
        assert sorted(p.name for p in out.iterdir()) == ["finetune.json", LORA]
        record = json.loads((out / "finetune.json").read_text())
        assert record["method"] == "lora" and record["subject"] == SUBJECT and record["steps"] == STEPS
        leftovers = [p.name for p in out.parent.iterdir() if p.name != SUBJECT]
        assert not leftovers, f"scratch folders left beside the output: {leftovers}"

        # One row per optimizer step: the main process alone logs (each rank used to, doubling them).
        live = run.folder / "metrics/finetune" / SUBJECT
        with (live / "plots/metrics/loss.tsv").open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert [int(row["step"]) for row in rows] == list(range(STEPS)), rows
        assert json.loads((live / "metrics.json").read_text())["step"] == STEPS - 1

    single, double, on_agents = lora_weights(finetuned), lora_weights(local), lora_weights(agents)
    assert sorted(double) == sorted(single) and single
    assert any(not torch.equal(double[k], single[k]) for k in single), (
        "the second rank's batches must change the weights"
    )
    assert all(torch.equal(on_agents[k], double[k]) for k in double), (
        "two nodes, restarted after a kill, must train the weights two local processes train"
    )


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
