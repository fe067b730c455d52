"""`genfusion annotate serve | push | pull`: people check and correct the automatic labels in
Label Studio, and their labels come back versioned by DVC.

- serve: Label Studio in its own venv (its pins clash with this project's), on 127.0.0.1,
  with its database under `annotate.home` (git-ignored) and no outside calls.
- push: one project per subject, labelling config from the params classes (rectangles, or
  polygons for `task: segment`); one task per generated image, keyed by subject and file
  name so that pushing again adds nothing; the automatic labels as predictions; images
  served from this folder through Label Studio's local-file storage.
- pull: the export in, `data/annotations/<subject>/` out (YOLO labels of every image a
  person finished, and a manifest), written atomically and `dvc add`-ed, with a summary and
  the labels that changed since the last pull.

The server is reached through its REST API with `requests`: the Label Studio SDK pins an
OpenCV that would replace the one Ultralytics needs in this environment. The API token comes
from the environment or a git-ignored `.env`, never from params or logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genfusion import fsio
from genfusion.annotations import Box, yolo_line
from genfusion.errors import GenfusionError
from genfusion.params import AnnotateParams

log = logging.getLogger(__name__)

LABEL_STUDIO = "label-studio==1.23.2"
# Environment (or .env) variables: the server's address and token, and the account `serve` creates.
URL_VAR, TOKEN_VAR = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
USER_VAR, PASSWORD_VAR = "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD"
# The task data field that names an image for good: "<subject>/<file name>".
KEY = "genfusion_key"
FROM_NAME, TO_NAME = "label", "image"
MANIFEST_COLUMNS = ("file", "task", "annotation", "updated_at", "boxes")


# --- pure core: params classes and labels <-> Label Studio JSON ------------------------------


def label_config(classes: Sequence[str], task: str) -> str:
    """The labelling interface: the image and one tool (rectangles, or polygons) with the classes."""
    tool = "PolygonLabels" if task == "segment" else "RectangleLabels"
    labels = "".join(f'<Label value="{_xml_attr(name)}"/>' for name in classes)
    return (
        f'<View><Image name="{TO_NAME}" value="${TO_NAME}"/>'
        f'<{tool} name="{FROM_NAME}" toName="{TO_NAME}">{labels}</{tool}></View>'
    )


def _xml_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def ls_result(box: Box, size: tuple[int, int], task: str) -> dict:
    """One object as a Label Studio result: coordinates in percent of the image."""
    width, height = size
    common = {"from_name": FROM_NAME, "to_name": TO_NAME, "original_width": width, "original_height": height}
    if task == "segment":
        points = [[x * 100 / width, y * 100 / height] for x, y in box.polygon or box.corners]
        return common | {"type": "polygonlabels", "value": {"points": points, "polygonlabels": [box.label]}}
    value = {
        "x": box.x0 * 100 / width,
        "y": box.y0 * 100 / height,
        "width": box.width * 100 / width,
        "height": box.height * 100 / height,
        "rotation": 0,
        "rectanglelabels": [box.label],
    }
    return common | {"type": "rectanglelabels", "value": value}


@dataclass(frozen=True)
class Prediction:
    """An image's automatic labels, as the prelabel stage wrote them."""

    boxes: Sequence[Box]
    scores: Sequence[float]
    method: str


def task_json(key: str, url: str, size: tuple[int, int], task: str, prediction: Prediction | None) -> dict:
    """A task for one image, its automatic labels (when it has them) as the prediction people start from."""
    data = {"data": {TO_NAME: url, KEY: key}}
    if prediction is None:
        return data
    result = {
        "model_version": f"genfusion-{prediction.method}",
        # The weakest box's confidence: Label Studio sorts tasks by it, the least sure first.
        "score": min(prediction.scores, default=1.0),
        "result": [ls_result(box, size, task) for box in prediction.boxes],
    }
    return data | {"predictions": [result]}


@dataclass
class Pulled:
    """What an export holds for one subject: people's labels, and where each task stands."""

    labels: dict[str, str] = field(default_factory=dict)  # image stem -> YOLO label text
    rows: list[dict] = field(default_factory=list)  # manifest rows, one per finished image
    skipped: list[str] = field(default_factory=list)  # every annotation cancelled ("skip")
    open: list[str] = field(default_factory=list)  # no annotation yet


def read_export(tasks: Any, source: str, images: Path, classes: Sequence[str], task: str) -> Pulled:
    """People's labels from an exported task list; images must be files under `images`."""
    from genfusion.formats import read_label_studio_task
    from genfusion.images import read_header

    if not isinstance(tasks, list):
        raise GenfusionError(f"{source}: the export is not a list of tasks")
    pulled = Pulled()
    for index, entry in enumerate(tasks):
        item = read_label_studio_task(entry, index, source, images)
        name = str(entry.get("data", {}).get(KEY) or entry.get("id"))
        if item is None:
            cancelled = any(a.get("was_cancelled") for a in entry.get("annotations", []))
            (pulled.skipped if cancelled else pulled.open).append(name)
            continue
        where = f"{source}: task {entry.get('id')}"
        for box in item.boxes:
            if box.label not in classes:
                raise GenfusionError(
                    f"{where}: label {box.label!r} is not one of the params classes {list(classes)};"
                    " fix the annotation in Label Studio, or add the class to params.yaml"
                )
        size = read_header(item.image).size
        if item.size and tuple(item.size) != size:
            raise GenfusionError(
                f"{where}: annotated at {item.size[0]}x{item.size[1]} px but {item.image} is"
                f" {size[0]}x{size[1]}; the labels would not line up"
            )
        stem = item.image.stem
        if stem in pulled.labels:
            raise GenfusionError(f"{where}: {item.image.name} is the image of two tasks; delete one")
        lines = [yolo_line(box, classes.index(box.label), *size, task) for box in item.boxes]
        pulled.labels[stem] = "".join(f"{line}\n" for line in lines)
        latest = max(
            (a for a in entry["annotations"] if not a.get("was_cancelled")),
            key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or -1),
        )
        pulled.rows.append(
            {
                "file": f"labels/{stem}.txt",
                "task": entry.get("id"),
                "annotation": latest.get("id"),
                "updated_at": latest.get("updated_at"),
                "boxes": len(lines),
            }
        )
    return pulled


def label_changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, list[str]]:
    """Image stems whose people's labels are new, changed or gone since the previous pull."""
    return {
        "new": sorted(set(after) - set(before)),
        "changed": sorted(k for k in set(after) & set(before) if after[k] != before[k]),
        "removed": sorted(set(before) - set(after)),
    }


# --- the server ----------------------------------------------------------------------------


def credentials(env_file: Path = Path(".env")) -> dict[str, str]:
    """LABEL_STUDIO_* settings: the environment first, then the git-ignored `.env`."""
    from dotenv import dotenv_values

    found = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file.is_file() else {}
    names = (URL_VAR, TOKEN_VAR, USER_VAR, PASSWORD_VAR)
    return {name: os.environ.get(name) or found.get(name, "") for name in names}


class LabelStudio:
    """The REST calls this tool makes, with errors that say what to do."""

    def __init__(self, url: str, token: str) -> None:
        import requests

        if not token:
            raise GenfusionError(
                f"no Label Studio API token: set {TOKEN_VAR} in the environment or in .env"
                " (the token `genfusion annotate serve` was started with, or yours from the"
                " server's Account & Settings page)"
            )
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=600, **kwargs)
        except requests.ConnectionError:
            raise GenfusionError(
                f"cannot reach Label Studio at {self.url}: start it with `genfusion annotate serve`,"
                f" or set {URL_VAR} (or annotate.url) to your team's server"
            ) from None
        if response.status_code in (401, 403):
            raise GenfusionError(
                f"Label Studio at {self.url} refused the API token ({TOKEN_VAR}): HTTP"
                f" {response.status_code}; check the token on the server's Account & Settings page"
            )
        if not response.ok:
            raise GenfusionError(
                f"Label Studio at {self.url}: {method} {path} failed: HTTP {response.status_code}"
                f" {response.text[:300]}"
            )
        return response.json() if response.content else None

    def project(self, title: str) -> int | None:
        found = self.call("GET", "/api/projects", params={"title": title, "page_size": 1000})
        ids = [p["id"] for p in found["results"] if p["title"] == title]
        return min(ids) if ids else None

    def ensure_project(self, title: str, config: str) -> int:
        project = self.project(title)
        if project is None:
            return self.call("POST", "/api/projects", json={"title": title, "label_config": config})["id"]
        self.call("PATCH", f"/api/projects/{project}", json={"label_config": config})
        return project

    def ensure_storage(self, project: int, folder: str) -> None:
        """Local-file storage for `folder`: it lets the server serve the images there."""
        storages = self.call("GET", "/api/storages/localfiles", params={"project": project})
        if not any(s["path"] == folder for s in storages):
            body = {"project": project, "path": folder, "use_blob_urls": False, "title": "genfusion"}
            self.call("POST", "/api/storages/localfiles", json=body)

    def task_keys(self, project: int) -> set[str]:
        keys, page = set(), 1
        while True:
            found = self.call(
                "GET", "/api/tasks", params={"project": project, "page": page, "page_size": 1000}
            )
            keys |= {t["data"].get(KEY) for t in found["tasks"]}
            if page * 1000 >= found["total"]:
                return keys
            page += 1

    def import_tasks(self, project: int, tasks: list[dict]) -> None:
        # One request per thousand tasks keeps each request well under the server's size limits.
        for start in range(0, len(tasks), 1000):
            self.call("POST", f"/api/projects/{project}/import", json=tasks[start : start + 1000])

    def export(self, project: int) -> list:
        params = {"exportType": "JSON", "download_all_tasks": "true"}
        return self.call("GET", f"/api/projects/{project}/export", params=params)


def client(settings: AnnotateParams, env_file: Path = Path(".env")) -> LabelStudio:
    found = credentials(env_file)
    return LabelStudio(found[URL_VAR] or settings.url, found[TOKEN_VAR])


def project_title(settings: AnnotateParams, subject: str) -> str:
    return settings.project.format(subject=subject)


# --- push / pull ---------------------------------------------------------------------------


def push(
    server: LabelStudio,
    title: str,
    subject: str,
    generated: Path,
    prelabels: Path,
    classes: Sequence[str],
    task: str,
    document_root: Path,
) -> dict:
    """Create or update the subject's project and import the images it lacks; a summary back."""
    from genfusion.generate import MANIFEST, read_manifest
    from genfusion.images import read_header

    images = sorted((generated / "images").glob("*.png"))
    if not images:
        raise GenfusionError(
            f"{generated / 'images'}: no generated images; run `dvc repro generate@{subject}`"
        )
    root = document_root.resolve()
    folder = (generated / "images").resolve()
    if not folder.is_relative_to(root):
        raise GenfusionError(
            f"{folder} is not under annotate.document_root {root}; Label Studio serves only files there"
        )
    auto = {Path(row["file"]).stem: row for row in read_manifest(prelabels / MANIFEST).values()}
    if not auto:
        log.warning("%s: no automatic labels; the tasks get no predictions", prelabels)
    project = server.ensure_project(title, label_config(classes, task))
    server.ensure_storage(project, str(folder))
    existing = server.task_keys(project)
    new = []
    for image in images:
        key = f"{subject}/{image.name}"
        if key in existing:
            continue
        url = f"/data/local-files/?d={image.resolve().relative_to(root).as_posix()}"
        size = read_header(image).size
        row = auto.get(image.stem)
        prediction = None
        if row is not None:
            boxes = read_labels(prelabels / row["file"], classes, size)
            prediction = Prediction(boxes, json.loads(row["scores"]), row["method"])
        new.append(task_json(key, url, size, task, prediction))
    server.import_tasks(project, new)
    return {"project": project, "title": title, "images": len(images), "added": len(new)}


def read_labels(path: Path, classes: Sequence[str], size: tuple[int, int]) -> list[Box]:
    from genfusion.annotations import parse_yolo_line

    try:
        return [
            parse_yolo_line(line, classes, *size) for line in path.read_text().splitlines() if line.strip()
        ]
    except ValueError as exc:
        raise GenfusionError(f"{path}: {exc}") from None


def pull(
    server: LabelStudio, title: str, generated: Path, out: Path, classes: Sequence[str], task: str
) -> dict:
    """Write people's labels for the subject to `out` (replaced whole, only when all is read);
    the summary and the changes against the previous pull back."""
    from genfusion.generate import write_manifest

    project = server.project(title)
    if project is None:
        raise GenfusionError(
            f"Label Studio at {server.url} has no project {title!r}; push first (`genfusion annotate push`)"
        )
    tasks = server.export(project)
    if not tasks:
        raise GenfusionError(f"Label Studio project {title!r} is empty: push the images first")
    pulled = read_export(tasks, f"{server.url} project {title!r}", generated / "images", classes, task)
    before = {p.stem: p.read_text() for p in sorted((out / "labels").glob("*.txt"))}
    changes = label_changes(before, pulled.labels)
    with fsio.replace_dir(out) as scratch:
        (scratch / "labels").mkdir()
        for stem, text in pulled.labels.items():
            (scratch / "labels" / f"{stem}.txt").write_text(text)
        write_manifest(
            scratch / "manifest.csv", MANIFEST_COLUMNS, sorted(pulled.rows, key=lambda r: r["file"])
        )
    return {
        "project": title,
        "tasks": len(tasks),
        "annotated": len(pulled.labels),
        "skipped": len(pulled.skipped),
        "open": len(pulled.open),
        **{f"{kind}_labels": names for kind, names in changes.items()},
    }


def version_with_dvc(folder: Path) -> bool:
    """`dvc add` the folder when it lies in a DVC project (False when it does not), so that
    every pulled version of people's work stays in DVC's cache."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        root = Repo.find_root(str(folder.parent))
    except NotDvcRepoError:
        return False
    with Repo(root) as repo:
        repo.add(str(folder.resolve()))
    return True


def keep_previous(out: Path) -> None:
    """Record the labels already in `out` in DVC before a pull replaces them: people's work
    that was never `dvc add`-ed (a pull outside DVC, hand edits) is then not lost."""
    if out.is_dir() and any(out.iterdir()):
        version_with_dvc(out)


def summary_text(summary: dict) -> str:
    lines = [
        f"{summary['project']}: {summary['tasks']} tasks: {summary['annotated']} annotated,"
        f" {summary['skipped']} skipped (cancelled), {summary['open']} still open"
    ]
    for kind in ("new", "changed", "removed"):
        names = summary[f"{kind}_labels"]
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            lines.append(f"{kind} labels since the last pull ({len(names)}): {shown}")
    return "\n".join(lines)


# --- serve ---------------------------------------------------------------------------------


def server_executable(home: Path) -> Path:
    """Label Studio in its own venv under `home`, installed on first use."""
    venv = home / "venv"
    exe = venv / "bin" / "label-studio"
    if exe.is_file():
        return exe
    log.info("installing %s into %s (once; a minute or two)", LABEL_STUDIO, venv)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", LABEL_STUDIO], check=True)
    except subprocess.CalledProcessError as exc:
        raise GenfusionError(
            f"could not install {LABEL_STUDIO} into {venv}: {exc}; check that PyPI is reachable,"
            f" then delete {venv} and try again"
        ) from None
    return exe


def server_env(home: Path, document_root: Path, found: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: its own data folder, local files under the project, the
    account from the credentials, nothing sent anywhere."""
    missing = [name for name in (USER_VAR, PASSWORD_VAR, TOKEN_VAR) if not found.get(name)]
    if missing:
        raise GenfusionError(
            f"set {', '.join(missing)} in the environment or in .env (git-ignored): the account and"
            " API token the local Label Studio is started with"
        )
    return os.environ | {
        "LABEL_STUDIO_BASE_DATA_DIR": str((home / "data").resolve()),
        "HOME": str(home.resolve()),
        USER_VAR: found[USER_VAR],
        PASSWORD_VAR: found[PASSWORD_VAR],
        "LABEL_STUDIO_USER_TOKEN": found[TOKEN_VAR],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root.resolve()),
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }


def server_command(exe: Path, port: int) -> list[str]:
    return [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]


def start_server(exe: Path, port: int, env: Mapping[str, str], log_file: Path, timeout: float = 300):
    """Start Label Studio in the background (its own process group, output to `log_file`) and
    wait for it to answer; the running process back. For tests and benchmarks."""
    import requests

    check_port_free(port)
    with log_file.open("w") as out:
        server = subprocess.Popen(
            server_command(exe, port),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise GenfusionError(
                f"Label Studio exited at start; its log, {log_file}:\n{log_file.read_text()[-3000:]}"
            )
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise GenfusionError(f"Label Studio did not answer within {timeout:.0f} s; see {log_file}")
        time.sleep(1)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def check_port_free(port: int) -> None:
    # Label Studio silently moves to another port when its own is taken; say so instead.
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise GenfusionError(f"port {port} on 127.0.0.1 is in use; stop what runs there or choose --port")


def url_port(url: str) -> int:
    return urlsplit(url).port or 8080


# --- entry points --------------------------------------------------------------------------


def serve_main(params_path: Path, port: int | None) -> None:
    """Run the local server in the foreground until Ctrl-C."""
    from genfusion.params import load_params

    settings = load_params(params_path).annotate
    port = port or url_port(settings.url)
    home = Path(settings.home)
    env = server_env(home, Path(settings.document_root or "."), credentials())
    exe = server_executable(home)
    check_port_free(port)
    log.info("Label Studio on http://127.0.0.1:%d (data in %s); Ctrl-C stops it", port, home / "data")
    log.info(
        "on a remote machine: ssh -L %d:127.0.0.1:%d <this machine>, then open http://127.0.0.1:%d",
        port,
        port,
        port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(server_command(exe, port), env=env, check=False)


def push_main(params_path: Path, subject: str, generated: Path, prelabels: Path) -> dict:
    from genfusion.params import load_params

    params = load_params(params_path)
    params.subject(subject)  # an unknown subject is an error naming the known ones
    settings = params.annotate
    summary = push(
        client(settings),
        project_title(settings, subject),
        subject,
        generated / subject,
        prelabels / subject,
        params.classes,
        params.task,
        Path(settings.document_root or "."),
    )
    log.info(
        "%s: %d images, %d new tasks (project %s)",
        summary["title"],
        summary["images"],
        summary["added"],
        summary["project"],
    )
    return summary


def pull_main(params_path: Path, subject: str, generated: Path, annotations: Path) -> dict:
    from genfusion.params import load_params

    params = load_params(params_path)
    params.subject(subject)
    settings = params.annotate
    out = annotations / subject
    server = client(settings)
    keep_previous(out)
    summary = pull(
        server, project_title(settings, subject), generated / subject, out, params.classes, params.task
    )
    versioned = version_with_dvc(out)
    log.info(summary_text(summary))
    if versioned:
        log.info("%s is versioned by DVC: commit %s.dvc to git", out, out)
    else:
        log.info("%s is not in a DVC project: nothing versions it", out)
    return summary
