"""Ultralytics, set up to run offline and to log only where we ask it to.

Import Ultralytics through `load_yolo()` only: its settings must be in place before
the first import, which otherwise probes the network and, with dvclive installed,
turns on a callback that rewrites the root dvc.yaml during `dvc exp run`.

`training_state` and `restore_training_state` reach into the trainer of Ultralytics 8.4 (its
loaders, EMA and close_mosaic schedule) to resume a run exactly; tests/test_train.py checks that
they still do.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genfusion import layout
from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    import torch
    from ultralytics import YOLO
    from ultralytics.engine.trainer import BaseTrainer

log = logging.getLogger(__name__)

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
        model = YOLO(name)
    except FileNotFoundError as exc:
        raise GenfusionError(f"train.model: cannot build {name!r}: {exc}") from exc
    except Exception as exc:  # Ultralytics raises many kinds for a file that is not a checkpoint
        if not name.endswith(".pt"):
            raise
        raise GenfusionError(
            f"{name}: not a YOLO weights file ({checkpoint_problem(exc)}); give a detector the train"
            " stage saved (models/detectors/<variant>-<seed>/weights/best.pt) or weights saved by Ultralytics"
        ) from exc
    keep_threads(model)
    return model


def checkpoint_problem(exc: Exception) -> str:
    """What was wrong with a file that is not a checkpoint, in one line: the cause Ultralytics
    quotes (UnpicklingError: ...), without its advice to download an official model."""
    text = str(exc)
    quoted = re.search(r"\((\w+(?:Error|Exception): [^\n]*?)\)\.?(?:\n|$)", text)
    if quoted:
        return quoted.group(1)
    first = text.splitlines()[0].strip() if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# Where Ultralytics has just selected its device, which on a CPU sets torch's thread count.
DEVICE_SELECTED = ("on_pretrain_routine_start", "on_val_start", "on_predict_start")


def keep_threads(model: YOLO) -> None:
    """Train, validate and predict on the threads this process computes on (params `threads`,
    set by the command line), not on the cores less one that Ultralytics sets when it selects a
    CPU: one thread on a 2-core machine, one core idle."""
    import torch

    count = torch.get_num_threads()

    def restore(_) -> None:
        torch.set_num_threads(count)

    for event in DEVICE_SELECTED:
        model.add_callback(event, restore)


def training_state(trainer: BaseTrainer) -> dict[str, Any]:
    """What a resumed run needs, besides Ultralytics' last.pt, to go on exactly as this one will
    after the epoch it has just trained.

    last.pt holds the EMA, from which a resumed run takes its weights, and the optimizer in half
    precision, and no random state: this adds the weights, EMA and optimizer in full precision,
    the random generators, the train loader's shuffling and the mosaic buffer (the recently loaded
    images mosaic picks its partners from).
    """
    import numpy as np
    import torch
    from ultralytics.utils.torch_utils import unwrap_model

    loader = trainer.train_loader
    state = {
        "model": unwrap_model(trainer.model).state_dict(),
        "ema": trainer.ema.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "sampler": loader.sampler.generator.get_state(),
        "mosaic_buffer": list(loader.dataset.buffer),
    }
    if trainer.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(trainer.device)
    return state


def restore_training_state(trainer: BaseTrainer, state: dict[str, Any]) -> None:
    """Put back a `training_state` at the start of a resumed run's first epoch: after Ultralytics
    has loaded last.pt, re-seeded the generators and built the loaders, before the epoch draws."""
    import numpy as np
    import torch
    from ultralytics.utils.torch_utils import unwrap_model

    unwrap_model(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.accumulate > 1:
        log.warning(
            "train: with train.nbs above train.batch, each step adds up the gradients of %d batches,"
            " and Ultralytics starts that count afresh on resume: the resumed epochs may differ"
            " slightly from an uninterrupted run's (train.nbs equal to train.batch resumes exactly)",
            trainer.accumulate,
        )
    loader = trainer.train_loader
    if loader.num_workers:
        log.warning(
            "train: %d data-loading worker processes draw the augmentations, and their random state"
            " is lost with the interrupted run: the resumed epochs see other batches and"
            " augmentations than an uninterrupted run would (train.workers: 0 resumes exactly)",
            loader.num_workers,
        )
    else:
        for index in state["mosaic_buffer"]:
            loader.dataset.load_image(index)  # in the interrupted run's order, as it buffered them
        continue_shuffling(trainer, state["sampler"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], trainer.device)


def continue_shuffling(trainer: BaseTrainer, saved: torch.Tensor) -> None:
    """Make a resumed run's train loader, fresh from Ultralytics, give from this epoch on the
    batches the interrupted run's would have given, from its sampler generator's state `saved` at
    the end of the previous epoch.

    Besides each epoch's permutation, that generator gives the worker seed of every new loader
    iterator, and each pass of the sampler ends with one more, unused, permutation: drawn at the
    next epoch's first batch when the epoch did not exhaust the sampler (its last batch was full,
    or dropped). The interrupted run kept one iterator across epochs, except that Ultralytics
    resets it when mosaic closes; a resumed run starts a new one, and resets it at its first epoch
    when that is mosaic's closing epoch or a later one.
    """
    import torch

    loader = trainer.train_loader
    close_epoch = trainer.epochs - trainer.args.close_mosaic if trainer.args.close_mosaic else None
    generator = loader.sampler.generator
    if trainer.epoch == close_epoch:
        # Both runs reset the loader now, leaving the last pass unfinished: the new iterator
        # draws its seed, then the permutation, from the saved state.
        generator.set_state(saved)
        return
    if close_epoch is not None and trainer.epoch > close_epoch:
        # Only this run resets the loader now (no reset follows): the new iterator's seed must
        # not shift the permutations, so the sampler gets a generator of its own.
        loader.sampler.generator = generator = torch.Generator()
    else:
        # The interrupted run drew no seed here: make the iterator before the restore.
        loader.iterator = loader._get_iterator()
    generator.set_state(saved)
    if loader.drop_last or len(loader.sampler) % loader.batch_size == 0:
        torch.randperm(len(loader.sampler), generator=generator)  # the end of the last pass


# What Ultralytics writes into a run that differs from one run of the same request to the next,
# though the weights are the same: the date, the git details and each epoch's wall-clock time (in
# the checkpoints and results.csv), and absolute paths (in the checkpoints' train_args, their
# model's args and args.yaml), which differ between two clones of the project.
RUN_DETAILS = ("date", "git")
PATH_ARGS = ("data", "project", "save_dir")


def _paths_from(args: dict, root: Path) -> dict:
    for key in PATH_ARGS:
        value = args.get(key)
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(root):
            args[key] = Path(value).relative_to(root).as_posix()
    return args


def settle_run(run: Path, root: Path) -> None:
    """Make a finished run folder the same bytes for the same request and seed, so that DVC sees
    the same output: drop the run's date, git details and wall-clock times, and write the paths
    inside the project `root` relative to it."""
    import csv
    import io

    import torch
    import yaml

    from genfusion import fsio
    from genfusion.manifest import write_manifest

    root = root.resolve()
    for checkpoint in sorted((run / "weights").glob("*.pt")):
        data = torch.load(checkpoint, map_location="cpu", weights_only=False)
        for key in RUN_DETAILS:
            data.pop(key, None)
        if isinstance(data.get("train_results"), dict):
            data["train_results"].pop("time", None)
        if isinstance(data.get("train_args"), dict):
            _paths_from(data["train_args"], root)
        for model in (data.get("model"), data.get("ema")):
            if isinstance(getattr(model, "args", None), dict):
                _paths_from(model.args, root)
        buffer = io.BytesIO()
        torch.save(data, buffer)
        fsio.write_bytes(checkpoint, buffer.getvalue())
    args = run / "args.yaml"
    if args.is_file():
        settled = _paths_from(yaml.safe_load(args.read_text()), root)
        fsio.write_text(args, yaml.safe_dump(settled, sort_keys=False))
    results = run / "results.csv"
    if results.is_file():
        with results.open(newline="") as f:
            rows = [
                {k: v for k, v in row.items() if k != "time"}
                for row in csv.DictReader(f, skipinitialspace=True)
            ]
        write_manifest(results, list(rows[0]) if rows else [], rows)


def settle_export(onnx_file: Path) -> None:
    """The ONNX model rewritten so that every export of the same weights is the same file: without
    the date of its export, and with its intermediate shapes inferred again by onnx. The shapes
    onnxslim leaves (graph.value_info) differ from export to export of the same weights (repeated
    entries, in a varying number and order); the graph and its weights do not."""
    import onnx

    model = onnx.load(str(onnx_file))
    kept = [prop for prop in model.metadata_props if prop.key != "date"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    del model.graph.value_info[:]
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(onnx_file))
