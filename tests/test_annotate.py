"""`genfusion annotate`: a real Label Studio server on loopback, pushed to, annotated through the
Label Studio SDK as a person would, and pulled back into a git + DVC project; the conversions and
the bad inputs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from project import ROOT, commit, not_installed, run
from typer.testing import CliRunner

from genfusion.boxes import Box, polygon_box
from genfusion.cli import app
from genfusion.commands import annotate
from genfusion.errors import GenfusionError
from genfusion.formats import label_studio as ls_format
from genfusion.formats.label_studio import read_task
from genfusion.formats.yolo import parse_yolo_line, read_label_file
from genfusion.integrations import label_studio as ls
from genfusion.params import load_params
from genfusion.stages import prelabel

CLASSES = ["tree"]
SIZE = (64, 48)
STEMS = ("canopy_00000", "canopy_00001", "canopy_00002")
# What a pull says while another DVC command holds the project's lock.
BUSY = (
    r"another DVC command is running in this project \(its lock \S+/\.dvc/tmp/lock is held\);"
    r" nothing was pulled: wait for it to finish"
)


def test_label_config_offers_the_params_classes_with_the_task_tool() -> None:
    assert '<RectangleLabels name="label" toName="image"><Label value="tree"/><Label value="a&quot;b"/>' in (
        ls_format.label_config(["tree", 'a"b'], "detect")
    )
    assert "<PolygonLabels" in ls_format.label_config(["tree"], "segment")


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_result_reads_back_as_the_same_object(tmp_path: Path, task: str) -> None:
    Image.new("RGB", SIZE).save(tmp_path / "a.png")
    box = polygon_box("tree", [(3.5, 4.25), (40.0, 8.0), (12.0, 47.0)])
    if task == "detect":
        box = Box("tree", 3.5, 4.25, 40.0, 47.0)
    exported = {"id": 1, "data": {"image": "/data/local-files/?d=x/a.png"}, "annotations": [{"id": 1}]}
    exported["annotations"][0]["result"] = [ls_format.ls_result(box, SIZE, task)]
    item = read_task(exported, 0, "export", tmp_path)
    [back] = item.boxes
    assert back.label == "tree" and len(back.polygon) == len(box.polygon)
    for point, expected in zip(back.polygon, box.polygon, strict=True):
        assert point == pytest.approx(expected)
    assert (back.x0, back.y0, back.x1, back.y1) == pytest.approx((box.x0, box.y0, box.x1, box.y1))


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("/data/local-files/?d=../../etc/passwd", "climbs out with '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("https://elsewhere.example.org/x.png", "is a URL on another host"),
    ],
)
def test_an_export_naming_files_outside_the_images_folder_is_refused(
    tmp_path: Path, image: str, problem: str
) -> None:
    tasks = [{"id": 9, "data": {"image": image}, "annotations": [{"id": 1, "result": []}]}]
    with pytest.raises(GenfusionError, match=f"export: task 9: image .* {problem}"):
        ls_format.read_export(tasks, "export", tmp_path, CLASSES, "detect")


def test_uncertainty_is_the_mean_binary_entropy_of_the_box_scores() -> None:
    assert annotate.uncertainty([0.5]) == 1.0  # a coin toss: one full bit
    assert annotate.uncertainty([1.0, 0.0]) == 0.0  # sure either way
    # H(0.8) = -(0.8 log2 0.8 + 0.2 log2 0.2) = 0.7219...; H(0.4) = H(0.6) = 0.9709...
    assert annotate.uncertainty([0.8, 0.4]) == pytest.approx((0.721928 + 0.970951) / 2, abs=1e-6)
    assert annotate.uncertainty([0.95]) < annotate.uncertainty([0.7]) < annotate.uncertainty([0.55])
    # The labeller found nothing, or never looked: the most uncertain.
    assert annotate.uncertainty([]) == annotate.uncertainty(None) == 1.0


def test_credentials_come_from_the_environment_before_the_env_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("LABEL_STUDIO_API_KEY=from-file\nLABEL_STUDIO_URL=http://file:1\n")
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    found = ls.credentials(tmp_path / ".env")
    assert found["LABEL_STUDIO_API_KEY"] == "from-env" and found["LABEL_STUDIO_URL"] == "http://file:1"


def test_serving_without_an_account_says_which_variables_to_set(tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match="set LABEL_STUDIO_USERNAME, LABEL_STUDIO_PASSWORD"):
        ls.server_env(tmp_path, tmp_path, {ls.TOKEN_VAR: "t"})


def test_a_missing_sdk_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "label_studio_sdk", None)
    with pytest.raises(
        GenfusionError, match="Label Studio SDK is not installed.*requirements/label-studio-sdk"
    ):
        ls.LabelStudio("http://127.0.0.1:8080", "t")


@contextlib.contextmanager
def dvc_lock_held(root: Path) -> Iterator[None]:
    """DVC's repo lock of the project at `root`, held by another process for the block, as a
    running `dvc repro` holds it."""
    script = (
        "import sys\nfrom dvc.repo import Repo\n"
        "with Repo(sys.argv[1]).lock:\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n", "the other process could not take DVC's lock"
        yield
    finally:
        holder.communicate(timeout=60)  # its stdin closes: it lets the lock go


def test_a_pull_while_a_dvc_command_runs_stops_before_writing_or_asking_the_server(
    tmp_path: Path, monkeypatch
) -> None:
    run(tmp_path, "git", "init", "-q", "-b", "main")
    run(tmp_path, "dvc", "init", "-q")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ls.TOKEN_VAR, raising=False)  # no server here: the lock comes first
    with dvc_lock_held(tmp_path), pytest.raises(GenfusionError, match=BUSY):
        annotate.pull_main(
            load_params(ROOT / "params.yaml"),
            subject="canopy",
            generated=tmp_path / "data/generated",
            annotations=tmp_path / "data/annotations",
        )
    assert not (tmp_path / "data").exists()


# --- against a real server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A git + DVC project with generated images and their automatic labels, served by a real
    Label Studio (which `make test` installs into the git-ignored .labelstudio/venv)."""
    exe = ls.installed_server(ROOT / ".labelstudio")
    if not exe.is_file():
        not_installed(f"Label Studio ({exe})")
    root = tmp_path_factory.mktemp("annotate-project")
    images = root / "data/generated/canopy/images"
    images.mkdir(parents=True)
    for k, stem in enumerate(STEMS):
        Image.new("RGB", SIZE, (20 * k, 120, 40)).save(images / f"{stem}.png")
    found = [
        prelabel.Labels((Box("tree", 4, 6, 20, 22), Box("tree", 30, 10, 50, 30)), (0.8, 0.4)),
        prelabel.Labels((Box("tree", 10, 10, 30, 30),), (0.6,)),
        prelabel.Labels((), ()),
    ]
    prelabel.write_labels(root / "data/prelabels/canopy", STEMS, found, [SIZE] * 3, CLASSES, "detector")
    (root / "data/annotations").mkdir(parents=True)
    (root / "data/annotations/README.md").write_text("people's labels\n")
    port = free_port()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["annotate"]["url"] = f"http://127.0.0.1:{port}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # A stage that reads the annotations, as the datasets stage does.
    stage = {
        "cmd": "ls -R data/annotations > listing.txt",
        "deps": ["data/annotations"],
        "outs": ["listing.txt"],
    }
    # The project's folders (`vars: paths`), where the commands outside a stage look for theirs.
    folders = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"vars": folders, "stages": {"listing": stage}}))
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "dvc", "init", "-q")
    commit(root, "init")

    token = secrets.token_hex(20)
    account = {ls.USER_VAR: "annotator@example.org", ls.PASSWORD_VAR: secrets.token_hex(8)}
    env = ls.server_env(tmp_path_factory.mktemp("ls-home"), root, account | {ls.TOKEN_VAR: token})
    server = ls.start_server(exe, port, env, root.parent / "label-studio.log")
    os.environ[ls.TOKEN_VAR] = token
    try:
        yield root
    finally:
        os.environ.pop(ls.TOKEN_VAR, None)
        ls.stop_server(server)


def api(root: Path) -> ls.LabelStudio:
    url = yaml.safe_load((root / "params.yaml").read_text())["annotate"]["url"]
    return ls.LabelStudio(url, os.environ[ls.TOKEN_VAR])


def tasks_by_key(server: ls.LabelStudio, project: int) -> dict[str, dict]:
    found = server.sdk.tasks.list(project=project, page_size=100, fields="all")
    return {t.data[ls_format.KEY]: t.model_dump() for t in found}


def push(root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    return annotate.push_main(
        load_params(root / "params.yaml"),
        subject="canopy",
        generated=root / "data/generated",
        prelabels=root / "data/prelabels",
    )


def pull(root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    return annotate.pull_main(
        load_params(root / "params.yaml"),
        subject="canopy",
        generated=root / "data/generated",
        annotations=root / "data/annotations",
    )


def labels(root: Path, stem: str) -> list[Box]:
    text = (root / "data/annotations/canopy/labels" / f"{stem}.txt").read_text()
    return [parse_yolo_line(line, CLASSES, *SIZE) for line in text.splitlines()]


def corners(box: Box) -> tuple[float, ...]:
    return box.x0, box.y0, box.x1, box.y1


@pytest.mark.integration
def test_push_pull_round_trip_through_a_real_server(project: Path, monkeypatch) -> None:
    root = project
    summary = push(root, monkeypatch)
    assert summary["images"] == 3 and summary["added"] == 3
    server = api(root)
    tasks = tasks_by_key(server, summary["project"])
    assert sorted(tasks) == [f"canopy/{stem}.png" for stem in STEMS]
    # The images are served from this folder through local-file storage.
    image = requests.get(
        server.url + tasks["canopy/canopy_00000.png"]["data"]["image"],
        headers={"Authorization": f"Token {os.environ[ls.TOKEN_VAR]}"},
        timeout=30,
    )
    assert image.ok and image.content == (root / "data/generated/canopy/images/canopy_00000.png").read_bytes()
    # A second push adds nothing.
    assert push(root, monkeypatch)["added"] == 0
    assert len(tasks_by_key(server, summary["project"])) == 3

    # An annotator starts from the predictions: moves the first box 5 px right, deletes the
    # second, adds one; skips the second image; leaves the third open.
    first = tasks["canopy/canopy_00000.png"]
    prediction = first["predictions"][0]["result"]
    auto = read_label_file(root / "data/prelabels/canopy/labels/canopy_00000.txt", CLASSES, SIZE)
    sent = [ls_format.ls_result(box, SIZE, "detect")["value"] for box in auto]
    assert [r["value"] for r in prediction] == sent
    moved = json.loads(json.dumps(prediction[0]))
    moved["value"]["x"] += 5 * 100 / SIZE[0]
    added = ls_format.ls_result(Box("tree", 40, 30, 60, 45), SIZE, "detect")
    annotation = server.sdk.annotations.create(first["id"], result=[moved, added], was_cancelled=False)
    second = tasks["canopy/canopy_00001.png"]
    server.sdk.annotations.create(second["id"], result=[], was_cancelled=True)

    pulled = pull(root, monkeypatch)
    assert (pulled["tasks"], pulled["annotated"], pulled["skipped"], pulled["open"]) == (3, 1, 1, 1)
    assert pulled["new_labels"] == ["canopy_00000"] and not pulled["changed_labels"]
    edited = [corners(box) for box in labels(root, "canopy_00000")]
    assert edited == [pytest.approx((9, 6, 25, 22), abs=1e-3), pytest.approx((40, 30, 60, 45), abs=1e-3)]
    assert sorted(p.name for p in (root / "data/annotations/canopy/labels").iterdir()) == ["canopy_00000.txt"]
    first_version = yaml.safe_load((root / "data/annotations/canopy.dvc").read_text())["outs"][0]["md5"]
    # The pulled folder is DVC's, and a stage that depends on data/annotations still runs.
    run(root, "dvc", "repro")
    assert "canopy_00000.txt" in (root / "listing.txt").read_text()

    # A second round: the box moves again. The change is reported, and the first version
    # stays in DVC's cache.
    moved["value"]["y"] += 4 * 100 / SIZE[1]
    server.sdk.annotations.update(annotation.id, result=[moved, added])
    again = pull(root, monkeypatch)
    assert again["changed_labels"] == ["canopy_00000"] and not again["new_labels"]
    assert corners(labels(root, "canopy_00000")[0]) == pytest.approx((9, 10, 25, 26), abs=1e-3)
    second_version = yaml.safe_load((root / "data/annotations/canopy.dvc").read_text())["outs"][0]["md5"]
    assert second_version != first_version
    cached = root / ".dvc/cache/files/md5" / first_version[:2] / first_version[2:]
    assert cached.is_file()

    # A label that is not a params class names the task and the label; nothing is written.
    third = tasks["canopy/canopy_00002.png"]
    bush = ls_format.ls_result(Box("bush", 1, 1, 9, 9), SIZE, "detect")
    server.sdk.annotations.create(third["id"], result=[bush], was_cancelled=False)
    before = (root / "data/annotations/canopy/labels/canopy_00000.txt").read_bytes()
    with pytest.raises(
        GenfusionError, match=rf"task {third['id']}: label 'bush' is not one of the params classes"
    ):
        pull(root, monkeypatch)
    assert (root / "data/annotations/canopy/labels/canopy_00000.txt").read_bytes() == before
    assert not (root / "data/annotations/canopy/labels/canopy_00002.txt").exists()


@pytest.mark.integration
def test_server_problems_are_clear_errors_and_write_nothing(project: Path, monkeypatch) -> None:
    root = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    url = params["annotate"]["url"]
    out = root / "data/annotations/other"
    generated, wanted = root / "data/generated/canopy", "genfusion other"
    wrong = ls.LabelStudio(url, "not-the-token")
    with pytest.raises(GenfusionError, match="refused the API token"):
        annotate.pull(wrong, wanted, generated, out, CLASSES, "detect")
    down = ls.LabelStudio(f"http://127.0.0.1:{free_port()}", "t")
    with pytest.raises(GenfusionError, match="cannot reach Label Studio at"):
        annotate.pull(down, wanted, generated, out, CLASSES, "detect")
    server = api(root)
    with pytest.raises(GenfusionError, match="has no project 'genfusion other'; push first"):
        annotate.pull(server, wanted, generated, out, CLASSES, "detect")
    server.ensure_project(wanted, ls_format.label_config(CLASSES, "detect"))
    with pytest.raises(GenfusionError, match="project 'genfusion other' is empty"):
        annotate.pull(server, wanted, generated, out, CLASSES, "detect")
    assert not out.exists()


def folder_state(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, hidden ones included."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
    }


@pytest.mark.integration
def test_a_pull_while_a_dvc_command_runs_writes_nothing_until_it_ends(project: Path, monkeypatch) -> None:
    root = project
    # A Label Studio project and an annotations folder of its own: the other tests' stay as they are.
    params = load_params(root / "params.yaml")
    params = params.model_copy(
        update={"annotate": params.annotate.model_copy(update={"project": "locked {subject}"})}
    )
    monkeypatch.chdir(root)
    pushed = annotate.push_main(
        params, subject="canopy", generated=root / "data/generated", prelabels=root / "data/prelabels"
    )
    server = api(root)
    task = tasks_by_key(server, pushed["project"])["canopy/canopy_00000.png"]
    box = ls_format.ls_result(Box("tree", 4, 6, 20, 22), SIZE, "detect")
    server.sdk.annotations.create(task["id"], result=[box], was_cancelled=False)
    annotations = root / "data/locked"

    def pull_locked() -> dict:
        return annotate.pull_main(
            params, subject="canopy", generated=root / "data/generated", annotations=annotations
        )

    with dvc_lock_held(root), pytest.raises(GenfusionError, match=BUSY):
        pull_locked()
    assert not annotations.exists()  # no labels, no temporary folder
    # Once the DVC command ends, the same pull reports the labels as new and versions them.
    assert pull_locked()["new_labels"] == ["canopy_00000"]
    assert (annotations / "canopy/labels/canopy_00000.txt").is_file()
    assert (annotations / "canopy.dvc").is_file()

    # A hand edit, then a pull during a DVC command: the folder stays exactly as it was, and the
    # next pull reports the change, having kept the edit in DVC's cache first.
    edited = b"0 0.5 0.5 0.25 0.25\n"
    (annotations / "canopy/labels/canopy_00000.txt").write_bytes(edited)
    before = folder_state(annotations)
    with dvc_lock_held(root), pytest.raises(GenfusionError, match=BUSY):
        pull_locked()
    assert folder_state(annotations) == before
    assert pull_locked()["changed_labels"] == ["canopy_00000"]
    digest = hashlib.md5(edited).hexdigest()
    assert (root / ".dvc/cache/files/md5" / digest[:2] / digest[2:]).is_file()


# --- the order of the tasks, and a budget -----------------------------------------------------


def entropy_bits(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def expected_uncertainty(root: Path) -> dict[str, float]:
    """Each image's uncertainty worked out here from the prelabel manifest's scores: the mean
    entropy of its boxes' confidences, 1.0 with no box or no row."""
    with (root / "data/prelabels/canopy/manifest.csv").open(newline="") as f:
        scores = {Path(row["file"]).stem: json.loads(row["scores"]) for row in csv.DictReader(f)}
    found = {}
    for stem in STEMS:
        own = scores.get(stem) or []
        found[f"canopy/{stem}.png"] = sum(map(entropy_bits, own)) / len(own) if own else 1.0
    return found


def push_to(root: Path, monkeypatch, title: str, **options) -> dict:
    """A push into a project of its own, so the other tests' projects stay as they are."""
    monkeypatch.chdir(root)
    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"annotate": params.annotate.model_copy(update={"project": title})})
    return annotate.push_main(
        params,
        subject="canopy",
        generated=root / "data/generated",
        prelabels=root / "data/prelabels",
        **options,
    )


def keys_by_id(server: ls.LabelStudio, project: int) -> list[str]:
    """The project's task keys in the order of their ids: Label Studio's default labelling stream."""
    return [key for key, _ in sorted(tasks_by_key(server, project).items(), key=lambda kv: kv[1]["id"])]


@pytest.mark.integration
def test_push_puts_the_most_uncertain_automatic_labels_first(project: Path, monkeypatch) -> None:
    root = project
    unsure = expected_uncertainty(root)
    most_first = sorted(unsure, key=lambda key: (-unsure[key], key))
    assert most_first != sorted(unsure)  # the fixture's scores make the two orders differ
    summary = push_to(root, monkeypatch, "ordered {subject}")
    assert (summary["added"], summary["order"], summary["budget"], summary["skipped"]) == (
        3,
        "uncertainty",
        None,
        0,
    )
    server = api(root)
    assert keys_by_id(server, summary["project"]) == most_first
    # Each prediction carries the image-level score 1 - uncertainty (shown in the Data Manager).
    for key, task in tasks_by_key(server, summary["project"]).items():
        [prediction] = task["predictions"]
        assert prediction["score"] == pytest.approx(1 - unsure[key], abs=1e-6)


@pytest.mark.integration
def test_a_budget_pushes_the_most_uncertain_then_the_next_ones(project: Path, monkeypatch) -> None:
    root = project
    unsure = expected_uncertainty(root)
    most_first = sorted(unsure, key=lambda key: (-unsure[key], key))
    first = push_to(root, monkeypatch, "budget {subject}", budget=2)
    assert (first["added"], first["budget"], first["skipped"]) == (2, 2, 1)
    server = api(root)
    assert keys_by_id(server, first["project"]) == most_first[:2]
    # A larger budget later adds the next ones, never the same image twice.
    second = push_to(root, monkeypatch, "budget {subject}", budget=5)
    assert (second["added"], second["skipped"]) == (1, 0)
    assert keys_by_id(server, first["project"]) == most_first


@pytest.mark.integration
def test_order_file_keeps_file_order_and_a_budget_below_one_is_refused(
    project: Path, monkeypatch, tmp_path: Path
) -> None:
    root = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["annotate"]["project"] = "by file {subject}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    command = ["annotate", "push", "--subject", "canopy", "--params", str(tmp_path / "params.yaml")]
    refused = CliRunner().invoke(app, [*command, "--budget", "0"])
    assert isinstance(refused.exception, GenfusionError) and "--budget" in str(refused.exception)
    server = api(root)
    assert server.project("by file canopy") is None  # refused before anything reached the server
    with pytest.raises(GenfusionError, match="--budget must be .* at least 1"):
        push_to(root, monkeypatch, "by file {subject}", budget=-1)
    # In a process of its own, as a user runs it: what it prints is read as they read it.
    cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]
    pushed = subprocess.run([*cli, *command, "--order", "file"], cwd=root, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    # Not the SDK's HTTP client's line per request, whose last page's `404 Not Found` reads like
    # an error.
    said = pushed.stdout + pushed.stderr
    assert "HTTP Request" not in said and "404" not in said, said
    assert "canopy" in said  # what the push itself says
    assert keys_by_id(server, server.project("by file canopy")) == [f"canopy/{stem}.png" for stem in STEMS]
