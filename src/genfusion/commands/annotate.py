"""`genfusion annotate install | serve | push | pull`: people check and correct the automatic
labels in Label Studio, and their labels come back versioned by DVC.

- install: what serve does the first time, alone (`make test` runs it before the tests).
- serve: Label Studio in its own venv (its pins clash with this project's), on 127.0.0.1,
  with its database under `annotate.home` (git-ignored) and no outside calls.
- push: one project per subject, labelling config from the params classes (rectangles, or
  polygons for `task: segment`); one task per generated image, keyed by subject and file
  name so that pushing again adds nothing; the automatic labels as predictions; images
  served from this folder through Label Studio's local-file storage. New tasks go in most
  uncertain automatic labels first (so task ids, and Label Studio's default labelling stream,
  follow the order in which a person's label is worth most), optionally only the first N.
- pull: the export in, `data/annotations/<subject>/` out (YOLO labels of every image a
  person finished, and a manifest), written atomically and `dvc add`-ed while DVC's repo lock
  is held (a pull while another DVC command runs writes nothing), with a summary and the
  labels that changed since the last pull.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from genfusion import fsio, layout
from genfusion.errors import GenfusionError
from genfusion.formats.label_studio import Prediction, label_config, read_export, task_json
from genfusion.formats.yolo import read_label_file
from genfusion.integrations.label_studio import (
    LabelStudio,
    check_port_free,
    client,
    credentials,
    server_command,
    server_env,
    server_executable,
    url_port,
)
from genfusion.params import AnnotateParams, Params

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("file", "task", "annotation", "updated_at", "boxes")
Order = Literal["uncertainty", "file"]
ORDERS: tuple[Order, ...] = ("uncertainty", "file")


def label_changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, list[str]]:
    """Image stems whose people's labels are new, changed or gone since the previous pull."""
    return {
        "new": sorted(set(after) - set(before)),
        "changed": sorted(k for k in set(after) & set(before) if after[k] != before[k]),
        "removed": sorted(set(before) - set(after)),
    }


def project_title(settings: AnnotateParams, subject: str) -> str:
    return settings.project.format(subject=subject)


def binary_entropy(p: float) -> float:
    """The entropy in bits of a yes/no with probability `p` (clamped to [0, 1]): 0 when sure, 1 at 0.5."""
    p = min(max(float(p), 0.0), 1.0)
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def uncertainty(scores: Sequence[float] | None) -> float:
    """How unsure an image's automatic labels are, in [0, 1]: the mean binary entropy (bits) of
    their box confidences. An image with no automatic box, or no automatic labels at all
    (None), is 1.0, the most uncertain: the labeller found nothing there."""
    if not scores:
        return 1.0
    return sum(binary_entropy(p) for p in scores) / len(scores)


def check_order_and_budget(order: str, budget: int | None) -> None:
    if order not in ORDERS:
        raise GenfusionError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise GenfusionError(
            f"--budget must be a whole number of images, at least 1 (or left out for all), got {budget!r}"
        )


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
    order: Order = "uncertainty",
    budget: int | None = None,
) -> dict:
    """Create or update the subject's project and import the images it lacks, most uncertain
    automatic labels first (`order: uncertainty`, ties by file name) or by file name (`file`);
    with a budget, only that many of them. Each prediction's score is 1 - the image's
    uncertainty. A summary back."""
    from genfusion.images import read_header
    from genfusion.manifest import read_manifest

    check_order_and_budget(order, budget)
    images = layout.image_files(generated)
    if not images:
        raise GenfusionError(
            f"{layout.images_dir(generated)}: no generated images; run `dvc repro generate@{subject}`"
        )
    root = document_root.resolve()
    folder = layout.images_dir(generated).resolve()
    if not folder.is_relative_to(root):
        raise GenfusionError(
            f"{folder} is not under annotate.document_root {root}; Label Studio serves only files there"
        )
    auto = {Path(row["file"]).stem: row for row in read_manifest(prelabels / layout.MANIFEST).values()}
    if not auto:
        log.warning("%s: no automatic labels; the tasks get no predictions", prelabels)
    project = server.ensure_project(title, label_config(classes, task))
    server.ensure_storage(project, str(folder))
    existing = server.task_keys(project)
    new = []  # (uncertainty, file name, task)
    for image in images:
        key = f"{subject}/{image.name}"
        if key in existing:
            continue
        url = f"/data/local-files/?d={image.resolve().relative_to(root).as_posix()}"
        size = read_header(image).size
        row = auto.get(image.stem)
        prediction, unsure = None, uncertainty(None)
        if row is not None:
            boxes = read_label_file(prelabels / row["file"], classes, size)
            prediction = Prediction(boxes, json.loads(row["scores"]), row["method"])
            unsure = uncertainty(prediction.scores)
        entry = task_json(key, url, size, task, prediction)
        if prediction is not None:
            # Label Studio shows the prediction score in its Data Manager and sorts by it.
            entry["predictions"][0]["score"] = 1.0 - unsure
        new.append((unsure, image.name, entry))
    if order == "uncertainty":
        new.sort(key=lambda item: (-item[0], item[1]))
    chosen = new if budget is None else new[:budget]
    # Label Studio numbers tasks in import order: their ids, and its default stream, follow it.
    server.import_tasks(project, [entry for _, _, entry in chosen])
    return {
        "project": project,
        "title": title,
        "images": len(images),
        "added": len(chosen),
        "order": order,
        "budget": budget,
        "skipped": len(new) - len(chosen),
    }


def pull(
    server: LabelStudio, title: str, generated: Path, out: Path, classes: Sequence[str], task: str
) -> dict:
    """Write people's labels for the subject to `out` (replaced whole, only when all is read);
    the summary and the changes against the previous pull back."""
    from genfusion.manifest import write_manifest

    project = server.project(title)
    if project is None:
        raise GenfusionError(
            f"Label Studio at {server.url} has no project {title!r}; push first (`genfusion annotate push`)"
        )
    tasks = server.export(project)
    if not tasks:
        raise GenfusionError(f"Label Studio project {title!r} is empty: push the images first")
    pulled = read_export(
        tasks, f"{server.url} project {title!r}", layout.images_dir(generated), classes, task
    )
    before = {p.stem: p.read_text() for p in sorted(layout.labels_dir(out).glob("*.txt"))}
    changes = label_changes(before, pulled.labels)
    with fsio.replace_dir(out) as scratch:
        layout.labels_dir(scratch).mkdir()
        for stem, text in pulled.labels.items():
            (layout.label_file(scratch, stem)).write_text(text)
        write_manifest(
            scratch / layout.MANIFEST, MANIFEST_COLUMNS, sorted(pulled.rows, key=lambda r: r["file"])
        )
    return {
        "project": title,
        "tasks": len(tasks),
        "annotated": len(pulled.labels),
        "skipped": len(pulled.skipped),
        "open": len(pulled.open),
        **{f"{kind}_labels": names for kind, names in changes.items()},
    }


@contextlib.contextmanager
def dvc_locked(folder: Path) -> Iterator[Repo | None]:
    """The DVC project `folder` lies in, its repo lock held for the block (None when it lies in
    none). A pull writes and `dvc add`s under it, so that while another DVC command runs (a
    `dvc repro`) it writes nothing, and no DVC command starts between the write and the add."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    start = folder.resolve().parent
    while not start.is_dir():  # before the first pull, the annotations folder may not exist
        start = start.parent
    try:
        root = Repo.find_root(str(start))
    except NotDvcRepoError:
        root = None
    if root is None:
        yield None
        return
    with Repo(root) as repo, contextlib.ExitStack() as held:
        try:
            # lock_repo, not `with repo.lock`: it is the lock DVC's own commands take (through
            # @locked, and `dvc status` directly), counted per Repo, so repo.add inside the block
            # runs under this lock instead of failing to take it a second time.
            held.enter_context(lock_repo(repo))
        except LockError as exc:
            raise GenfusionError(
                f"{root}: another DVC command is running in this project (its lock"
                f" {repo.lock.lockfile} is held); nothing was pulled: wait for it to finish"
                " (e.g. the `dvc repro`) and run `genfusion annotate pull` again"
            ) from exc
        yield repo


def version_with_dvc(repo: Repo, folder: Path) -> None:
    """`dvc add` the folder, under the lock `dvc_locked` holds, so that every pulled version of
    people's work stays in DVC's cache."""
    repo.add(str(folder.resolve()))


def keep_previous(repo: Repo, out: Path) -> None:
    """Record the labels already in `out` in DVC before a pull replaces them: people's work
    that was never `dvc add`-ed (a pull outside DVC, hand edits) is then not lost."""
    if out.is_dir() and any(out.iterdir()):
        version_with_dvc(repo, out)


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


def install_main(params: Params) -> None:
    """Install the server (a no-op when it is there): `make test` does, so no test installs it."""
    exe = server_executable(Path(params.annotate.home))
    log.info("Label Studio is installed: %s", exe)


def serve_main(params: Params, *, port: int | None) -> None:
    """Run the local server in the foreground until Ctrl-C."""
    settings = params.annotate
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


def push_main(
    params: Params,
    *,
    subject: str,
    generated: Path,
    prelabels: Path,
    order: Order = "uncertainty",
    budget: int | None = None,
) -> dict:
    params.subject(subject)  # an unknown subject is an error naming the known ones
    check_order_and_budget(order, budget)  # before asking the server anything
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
        order=order,
        budget=budget,
    )
    log.info(
        "%s: %d images, %d new tasks (project %s)",
        summary["title"],
        summary["images"],
        summary["added"],
        summary["project"],
    )
    log.info(
        "new tasks in %s order%s; %d new images left out by the budget (%s)",
        order,
        " (most uncertain automatic labels first)" if order == "uncertainty" else "",
        summary["skipped"],
        "none" if budget is None else f"--budget {budget}",
    )
    return summary


def pull_main(params: Params, *, subject: str, generated: Path, annotations: Path) -> dict:
    params.subject(subject)
    settings = params.annotate
    out = annotations / subject
    with dvc_locked(out) as repo:
        server = client(settings)
        if repo is not None:
            keep_previous(repo, out)
        summary = pull(
            server, project_title(settings, subject), generated / subject, out, params.classes, params.task
        )
        if repo is not None:
            version_with_dvc(repo, out)
    log.info(summary_text(summary))
    if repo is not None:
        log.info("%s is versioned by DVC: commit %s.dvc to git", out, out)
    else:
        log.info("%s is not in a DVC project: nothing versions it", out)
    return summary
