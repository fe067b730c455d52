"""Experiments side by side, measured: two queued experiments run one after the other
(`dvc queue start -j 1`) against both at once (`-j 2`), with the cores split between them
(`-S threads=N/2`) and without (each sizes its pools for the whole machine).

Run from the project root once the stage is up to date (`make repro`, or `dvc repro
train@real-0` alone), with nothing else running and an empty experiment queue:
    .venv/bin/python benchmarks/bench_queue.py [--stage train@real-0] [--epochs 100]
Each experiment reruns the stage, and what DVC's copy of the project lacks above it (the
datasets' link farms), at a learning rate of its own: a new value each time, so that DVC's run
cache cannot hand a result back. Times run from `dvc queue start` until both have finished,
DVC's copy of the project for each experiment included. Prints seconds for each way and the
ratio to `-j 1`; the benchmark's experiments are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from genfusion.commands.experiments import FINISHED, experiments

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
# The stages run `genfusion`: this venv's, whatever PATH the benchmark was started with.
ENV = os.environ | {"PATH": os.pathsep.join([str(BIN), os.environ["PATH"]])}
PREFIX = "bench-queue-"


def dvc(*args: str) -> str:
    return subprocess.run([DVC, *args], cwd=ROOT, env=ENV, check=True, capture_output=True, text=True).stdout


def finished() -> set[str] | None:
    """The names of the experiments that have finished, failed or not; None when `dvc exp show`
    fails, as it can for a moment while an experiment finishes."""
    done = subprocess.run([DVC, "exp", "show", "--json"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        return None
    return {rev["name"] for rev in experiments(json.loads(done.stdout), (*FINISHED, "failed"))}


def run_two(way: str, jobs: int, threads: int | None, stage: str, epochs: int, rates: list[float]) -> float:
    """Queue two experiments of `stage`, run them `jobs` at a time, and return the seconds taken."""
    names = []
    for rate in rates:
        name = f"{PREFIX}{way}-{len(names)}"
        settings = ["-S", f"train.lr0={rate}", "-S", f"train.epochs={epochs}"]
        settings += ["-S", f"threads={threads}"] if threads else []
        dvc("exp", "run", "--queue", "-n", name, *settings, stage)
        names.append(name)
    start = time.perf_counter()
    # The workers it starts keep its output open until the queue is empty: not captured.
    start_queue = [DVC, "queue", "start", "-j", str(jobs)]
    subprocess.run(start_queue, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, check=True)
    while not set(names) <= (finished() or set()):
        time.sleep(2)
    seconds = time.perf_counter() - start
    failed = {rev["name"] for rev in experiments(json.loads(dvc("exp", "show", "--json")), ("failed",))}
    if failed & set(names):
        sys.exit(f"{sorted(failed)} failed: see `dvc queue logs <name>`")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", default="train@real-0")
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    # Below a millionth of the rate: no other compute, but params the run cache has not seen.
    nonce = random.Random().randrange(1, 1000) * 1e-9
    ways = [("j1", 1, None), ("j2-split", 2, max(1, cores // 2)), ("j2-whole", 2, None)]
    print(f"two experiments of {args.stage} at {args.epochs} epochs, {cores} cores")
    times = {}
    try:
        for index, (way, jobs, threads) in enumerate(ways):
            # Rates of their own for each way: no experiment repeats another's params.
            rates = [round(0.01 + 0.001 * (2 * index + k) + nonce, 12) for k in (1, 2)]
            times[way] = run_two(way, jobs, threads, args.stage, args.epochs, rates)
            each = f"threads={threads}" if threads else f"threads={cores} (default)"
            print(
                f"{way:9s} -j {jobs}, {each}: {times[way]:7.1f} s   x{times[way] / times['j1']:.2f} of -j 1"
            )
    finally:
        made = sorted(name for name in finished() or () if name.startswith(PREFIX))
        if made:
            dvc("exp", "remove", *made)


if __name__ == "__main__":
    main()
