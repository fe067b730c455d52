"""generate@subject for real on the tiny model: identical bytes, incremental N, resume after SIGKILL."""

from __future__ import annotations

import csv
import logging
import signal
import subprocess
import threading
from pathlib import Path

import killed_genfusion
import pytest
import yaml
from PIL import Image
from project import generate_canopy

from genfusion import fsio, jobs
from genfusion.diffusion.pipelines import build_tiny_pipeline, load_generator
from genfusion.diffusion.text_to_image import text_to_image
from genfusion.errors import GenfusionError
from genfusion.layout import MANIFEST
from genfusion.params import GenerateParams, parse_params
from genfusion.stages.base_model import save_builtin

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["an aerial photo of tree crowns", "tree crowns seen from above"]
# Tiny settings: 32 px, 2 DDIM steps, batches of 2.
SETTINGS = {"guidance": 2.0, "steps": 2, "resolution": 32, "batch": 2}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A builtin-style base model folder (random tiny weights; pretraining is tested elsewhere)."""
    folder = tmp_path_factory.mktemp("base")
    save_builtin(build_tiny_pipeline(seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def pipe(base_dir: Path):
    return load_generator(base_dir)


def run(pipe, out: Path, n: int, prompts: list[str] = PROMPTS, **changes) -> list[dict[str, str]]:
    settings = SETTINGS | changes
    return text_to_image(
        pipe,
        GenerateParams(guidance=settings["guidance"], steps=settings["steps"], batch=settings["batch"]),
        out,
        prompts=prompts,
        count=n,
        seed=7,
        resolution=settings["resolution"],
        subject="canopy",
        fingerprint="test-model",
    )


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `out` (hidden ones too): its bytes and modification time."""
    return {
        p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def contents(out: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _) in snapshot(out).items()}


def test_same_params_give_identical_bytes(pipe, tmp_path: Path) -> None:
    rows = run(pipe, tmp_path / "a", 3)
    run(pipe, tmp_path / "b", 3)
    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert sorted(contents(tmp_path / "a")) == sorted(
        [MANIFEST] + [f"images/canopy_{i:05d}.png" for i in range(3)]
    )
    with (tmp_path / "a" / MANIFEST).open() as f:
        assert list(csv.DictReader(f)) == rows
    assert [r["seed"] for r in rows] == ["7", "8", "9"]
    assert [r["prompt"] for r in rows] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert rows[0]["model"] == "test-model" and rows[0]["resolution"] == "32"
    with Image.open(tmp_path / "a" / "images" / "canopy_00000.png") as image:
        assert image.size == (32, 32)


def test_raising_n_only_adds_and_a_changed_request_remakes(pipe, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(pipe, out, 2)
    first = snapshot(out)
    run(pipe, out, 3)
    grown = snapshot(out)
    for name in ("images/canopy_00000.png", "images/canopy_00001.png"):
        assert grown[name] == first[name]  # same bytes, not even rewritten
    assert "images/canopy_00002.png" in grown
    # An uninterrupted run of 3 gives the same bytes, whatever the history.
    run(pipe, tmp_path / "fresh", 3)
    assert contents(out) == contents(tmp_path / "fresh")

    run(pipe, out, 2, guidance=3.0)
    remade = snapshot(out)
    assert sorted(remade) == ["images/canopy_00000.png", "images/canopy_00001.png", MANIFEST]
    assert remade["images/canopy_00000.png"][0] != first["images/canopy_00000.png"][0]


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs."""


def test_run_stopped_mid_batch_resumes_with_the_same_batches(pipe, tmp_path: Path, monkeypatch) -> None:
    # At 64 px the tiny model's batched kernels round differently for different batches, so a
    # resumed run gives the same bytes only if it redoes the interrupted batch whole (the image
    # written before the stop has no manifest row yet, so it is not kept).
    settings = {"resolution": 64, "batch": 4}
    run(pipe, tmp_path / "uninterrupted", 8, **settings)
    written = []
    real_write = fsio.write_png

    def write_then_die(path: Path, image) -> None:
        real_write(path, image)
        written.append(path.name)
        if len(written) == 5:  # the first image of the second batch
            raise Killed

    monkeypatch.setattr(fsio, "write_png", write_then_die)
    with pytest.raises(Killed):
        run(pipe, tmp_path / "out", 8, **settings)
    monkeypatch.undo()
    run(pipe, tmp_path / "out", 8, **settings)
    assert contents(tmp_path / "out") == contents(tmp_path / "uninterrupted")


def test_a_torn_last_manifest_row_remakes_only_its_image(pipe, tmp_path: Path, caplog) -> None:
    """Rows are appended batch by batch: a kill in the middle of an append leaves the last row
    cut short, and that image alone is made again."""
    out = tmp_path / "out"
    run(pipe, out, 3, batch=1)
    manifest = out / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[: text.rstrip("\n").rindex(",")])  # the last row loses its last field
    with caplog.at_level(logging.INFO, logger="genfusion.jobs"):
        run(pipe, out, 3, batch=1)
    assert "1 images to make, 2 kept" in caplog.text
    run(pipe, tmp_path / "fresh", 3, batch=1)
    assert contents(out) == contents(tmp_path / "fresh")


def test_processes_share_batches_and_match_one_process(
    base_dir: Path, pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks (threads with a real barrier, as under `accelerate launch`) make what one makes.
    (test_processes.py runs real processes; threads keep this one fast.)"""
    barrier = threading.Barrier(2)
    handed: list = [None, None]

    class Rank:
        num_processes = 2

        def __init__(self, index: int) -> None:
            self.process_index, self.is_main_process = index, index == 0

        def wait_for_everyone(self) -> None:
            barrier.wait(timeout=120)

    def gather(state: Rank, rows: list) -> list:
        """torch.distributed.gather_object's contract: every rank's rows on rank 0, in rank order."""
        handed[state.process_index] = rows
        state.wait_for_everyone()
        every = [row for part in handed for row in part] if state.is_main_process else []
        state.wait_for_everyone()
        return every

    monkeypatch.setattr(jobs, "gather_to_main", gather)

    # 64 px: there a different batch gives different bytes (see the test above).

    def rank(index: int, own_pipe) -> None:
        text_to_image(
            own_pipe, GenerateParams(guidance=2.0, steps=2, batch=4), tmp_path / "shared",
            prompts=PROMPTS, count=6, seed=7, resolution=64,
            subject="canopy", fingerprint="test-model", state=Rank(index),
        )  # fmt: skip

    # Each rank has its own model, as each process would (loaded here: loading is not thread-safe).
    threads = [threading.Thread(target=rank, args=(i, load_generator(base_dir))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run(pipe, tmp_path / "single", 6, resolution=64, batch=4)
    assert contents(tmp_path / "shared") == contents(tmp_path / "single")


def tiny_project(root: Path, n: int, batch: int, steps: int) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["diffusion"] = {"resolution": 32}
    # A `genfusion` process computes on params' threads, or on every core it may use: as many as
    # this module's, so that its bytes are the ones this process makes on any machine.
    params["threads"] = TORCH_THREADS
    params["generate"] = {"n": n, "batch": batch, "steps": steps, "prompts": PROMPTS, "seed": 3}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def test_killed_run_resumes_to_the_same_files(base_dir: Path, tmp_path: Path) -> None:
    params = tiny_project(tmp_path, n=8, batch=2, steps=2)
    out = tmp_path / "killed"
    # Killed as soon as the third image (the first of the second batch) is written.
    command = [*killed_genfusion.command("after", "genfusion.fsio.write_png", 3), "generate", "canopy"]
    command += ["--base", str(base_dir), "--real", str(tmp_path), "--out", str(out), "--params", str(params)]
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    made = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(made) == 3, made

    generate_canopy(params, base_dir, tmp_path, out)
    generate_canopy(params, base_dir, tmp_path, tmp_path / "uninterrupted")
    assert contents(out) == contents(tmp_path / "uninterrupted")
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    for image in (out / "images").iterdir():
        with Image.open(image) as decoded:
            decoded.load()  # a truncated PNG fails here


def test_match_real_counts_the_real_train_tiles(base_dir: Path, tmp_path: Path) -> None:
    params = tiny_project(tmp_path, n=0, batch=2, steps=1)
    data = yaml.safe_load(params.read_text())
    data["generate"]["n"] = "match_real"
    params.write_text(yaml.safe_dump(data))
    with pytest.raises(GenfusionError, match="generate.n: match_real, but .* holds no tiles"):
        generate_canopy(params, base_dir, tmp_path / "real", tmp_path / "out")
    (tmp_path / "real" / "images" / "train").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 40)).save(tmp_path / "real" / "images" / "train" / f"{name}.png")
    generate_canopy(params, base_dir, tmp_path / "real", tmp_path / "out")
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3


def test_bad_requests_are_refused_before_any_work(pipe, tmp_path: Path, caplog) -> None:
    with pytest.raises(GenfusionError, match="diffusion.resolution: must be a multiple of 8 .*, got 36"):
        run(pipe, tmp_path / "out", 1, resolution=36)
    with pytest.raises(GenfusionError, match=r"generate.prompts\[1\]: the prompt is empty"):
        run(pipe, tmp_path / "out", 1, prompts=["trees", " "])
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="genfusion.diffusion.pipelines"):
        run(pipe, tmp_path / "out", 1, prompts=["tree crowns " * 20])
    assert "generate.prompts[0]: the prompt is" in caplog.text

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, problem in [
        ({"diffusion": {"resolution": 100}}, "diffusion.resolution: must be a multiple of 8"),
        ({"generate": {"prompts": [""]}}, "generate.prompts.0: String should have at least 1 character"),
        ({"generate": {"n": "all"}}, "generate.n"),
        ({"generate": {"scheduler": "lms"}}, "generate.scheduler"),
    ]:
        with pytest.raises(GenfusionError, match=problem):
            parse_params(params | section)


def test_an_unreadable_manifest_is_an_error_naming_it_and_generate_remakes_its_images(
    pipe, tmp_path: Path
) -> None:
    from genfusion.manifest import read_manifest

    run(pipe, tmp_path / "out", 2)
    manifest = tmp_path / "out" / MANIFEST
    manifest.write_bytes(b"\xff\xfe not a manifest")
    with pytest.raises(GenfusionError, match=f"{manifest}: unreadable manifest"):
        read_manifest(manifest)
    # For the image runner the manifest is only resume state: the images are made again.
    rows = run(pipe, tmp_path / "out", 2)
    assert read_manifest(manifest) == {row["file"]: row for row in rows}


@pytest.mark.parametrize("change", ["dtype", "attention_slicing"])
def test_a_setting_that_changes_pixels_remakes_the_images(
    base_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    """The weights' precision and sliced attention are in the request: images made under other
    ones are not kept (they differ from a fresh render)."""
    out = tmp_path / "out"
    first = run(load_generator(base_dir), out, 2)
    assert {(row["dtype"], row["device"], row["attention_slicing"]) for row in first} == {
        ("float32", "cpu", "False")
    }
    changed = {"dtype": {"dtype": "bfloat16"}, "attention_slicing": {"attention_slicing": True}}[change]
    with caplog.at_level(logging.INFO, logger="genfusion.jobs"):
        again = run(load_generator(base_dir, **changed), out, 2)
    assert "2 images to make, 0 kept" in caplog.text
    assert [row[change] for row in again] == [{"dtype": "bfloat16", "attention_slicing": "True"}[change]] * 2
