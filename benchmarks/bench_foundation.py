"""Foundation benchmarks: CLI start-up, a no-op `dvc repro` of the project, and how a no-op
`dvc repro` grows with the number of stages (training: bench_train.py).

Run from the project root after `make repro` (the pipeline up to date):
    .venv/bin/python benchmarks/bench_foundation.py [--repeats 3] [--stages 10,30,100,300]
Prints one line per figure. The growth is measured on bare DVC projects in a temp dir, each
of N stages that copy one small file (a file dep, a file out, a param), so that it shows DVC's
own cost per stage beside the project's, whose stages read folders of many files.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def median_time(args: list[str], repeats: int, cwd: Path = ROOT) -> float:
    return statistics.median(timed(args, cwd) for _ in range(repeats))


def stage_count(root: Path) -> int:
    listed = subprocess.run([DVC, "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True)
    return len(listed.stdout.split())


def bare_project(root: Path, stages: int) -> Path:
    """A git + DVC project of `stages` stages, reproduced once."""
    for args in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    (root / "input.txt").write_text("seed\n")
    (root / "params.yaml").write_text("copies: 1\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  copy:\n"
        f"    foreach: {list(range(stages))}\n"
        "    do:\n"
        "      cmd: cp input.txt out-${item}.txt\n"
        "      deps: [input.txt]\n"
        "      params: [copies]\n"
        "      outs: ['out-${item}.txt']\n"
    )
    subprocess.run([DVC, "repro", "-q"], cwd=root, check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="10,30,100,300", help="stage counts of the bare projects")
    args = parser.parse_args()

    status = subprocess.run([DVC, "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode or status.stdout.strip() not in ("{}", ""):
        sys.exit("the pipeline is not up to date: run `dvc repro` first, so the no-op figure is a no-op")
    help_s = median_time([str(BIN / "genfusion"), "--help"], 5)
    print(f"genfusion --help                          {help_s:7.3f} s (median of 5)")
    stages = stage_count(ROOT)
    noop_s = median_time([DVC, "repro"], args.repeats)
    print(
        f"dvc repro, nothing to do: this project    {noop_s:7.3f} s, {stages} stages,"
        f" {1000 * noop_s / stages:5.1f} ms a stage (median of {args.repeats})"
    )
    for count in (int(n) for n in args.stages.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            bare = bare_project(Path(tmp), count)
            bare_s = median_time([DVC, "repro"], args.repeats, bare)
        print(
            f"dvc repro, nothing to do: {count:4d} bare stages {bare_s:7.3f} s,"
            f" {1000 * bare_s / count:5.1f} ms a stage (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
