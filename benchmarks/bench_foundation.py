"""Foundation benchmarks: CLI start-up and a no-op `dvc repro` (training: bench_train.py).

Run from the project root after `make repro` (the pipeline up to date):
    .venv/bin/python benchmarks/bench_foundation.py [--repeats 3]
Prints one line per figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def median_time(args: list[str], repeats: int) -> float:
    return statistics.median(timed(args) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode or status.stdout.strip() not in ("{}", ""):
        sys.exit("the pipeline is not up to date: run `dvc repro` first, so the no-op figure is a no-op")
    help_s = median_time([str(BIN / "genfusion"), "--help"], 5)
    print(f"genfusion --help                 {help_s:7.3f} s (median of 5)")
    noop_s = median_time([str(BIN / "dvc"), "repro"], args.repeats)
    print(f"dvc repro, nothing to do         {noop_s:7.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
