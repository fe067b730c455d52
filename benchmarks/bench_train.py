"""One default training, measured: the train stage against bare Ultralytics, and where its time goes.

Run from the project root after `dvc repro real_dataset` (needs data/datasets/real):
    .venv/bin/python benchmarks/bench_train.py [--epochs N] [--data data/datasets/real]

With params.yaml's train.* (train.epochs unless --epochs; seed 0) it trains
- through the train stage (`train_detector`: scratch folder, exact-resume state, dvclive curves);
- with bare Ultralytics: `YOLO(train.model).train(data, ...)` with the arguments the stage passes
  (on the threads Ultralytics chooses: the cores less one);
each in a fresh process set up as the command line sets one up (params `threads`), and prints
for each its wall time and CPU time (children included: the data-loading workers), then the time
split that Ultralytics' callbacks mark:
- start: process start to the first batch (imports, model build, dataset scan, loaders);
- step: each batch's forward, loss, backward and optimizer step (on_train_batch_start to _end);
- data: waiting for the next batch (loading, augmentation, collation: _end to the next _start);
- val: validation after each epoch (on_val_start to on_val_end);
- save: metrics and checkpoint after each epoch (on_val_end to on_model_save);
- other: the rest of the epochs (epoch start and end, callbacks, logging, curves);
- finish: after the last epoch (final validation of the best weights, stripping, moving into place);
then the stage's wall time over the library's, and an epoch's time over its step time (the aim is
1.3: an epoch of forward and backward passes, not of waiting).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

PARTS = ("start", "step", "data", "val", "save", "other", "finish")


class Clock:
    """Ultralytics callbacks that add up where a training's time goes (see the module's doc)."""

    def __init__(self, started: float) -> None:
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.epochs = 0
        self._after_batch = False  # since the end of a batch of this epoch
        self._in_epoch = False
        self._mark = started

    def attach(self, model):
        for event in ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
                      "on_train_epoch_end", "on_val_start", "on_val_end", "on_model_save",
                      "on_fit_epoch_end"):  # fmt: skip
            model.add_callback(event, getattr(self, event))
        return model

    def _since(self, part: str) -> None:
        now = time.perf_counter()
        self.totals[part] += now - self._mark
        self._mark = now

    def on_train_epoch_start(self, trainer) -> None:
        self._since("start" if self.epochs == 0 else "other")
        self._after_batch = False
        self._in_epoch = True

    def on_train_batch_start(self, trainer) -> None:
        self._since("data" if self._after_batch or self.epochs else "start")

    def on_train_batch_end(self, trainer) -> None:
        self._since("step")
        self._after_batch = True

    def on_train_epoch_end(self, trainer) -> None:
        self._since("other")
        self.epochs += 1

    def on_val_start(self, validator) -> None:
        # The final validation of the best weights also calls it, after the last epoch.
        if validator.training:
            self._since("other")

    def on_val_end(self, validator) -> None:
        if validator.training:
            self._since("val")

    def on_model_save(self, trainer) -> None:
        self._since("save")

    def on_fit_epoch_end(self, trainer) -> None:
        # The final evaluation calls it once more, after the last epoch: that is `finish`.
        if self._in_epoch:
            self._since("other")
            self._in_epoch = False

    def finish(self) -> None:
        self._since("finish")


def train_once(kind: str, data: str, epochs: int | None, started: float) -> dict:
    """In a fresh process: one training, `stage` or `bare`; its clock's totals, wall and CPU time."""
    from genfusion.launch import use_threads
    from genfusion.params import load_params

    loaded = load_params(Path("params.yaml"))
    use_threads(loaded.threads)  # as the command line does, before torch is imported
    from genfusion.integrations.ultralytics import configure_offline, load_yolo
    from genfusion.stages import train

    params = loaded.train
    if epochs is not None:
        params = params.model_copy(update={"epochs": epochs, "same_steps": False})
    clock = Clock(started)
    data_yaml = Path(data) / "dataset.yaml"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        if kind == "stage":
            train.load_yolo = lambda model: clock.attach(load_yolo(model))
            train.train_detector(data_yaml, Path(scratch) / "detector", Path(scratch) / "live", params, 0)
        else:
            configure_offline()  # offline, Ultralytics' integrations off (its DVC one edits dvc.yaml)
            from ultralytics import YOLO

            counts = json.loads((data_yaml.parent / "counts.json").read_text())
            model = clock.attach(YOLO(params.model))
            model.train(data=str(data_yaml.resolve()), project=scratch, name="bare", exist_ok=True,
                        plots=False, verbose=False, **train.train_args(params, 0, counts))  # fmt: skip
        clock.finish()
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    return clock.totals | {"wall": time.perf_counter() - started, "cpu": cpu, "epochs": clock.epochs}


def run(kind: str, data: str, epochs: int | None) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(train_once, kind, data, epochs, time.perf_counter()).result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/datasets/real", help="a dataset folder (its dataset.yaml)")
    parser.add_argument("--epochs", type=int, default=None, help="instead of train.epochs (and same_steps)")
    args = parser.parse_args()
    if not (Path(args.data) / "dataset.yaml").is_file():
        raise SystemExit(f"{args.data}/dataset.yaml not found: run `dvc repro real_dataset` first")
    results = {kind: run(kind, args.data, args.epochs) for kind in ("bare", "stage")}
    print(f"one training of {args.data} (epochs: {results['stage']['epochs']}), seconds:")
    print(f"{'':8}" + "".join(f"{part:>9}" for part in (*PARTS, "wall", "cpu")) + "  cpu/wall")
    for kind, got in results.items():
        cells = "".join(f"{got[part]:9.1f}" for part in (*PARTS, "wall", "cpu"))
        print(f"{kind:8}{cells}  {got['cpu'] / got['wall']:8.2f}")
    for kind, got in results.items():
        epoch = sum(got[part] for part in ("step", "data", "val", "save", "other")) / got["epochs"]
        print(
            f"{kind}: an epoch {epoch:.2f} s, {epoch / (got['step'] / got['epochs']):.2f}x its"
            f" forward/backward ({got['step'] / got['epochs']:.2f} s); start-up and finish"
            f" {(got['start'] + got['finish']) / got['wall']:.0%} of the wall time"
        )
    print(f"stage / bare Ultralytics, wall time: {results['stage']['wall'] / results['bare']['wall']:.2f}")


if __name__ == "__main__":
    main()
