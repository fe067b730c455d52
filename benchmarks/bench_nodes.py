"""Several nodes: `generate` on two torchrun agents against one process, on this machine.

Run from the project root after `make repro` (needs models/base and data/real):
    .venv/bin/python benchmarks/bench_nodes.py [--images 32] [--batch 4] [--steps 20]

Each setup makes the same request in a fresh project folder, through the `genfusion generate`
command as dvc.yaml runs it, and is timed from start to exit (imports, model load and the
shared-folder check included):
- one process on all the cores (the default run);
- one process on one core;
- two torchrun agents, `--nnodes 2` at a c10d rendezvous on loopback, one process of one core
  each: two nodes of one core, as docs/beyond-one-machine.md runs them.
It prints the seconds, images per second and the ratio to one process on all the cores, and
checks that the agents wrote the same files as the one-core process (same threads per process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "canopy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project(folder: Path, images: int, batch: int, steps: int, threads: int) -> Path:
    """A project folder with this one's base model and real tiles, and the request's params."""
    folder.mkdir(parents=True)
    for path in ("models/base", "data/real"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).symlink_to(ROOT / path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"].update(n=images, batch=batch, steps=steps)
    params["threads"] = threads
    params["diffusion"]["processes"] = 1
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def command() -> list[str]:
    return ["generate", SUBJECT, "--base", "models/base", "--real", "data/real", "--out", "data/generated/x"]


def run_one(folder: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "genfusion.cli", *command()], cwd=folder, capture_output=True
    )
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"one process failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    return elapsed


def run_two_agents(folder: Path) -> float:
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    rendezvous += ["--rdzv-id", uuid.uuid4().hex]
    env = os.environ | {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    start = time.perf_counter()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), *rendezvous, "-m", "genfusion.cli", *command()],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for rank in range(2)
    ]  # fmt: skip
    codes = [agent.wait() for agent in agents]
    elapsed = time.perf_counter() - start
    if codes != [0, 0]:
        raise SystemExit(f"the two agents failed: exit codes {codes}")
    return elapsed


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    setups = [
        (f"one process, {cores} threads", cores, run_one),
        ("one process, 1 thread", 1, run_one),
        ("two agents (--nnodes 2), 1 thread each", 1, run_two_agents),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as scratch:
        times, outputs = [], []
        for index, (_, threads, run) in enumerate(setups):
            folder = project(Path(scratch) / str(index), args.images, args.batch, args.steps, threads)
            times.append(run(folder))
            outputs.append(files(folder / "data/generated/x"))
            shutil.rmtree(folder / "data/generated")
        print(
            f"generate@{SUBJECT}: {args.images} images, batch {args.batch}, {args.steps} steps, {cores} cores"
        )
        print("| setup | seconds | images/s | time / one process on all cores |")
        print("|---|---|---|---|")
        for (name, _, _), seconds in zip(setups, times, strict=True):
            print(f"| {name} | {seconds:.1f} | {args.images / seconds:.2f} | {seconds / times[0]:.2f} |")
        same = outputs[2] == outputs[1]
        print(f"two agents wrote the same {len(outputs[2])} files as one process of 1 thread: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
