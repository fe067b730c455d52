"""Ultralytics, set up to run offline and to log only where we ask it to.

Import Ultralytics through `load_yolo()` only: its settings must be in place before
the first import, which otherwise probes the network and, with dvclive installed,
turns on a callback that rewrites the root dvc.yaml during `dvc exp run`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import layout
from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    from ultralytics import YOLO

# Per-project settings folder (git-ignored, at the project root), so runs never touch ~/.config.
CONFIG_DIR = ".yolo"
OFF_INTEGRATIONS = (
    "sync",
    "dvc",
    "tensorboard",
    "mlflow",
    "wandb",
    "clearml",
    "comet",
    "raytune",
    "vscode_msg",
)


def configure_offline() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(layout.project_root() / CONFIG_DIR))
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        # Plots want Arial and download it when missing; any TTF will do.
        import matplotlib

        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    from ultralytics import settings

    # Settings differ between Ultralytics releases; switch off those this one has.
    wanted = {k: False for k in OFF_INTEGRATIONS if k in settings}
    if any(settings.get(k) != v for k, v in wanted.items()):
        settings.update(wanted)


def load_yolo(model: str | Path) -> YOLO:
    """A YOLO model from a packaged config (`yolov8n.yaml`) or a local weights file."""
    configure_offline()
    from ultralytics import YOLO

    name = str(model)
    if name.endswith(".pt") and not Path(name).is_file():
        raise GenfusionError(
            f"train.model: weights file {name!r} not found; this project runs offline, so download"
            " it once (e.g. from the Ultralytics releases page) and give its local path, or use a"
            " config such as yolov8n.yaml to train from scratch"
        )
    try:
        return YOLO(name)
    except FileNotFoundError as exc:
        raise GenfusionError(f"train.model: cannot build {name!r}: {exc}") from exc
