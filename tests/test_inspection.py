"""The inspect stage on tiny real data, with FiftyOne's own database in a temp folder, and the
FiftyOne App checked in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from headless_browser import Page
from PIL import Image
from project import ROOT, not_installed

from genfusion import distribution
from genfusion.boxes import Box
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.params import load_params
from genfusion.stages import prelabel
from genfusion.stages.seeds import run_seeds

FIXTURE = ROOT / "tests" / "data" / "seg-trees" / "annotations.json"
CLI = [sys.executable, "-c", "from genfusion.cli import main; main()"]


def rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_identical_sets_are_at_distance_zero_and_a_recoloured_set_moves_away(monkeypatch) -> None:
    # 48 crops of the real fixture tiles, and the same crops with more red.
    rng = np.random.default_rng(0)
    tiles = [rgb_of(p) for p in sorted(FIXTURE.parent.glob("*.png"))]
    crops = []
    for k in range(48):
        y, x = rng.integers(0, 80, 2)
        crops.append(tiles[k % len(tiles)][y : y + 48, x : x + 48])

    def redder(amount: int) -> list[np.ndarray]:
        return [np.clip(c.astype(int) + [amount, 0, 0], 0, 255).astype(np.uint8) for c in crops]

    stats = [distribution.image_stats(c) for c in crops]
    assert distribution.colour_distance(stats, stats) == {"r": 0.0, "g": 0.0, "b": 0.0}
    moved = distribution.colour_distance(stats, [distribution.image_stats(c) for c in redder(40)])
    assert 35 < moved["r"] <= 40 and moved["g"] == moved["b"] == 0.0  # values near 255 are clipped
    same = np.stack([distribution.descriptor(c) for c in crops])
    floor = abs(distribution.kid(same, same.copy()))  # the unbiased estimate's floor for one set
    little, more = (
        distribution.kid(same, np.stack([distribution.descriptor(c) for c in redder(a)])) for a in (10, 40)
    )
    assert more > little > 0 and more > 10 * floor
    # A set larger than the subset size: the mean over subsets estimates the same distance.
    by_subsets = distribution.kid(same, np.stack([distribution.descriptor(c) for c in redder(40)]), 24, 200)
    assert by_subsets == pytest.approx(more, rel=0.2) and by_subsets > 10 * floor
    # Near-duplicates are looked for a block of queries at a time; blocks change no answer
    # (beyond the last bits of rounding: a matrix product sums in another order).
    whole = distribution.nearest(stats, stats[:5])
    assert list(whole[0][:5]) == [0, 1, 2, 3, 4] and whole[1][:5] == pytest.approx(1.0)
    monkeypatch.setattr(distribution, "NEAREST_BLOCK", 7)
    blocked = distribution.nearest(stats, stats[:5])
    assert (blocked[0] == whole[0]).all() and blocked[1] == pytest.approx(whole[1], rel=1e-12)
    assert distribution.values_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert distribution.values_distance([0, 0], [1, 3]) == pytest.approx(2.0)  # mean shift of 2


def inspect_project(root: Path) -> Path:
    """Real tiles from the segmentation fixture, a subject of generated images (two of them
    planted copies: of a train tile and of a test tile), variations, and params, in `root`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seeds"].update(
        source=str(FIXTURE), tile_size=128, split={"train": 0.5, "val": 0.25, "test": 0.25}
    )
    params["inspect"]["database_dir"] = str(root / "fiftyone-db")
    params["inspect"]["dataset"] = "genfusion-test"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(FIXTURE), loaded.seeds, loaded.classes, root / "data/real")
    train = sorted((root / "data/real/images/train").glob("*.png"))
    test = sorted((root / "data/real/images/test").glob("*.png"))
    images = root / "data/generated/canopy/images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            images / f"canopy_{k:05d}.png"
        )
    shutil.copy(train[0], images / "canopy_00004.png")  # memorised
    shutil.copy(test[0], images / "canopy_00005.png")  # leaked
    stems = sorted(p.stem for p in images.glob("*.png"))
    sizes = [Image.open(images / f"{s}.png").size for s in stems]
    found = [prelabel.Labels((Box("tree", 2, 2, 20, 20),), (0.9,))] * len(stems)
    prelabel.write_labels(root / "data/prelabels/canopy", stems, found, sizes, ["tree"], "detector")
    (root / "data/variations/images").mkdir(parents=True)
    (root / "data/variations/labels").mkdir(parents=True)
    for tile in train[:2]:
        Image.fromarray(255 - rgb_of(tile)).save(root / f"data/variations/images/{tile.stem}_v0.png")
        shutil.copy(
            root / f"data/real/labels/train/{tile.stem}.txt",
            root / f"data/variations/labels/{tile.stem}_v0.txt",
        )
    # Two composites, and the quality filter's verdict on them: one kept, one dropped.
    composites = root / "data/composites"
    (composites / "images").mkdir(parents=True)
    (composites / "labels").mkdir(parents=True)
    verdicts = ["file,label,agreement,realism,clip,score,rank,kept"]
    for rank, (tile, kept) in enumerate(zip(train[2:4], ("true", "false"), strict=True), 1):
        shutil.copy(tile, composites / f"images/{tile.stem}_c0.png")
        shutil.copy(
            root / f"data/real/labels/train/{tile.stem}.txt", composites / f"labels/{tile.stem}_c0.txt"
        )
        verdicts.append(
            f"images/{tile.stem}_c0.png,labels/{tile.stem}_c0.txt,0.5,-0.1,,{1 / rank},{rank},{kept}"
        )
    filter_set(root / "data/filtered/composite", "data/composites", verdicts)
    # Two inpainted images of the subject, on train tiles; the filter kept one, under another
    # set name: its summary says which folder it ranked.
    inpainted = root / "data/inpainted/canopy"
    (inpainted / "images").mkdir(parents=True)
    (inpainted / "labels").mkdir(parents=True)
    rows = ["file,label,background"]
    verdicts = ["file,label,agreement,realism,clip,score,rank,kept"]
    for tile in train[:2]:
        Image.fromarray(rgb_of(tile) // 2).save(inpainted / f"images/{tile.stem}_i0.png")
        shutil.copy(
            root / f"data/real/labels/train/{tile.stem}.txt", inpainted / f"labels/{tile.stem}_i0.txt"
        )
        rows.append(f"images/{tile.stem}_i0.png,labels/{tile.stem}_i0.txt,data/real/images/train/{tile.name}")
    verdicts.append(f"images/{train[0].stem}_i0.png,labels/{train[0].stem}_i0.txt,0.5,-0.1,,1.0,1,true")
    (inpainted / "manifest.csv").write_text("\n".join(rows) + "\n")
    filter_set(root / "data/filtered/painted", "data/inpainted/canopy", verdicts)
    return root


def filter_set(out: Path, ranked: str, verdicts: list[str]) -> None:
    """The quality filter's output for the set in folder `ranked`: its verdicts and summary."""
    out.mkdir(parents=True)
    (out / "manifest.csv").write_text("\n".join(verdicts) + "\n")
    (out / "summary.json").write_text(json.dumps({"set": ranked, "n": len(verdicts) - 1}))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inspect stage's inputs, not built: tests that build it take `built` or their own."""
    return inspect_project(tmp_path_factory.mktemp("inspect"))


# The inspect stage's folders, as dvc.yaml passes them.
FOLDERS = [
    *("--real", "data/real", "--generated", "data/generated", "--prelabels", "data/prelabels"),
    *("--annotations", "data/annotations", "--set", "variations=data/variations"),
    *("--set", "composite=data/composites", "--set", "inpaint=data/inpainted"),
    *("--filtered", "data/filtered", "--detectors", "models/detectors"),
]
BUILD = [
    *CLI,
    "inspect",
    "build",
    *FOLDERS,
    "--figure",
    "reports/distribution.png",
    "--params",
    "params.yaml",
]


def build(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The stage, in its own process: FiftyOne's database settings are per process."""
    return subprocess.run(
        [*BUILD, "--metrics", "metrics/distribution.json"],
        cwd=root,
        capture_output=True,
        text=True,
        env=None if env is None else os.environ | env,
    )


def fiftyone_summary(root: Path) -> dict:
    # Connected as the stage connects: plain FiftyOne attaches to any of its database services
    # running on the machine (another test's, on the other worker), which lacks this dataset.
    code = (
        "import json, sys; from pathlib import Path;"
        "from genfusion.integrations.fiftyone import connect, use_database;"
        "use_database(Path(sys.argv[1])); connect(); import fiftyone as fo;"
        "d = fo.load_dataset('genfusion-test');"
        "print(json.dumps({'count': d.count_values('source'), 'tags': d.count_sample_tags(),"
        " 'fields': sorted(d.get_field_schema()), 'files': sorted(d.values('filepath')),"
        " 'views': d.list_saved_views(), 'brain': d.list_brain_runs(),"
        " 'kept': d.count_values('filter_kept')}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    done = subprocess.run(
        [sys.executable, "-c", code, str(root / "fiftyone-db")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project the inspect stage has built (its FiftyOne dataset, metrics and figure): read it
    only."""
    root = inspect_project(tmp_path_factory.mktemp("inspect-built"))
    done = build(root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.integration
def test_inspect_builds_metrics_and_a_fiftyone_dataset(built: Path) -> None:
    project = built
    metrics = json.loads((project / "metrics/distribution.json").read_text())
    assert metrics["real"]["images"] == {"train": 4, "val": 2, "test": 2}
    generated = metrics["sets"]["generated/canopy"]
    # One planted copy of a train tile and one of a test tile among six images.
    assert generated["memorisation"]["share"] == pytest.approx(1 / 6)
    assert generated["leakage"]["share"] == pytest.approx(1 / 6)
    # Variations are near-copies of train tiles by design: only leakage is checked for them.
    assert metrics["sets"]["variations"]["memorisation"] is None
    # So are inpainted images, painted onto the train tiles.
    assert metrics["sets"]["inpainted/canopy"]["images"] == 2
    assert metrics["sets"]["inpainted/canopy"]["memorisation"] is None
    assert metrics["sets"]["variations"]["leakage"]["share"] == 0
    assert (project / "reports/distribution.png").stat().st_size > 10_000

    summary = fiftyone_summary(project)
    assert summary["count"] == {"real": 8, "generated": 6, "variation": 2, "composite": 2, "inpaint": 2}
    assert summary["tags"] == {"memorised": 1, "leaked": 1}
    expected = {"source", "subject", "split", "scene", "prompt", "seed", "ground_truth", "auto_labels"}
    assert expected | {"people_labels", "embedding", "uniqueness", "copy_of_train", "copy_of_test"} <= set(
        summary["fields"]
    )
    views = {
        "real-vs-synthetic",
        "most-unique-synthetic",
        "suspected-copies",
        "filter-dropped",
        "filter-kept",
    }
    assert views <= set(summary["views"])
    # The filter's verdicts: on the composites one kept, one dropped; on the inpainted images
    # one kept (the other not in its manifest); the rest (not filtered) none.
    assert summary["kept"] == {"true": 2, "false": 1, "null": 17}
    assert {"genfusion_pca", "genfusion_similarity"} <= set(summary["brain"])


@pytest.mark.integration
def test_a_rebuild_adds_no_duplicates_and_drops_a_removed_image(tmp_path: Path) -> None:
    """Again: the same metrics, no duplicate samples. Then an image disappears: so does its sample."""
    project = inspect_project(tmp_path)
    assert build(project).returncode == 0
    first = (project / "metrics/distribution.json").read_bytes()
    assert build(project).returncode == 0
    assert (project / "metrics/distribution.json").read_bytes() == first
    assert fiftyone_summary(project)["count"] == {
        "real": 8,
        "generated": 6,
        "variation": 2,
        "composite": 2,
        "inpaint": 2,
    }
    gone = project / "data/generated/canopy/images/canopy_00000.png"
    gone.unlink()
    assert build(project).returncode == 0
    after = fiftyone_summary(project)
    assert after["count"]["generated"] == 5 and str(gone) not in after["files"]


SYNC_IN_BATCHES = """
import json, sys
from pathlib import Path
from PIL import Image
from genfusion.boxes import Box
from genfusion.integrations.fiftyone import connect, use_database
from genfusion.stages import inspect as inspection

root = Path(sys.argv[1])
use_database(root / "db")
connect()
inspection.FIELD_BATCH = 2
items = []
for k in range(5):
    path = root / f"image_{k}.png"
    Image.new("RGB", (32, 32), (k, 0, 0)).save(path)
    auto = [Box("tree", 1, 1, 9, 9)] * k
    items.append(inspection.Item(path, "generated", "generated/a", subject="a", seed=k, auto=auto))
dataset = inspection.sync_dataset("batches", items)
rows = zip(dataset.values("filepath"), dataset.values("seed"), dataset.values("auto_labels.detections"))
print(json.dumps({Path(p).name: [seed, len(found)] for p, seed, found in rows}))
"""


@pytest.mark.integration
def test_fields_are_set_a_batch_of_samples_at_a_time(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    done = subprocess.run(
        [sys.executable, "-c", SYNC_IN_BATCHES, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    assert fields == {f"image_{k}.png": [k, k] for k in range(5)}


@pytest.mark.integration
def test_a_database_port_inherited_from_a_parent_process_is_not_used(project: Path, tmp_path: Path) -> None:
    """FiftyOne connects to the port a parent process's FiftyOne left in the environment: here
    nothing listens there, and the stage starts the project's own database instead."""
    root = tmp_path / "inherited-port"
    shutil.copytree(project / "data/real", root / "data/real")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["inspect"]["database_dir"] = str(tmp_path / "db")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    done = build(root, {"FIFTYONE_PRIVATE_DATABASE_PORT": str(closed)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "db/log/mongo.log").is_file()


@pytest.mark.integration
def test_without_synthetic_images_the_real_side_is_reported(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "real-only"
    shutil.copytree(project / "data/real", root / "data/real")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["inspect"]["database_dir"] = str(tmp_path / "db")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    done = build(root)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((root / "metrics/distribution.json").read_text())
    assert metrics["sets"] == {} and metrics["real"]["images"]["train"] == 4
    assert any("generated/canopy: no images yet" in line for line in metrics["missing"])


@pytest.mark.integration
def test_a_database_that_cannot_start_is_a_clear_error(project: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database folder should be\n")
    env = os.environ | {"FIFTYONE_DATABASE_DIR": str(blocker)}
    done = subprocess.run(
        [*BUILD, "--metrics", str(tmp_path / "m.json")],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert "FiftyOne's database did not start" in done.stderr and "Fix:" in done.stderr
    assert not (tmp_path / "m.json").exists()


def chromium() -> str:
    """Chromium, which `make test` installs from Debian's packages."""
    return shutil.which("chromium") or not_installed("Chromium (apt-get install chromium)")


@pytest.mark.integration
def test_the_app_shows_the_dataset_in_a_real_browser(built: Path, tmp_path: Path) -> None:
    browser = chromium()
    project = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The App's log goes to a file: a pipe nobody reads fills up and stalls the server.
    log = tmp_path / "app.log"
    with log.open("w") as output:
        app = subprocess.Popen(
            [*CLI, "inspect", "app", "--params", "params.yaml", "--port", str(port)],
            cwd=project,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    texts = ("genfusion-test", "ground_truth", "auto_labels")
    shot = tmp_path / "app.png"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert app.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the App did not answer within 240 s"
            try:
                if requests.get(f"http://127.0.0.1:{port}", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)

        # The dataset is open once its name and its label fields are on the page (the sidebar
        # lists them once the samples are loaded) and the loading screen ("Pixelating...") is
        # gone. A loaded machine takes longer: the page is asked in real time, then shot.
        def loaded(page: Page) -> bool:
            html = page.html()
            return all(text in html for text in texts) and "Pixelating" not in page.text()

        with Page(browser, tmp_path / "chromium") as page:
            page.open(f"http://127.0.0.1:{port}/datasets/genfusion-test")
            page.wait_until(loaded, seconds=180)
            dom, seen = page.html(), page.text()
            # A page still painting is one colour: shoot again, a few times, before failing.
            for _ in range(10):
                page.screenshot(shot)
                if rgb_of(shot).std() > 10:
                    break
                time.sleep(2)
    finally:
        os.killpg(app.pid, 15)
        app.wait(timeout=60)
    for text in texts:
        assert text in dom, f"{text} is not on the page; it shows: {seen[:2000]}"
    # Each message once: FiftyOne's loggers print through their own handler only, not also
    # through the command's (which would add each again, prefixed with its level).
    # (Rich wraps its lines at 80 columns: compared with whitespace collapsed.)
    said = log.read_text()
    joined = " ".join(said.split())
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    plain = [
        " ".join(line.split())
        for line in said.splitlines()
        if line[:1].isalpha() and not line.startswith(levels)
    ]
    twice = [line for line in plain if len(line) > 20 and joined.count(line) > 1]
    assert plain and not twice, said
    # The screenshot shows more than a blank page.
    pixels = rgb_of(shot)
    assert pixels.std() > 10, f"a blank page ({shot}); it shows: {seen[:2000]}"


def test_clip_embedding_loads_a_locally_saved_checkpoint(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from genfusion.stages.inspect import clip_embedder

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    embed = clip_embedder(str(tmp_path / "clip"))
    tile = rgb_of(sorted(FIXTURE.parent.glob("*.png"))[0])
    vector = embed(tile)
    assert vector.shape == (8,) and np.linalg.norm(vector) == pytest.approx(1.0)
    assert not np.allclose(vector, embed(255 - tile))
    with pytest.raises(GenfusionError, match="inspect.clip_model: cannot load 'no/such-model'"):
        clip_embedder("no/such-model")


def test_generated_images_carry_the_labels_that_labels_source_chooses(tmp_path: Path) -> None:
    """The distribution metrics describe the labels the detectors train on: people's ones only
    where `labels.source` asks for them."""
    from genfusion.layout import Sources
    from genfusion.stages.inspect import collect

    folders = ("real", "generated", "prelabels", "annotations")
    sources = Sources(
        **{name: tmp_path / name for name in folders}, sets={"variations": tmp_path / "variations"}
    )
    (sources.real / "images/train").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(sources.real / "images/train/tile.png")
    (sources.generated / "canopy/images").mkdir(parents=True)
    (sources.prelabels / "canopy/labels").mkdir(parents=True)
    for stem in ("canopy_00000", "canopy_00001"):
        Image.new("RGB", (32, 32)).save(sources.generated / f"canopy/images/{stem}.png")
        # The prelabel stage found one tree on every image.
        (sources.prelabels / f"canopy/labels/{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    # People drew two trees on the first image and labelled no other.
    (sources.annotations / "canopy/labels").mkdir(parents=True)
    (sources.annotations / "canopy/labels/canopy_00000.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n"
    )
    counts = {}
    for label_source in ("auto", "manual", "manual_else_auto"):
        items, _ = collect(sources, ["canopy"], ["tree"], label_source)
        generated = {i.path.stem: len(i.labels) for i in items if i.source == "generated"}
        counts[label_source] = (generated["canopy_00000"], generated["canopy_00001"])
    assert counts == {"auto": (1, 1), "manual": (2, 0), "manual_else_auto": (2, 1)}


# A process that makes a dataset in the database folder argv[1] and, with argv[3] = "hold", keeps
# FiftyOne's database service running until its stdin closes.
DATASET_IN_FOLDER = """
import sys
from pathlib import Path
from genfusion.integrations.fiftyone import connect, use_database

use_database(Path(sys.argv[1]))
connect()
import fiftyone as fo

fo.Dataset(sys.argv[2], persistent=True)
print(sorted(fo.list_datasets()), flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()
"""


@pytest.mark.integration
def test_a_project_gets_its_own_database_while_another_projects_runs(tmp_path: Path) -> None:
    """FiftyOne attaches to any of its database services already running on the machine: with
    another project's App or stage running, a dataset would land in that project's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    command = [sys.executable, "-c", DATASET_IN_FOLDER]
    other = subprocess.Popen(
        [*command, str(tmp_path / "other"), "theirs", "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert other.stdout.readline().strip() == "['theirs']"  # its service is up
        mine = subprocess.run(
            [*command, str(tmp_path / "mine"), "ours", "done"], capture_output=True, text=True, env=env
        )
        assert mine.returncode == 0, mine.stderr[-2000:]
        assert mine.stdout.strip().splitlines()[-1] == "['ours']"  # not ['ours', 'theirs']
    finally:
        other.stdin.close()
        other.wait(timeout=120)
