"""Atomic writes: what a kill -9 leaves is removed by the next run, outputs get the umask's modes,
and the thread count every stage computes with."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from genfusion import fsio

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_outputs_get_the_modes_of_the_umask(
    tmp_path: Path, umask: int, file_mode: int, folder_mode: int
) -> None:
    before = os.umask(umask)
    try:
        fsio.write_json(tmp_path / "metrics.json", {"map": 0.5})
        with fsio.replace_dir(tmp_path / "out") as scratch:
            (scratch / "images").mkdir()
            fsio.write_bytes(scratch / "images" / "a.png", b"png")
    finally:
        os.umask(before)
    assert mode(tmp_path / "metrics.json") == file_mode
    assert mode(tmp_path / "out") == folder_mode
    assert mode(tmp_path / "out" / "images") == folder_mode
    assert mode(tmp_path / "out" / "images" / "a.png") == file_mode


def killed_while_writing(out: Path) -> None:
    """A process killed with SIGKILL (no cleanup runs) in the middle of writing `out`."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from genfusion import fsio
        with fsio.replace_dir(Path({str(out)!r})) as scratch:
            for i in range(50):
                (scratch / f"tile{{i}}.png").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == -9


def test_what_a_killed_write_leaves_is_removed_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "real"
    with fsio.replace_dir(out) as scratch:
        (scratch / "old.txt").write_text("previous output")
    killed_while_writing(out)
    debris = [p for p in tmp_path.iterdir() if p.name != "real"]
    assert debris, "the kill left nothing to clean: the test proves nothing"
    assert (out / "old.txt").read_text() == "previous output"  # the kill never touches the output

    with fsio.replace_dir(out) as scratch:
        (scratch / "new.txt").write_text("new output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_another_outputs_scratch_is_left_alone(tmp_path: Path) -> None:
    killed_while_writing(tmp_path / "real-extra")
    left = sorted(p.name for p in tmp_path.iterdir())
    with fsio.replace_dir(tmp_path / "real") as scratch:
        (scratch / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*left, "real"])


def threads_seen(threads: int | None, cpus: set[int] | None = None) -> list[str]:
    """torch's and OpenMP's thread counts in a fresh process after `use_threads(threads)`, run on
    the CPUs `cpus` (its affinity) when given."""
    script = textwrap.dedent(
        f"""
        import os
        from genfusion.launch import use_threads
        use_threads({threads!r})
        import torch
        print(torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    return done.stdout.split()


def test_threads_param_sizes_torch_and_openmp() -> None:
    assert threads_seen(1) == ["1", "1"]
    one_cpu = {min(os.sched_getaffinity(0))}
    # By default, the CPUs the process may run on, not the machine's.
    assert threads_seen(None, one_cpu) == ["1", "1"]
    every = str(len(os.sched_getaffinity(0)))
    assert threads_seen(None) == [every, every]


def test_every_command_applies_the_threads_param(tmp_path: Path) -> None:
    params = (ROOT / "params.yaml").read_text().replace("\nthreads: null\n", "\nthreads: 1\n")
    assert "\nthreads: 1\n" in params
    (tmp_path / "params.yaml").write_text(params)
    cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]
    done = subprocess.run(
        [*cli, "-v", "params", "--params", str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "computing on 1 threads" in done.stdout + done.stderr
