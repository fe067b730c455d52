"""Foundation benchmarks: CLI start-up, a no-op `dvc repro`, and `train` against bare `yolo train`.

Run from the project root after `make repro` (needs data/datasets/real):
    .venv/bin/python benchmarks/bench_foundation.py [--epochs 10] [--imgsz 320] [--repeats 3]
Prints one line per figure; the train line gives genfusion / bare-Ultralytics wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from genfusion.params import TrainParams
from genfusion.stages.train import train_args

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(args: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def median_time(args: list[str], repeats: int, env: dict | None = None) -> float:
    return statistics.median(timed(args, env) for _ in range(repeats))


def bench_train(epochs: int, imgsz: int, repeats: int) -> tuple[float, float]:
    """Median wall time of `genfusion train` and of bare `yolo train` with the same arguments."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=epochs, imgsz=imgsz)
    counts = json.loads((ROOT / "data/datasets/real/counts.json").read_text())
    args = train_args(TrainParams(**params["train"]), seed=0, counts=counts)
    env = os.environ | {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str((ROOT / ".yolo").resolve())}
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        for i in range(repeats):
            genfusion = [str(BIN / "genfusion"), "train", "--data", "data/datasets/real"]
            genfusion += ["--out", str(tmp / f"ours{i}"), "--live", str(tmp / f"live{i}")]
            ours.append(timed([*genfusion, "--params", str(tmp / "params.yaml")], env))
            yolo = [str(BIN / "yolo"), "train", f"model={params['train']['model']}"]
            yolo += [f"data={ROOT / 'data/datasets/real/dataset.yaml'}", f"project={tmp}", f"name=bare{i}"]
            yolo += ["exist_ok=True", "plots=False", "verbose=False", *(f"{k}={v}" for k, v in args.items())]
            bare.append(timed(yolo, env))
    return statistics.median(ours), statistics.median(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode or status.stdout.strip() not in ("{}", ""):
        sys.exit("the pipeline is not up to date: run `dvc repro` first, so the no-op figure is a no-op")
    help_s = median_time([str(BIN / "genfusion"), "--help"], 5)
    print(f"genfusion --help                 {help_s:7.3f} s (median of 5)")
    noop_s = median_time([str(BIN / "dvc"), "repro"], args.repeats)
    print(f"dvc repro, nothing to do         {noop_s:7.3f} s (median of {args.repeats})")
    ours, bare = bench_train(args.epochs, args.imgsz, args.repeats)
    print(
        f"train stage, {args.epochs} epochs imgsz {args.imgsz} {ours:7.2f} s"
        f"   bare `yolo train` {bare:7.2f} s"
        f"   ratio {ours / bare:.3f} (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
