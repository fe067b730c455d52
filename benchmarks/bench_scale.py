"""Cost at scale: how the stages that walk generated images grow with their number.

Run from the project root after `dvc repro train@real-0` (needs data/real and the real detector):
    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000 10000 100000] [--work DIR]
For each size N it makes a scratch project (git, DVC, this project's params.yaml with
`train.imgsz: 64`, data/real copied) whose dvc.yaml has three stand-in stages: `generate`
(N images of 64 px for the subject canopy, written by the project's image-job runner with a
drawing in place of the diffusion model), `prelabel` (a box per image, written by the prelabel
stage's writer) and `composite` (N images with their labels, as the made sets are written). It
then runs each step below as its own process under `/usr/bin/time` and prints its wall time and
peak memory (maximum resident set):
- a bare loop saving the same N images with PIL, then the stand-ins: the runner from nothing,
  and again with every image kept (the resume check);
- `genfusion datasets synthetic` and `datasets composite`, also stages of the scratch dvc.yaml;
- `dvc commit` of every stage (DVC hashes and caches 3 N files and hashes 2 N links),
  `dvc status`, a no-op `dvc repro`;
- `genfusion filter composite` (the real detector and the descriptor on every image);
- `genfusion inspect build` (statistics, KID, FiftyOne dataset and Brain);
- `genfusion annotate push --budget 100` twice against a Label Studio server on loopback (the
  second push: a budgeted batch once tasks exist).
The last column is the growth from the previous size: time ratio / size ratio (1.0 is linear);
the last line, the runner's time against the bare loop's at each size.
The report stage is not here: it reads one file per detector, never the generated images.

    .venv/bin/python benchmarks/bench_scale.py brain [--samples 20000 60000 200000]
times FiftyOne Brain's uniqueness and similarity index alone, on random embeddings.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "canopy"
GENERATED, PRELABELS = f"data/generated/{SUBJECT}", f"data/prelabels/{SUBJECT}"
COMPOSITES = "data/composites"
INPUTS = ["--real", "data/real", "--generated", "data/generated", "--prelabels", "data/prelabels"]
INPUTS += ["--annotations", "data/annotations", "--set", f"composite={COMPOSITES}"]
SIDE = 64
BUDGET = 100


# --- the stand-in stages, run by the scratch project's dvc.yaml -------------------------------


def drawing(seed: int):
    """A 64 px picture of a few crowns on ground, different for every seed (small as a PNG)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (SIDE, SIDE), tuple(int(v) for v in rng.integers(60, 140, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(8, SIDE - 8, 2))
        r = int(rng.integers(4, 10))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(20, int(rng.integers(90, 160)), 30))
    return image


def make_images(out: Path, n: int, prefix: str, with_labels: bool) -> None:
    """N images through genfusion.jobs.run_jobs, as generate (no labels) or a made set writes them."""
    from genfusion.jobs import ImageJob, run_jobs

    jobs = []
    for k in range(n):
        file = f"images/{prefix}_{k:06d}.png"
        row = {"file": file, "seed": str(k), "prompt": "an aerial photo of tree crowns"}
        companions = {}
        if with_labels:
            row["label"] = f"labels/{prefix}_{k:06d}.txt"
            companions = {row["label"]: b"0 0.5 0.5 0.25 0.25\n"}
        jobs.append(ImageJob(file, row, k, row["prompt"], companions=companions))
    columns = ["file", "seed", "prompt"] + (["label"] if with_labels else [])
    subdirs = ("images", "labels") if with_labels else ("images",)
    run_jobs(out, jobs, columns, lambda chunk: [drawing(job.seed) for job in chunk], 4, prefix, subdirs)


def make_bare(out: Path, n: int) -> None:
    """The same N images saved by PIL in a bare loop: what the runner adds is the difference."""
    (out / "images").mkdir(parents=True)
    for k in range(n):
        drawing(k).save(out / "images" / f"{SUBJECT}_{k:06d}.png")


def make_prelabels(generated: Path, out: Path) -> None:
    """A box with a score on every generated image, written by the prelabel stage's writer."""
    from genfusion import layout
    from genfusion.boxes import Box
    from genfusion.detection import Labels
    from genfusion.stages.prelabel import write_labels

    stems = [path.stem for path in layout.image_files(generated)]
    found = [
        Labels((Box("tree", 24, 24, 40, 40),), (round(0.3 + 0.6 * (k % 7) / 6, 4),))
        for k in range(len(stems))
    ]
    write_labels(out, stems, found, [(SIDE, SIDE)] * len(stems), ["tree"], "detector")


# --- the scratch project --------------------------------------------------------------------


def stand_ins(n: int) -> dict[str, list[str]]:
    """The command of each stand-in stage, by stage name."""
    me = [sys.executable, str(Path(__file__).resolve()), "make"]
    return {
        "generate": [*me, "images", "--n", str(n), "--out", GENERATED, "--prefix", SUBJECT],
        "prelabel": [*me, "prelabels", "--generated", GENERATED, "--out", PRELABELS],
        "composite": [*me, "images", "--n", str(n), "--out", COMPOSITES, "--prefix", "composite", "--labels"],
    }


def dataset_commands() -> dict[str, list[str]]:
    """The datasets stage of the synthetic variant (generated images, automatic labels) and of
    the composite one (a made set), by stage name: link farms of N images."""
    commands = {}
    for variant in ("synthetic", "composite"):
        commands[f"datasets_{variant}"] = ["genfusion", "datasets", variant, *INPUTS]
        commands[f"datasets_{variant}"] += ["--out", f"data/datasets/{variant}"]
    return commands


def scratch_project(root: Path, n: int) -> None:
    real, weights = ROOT / "data/real", ROOT / "models/detectors/real-0/weights/best.pt"
    if not real.is_dir() or not weights.is_file():
        raise SystemExit("needs data/real and the real detector: run `dvc repro train@real-0` first")
    root.mkdir(parents=True)
    shutil.copytree(real, root / "data/real")
    (root / "models/detectors").mkdir(parents=True)
    shutil.copyfile(weights, root / "models/real.pt")
    for folder in ("data/annotations", "data/filtered"):
        (root / folder).mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["imgsz"] = SIDE  # the images' own size: the detector sees them as they are
    params["subjects"] = {SUBJECT: params["subjects"][SUBJECT]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    made = stand_ins(n)
    stages = {
        "generate": {"cmd": made["generate"], "outs": [{GENERATED: {"persist": True}}]},
        "prelabel": {"cmd": made["prelabel"], "deps": [GENERATED], "outs": [PRELABELS]},
        "composite": {"cmd": made["composite"], "outs": [{COMPOSITES: {"persist": True}}]},
    }
    for name, command in dataset_commands().items():
        stages[name] = {
            "cmd": command,
            "deps": ["data/real", GENERATED, PRELABELS, COMPOSITES],
            "outs": [{command[-1]: {"cache": False}}],
        }
    for stage in stages.values():
        stage["cmd"] = shlex.join(stage["cmd"])
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)


def steps(n: int) -> list[tuple[str, list[str]]]:
    """(name, command) of every measured step, in order."""
    made = stand_ins(n)
    filter_command = ["genfusion", "filter", "composite", "--set", COMPOSITES, "--real", "data/real"]
    filter_command += ["--weights", "models/real.pt", "--out", "data/filtered/composite"]
    inspect_command = ["genfusion", "inspect", "build", *INPUTS, "--filtered", "data/filtered"]
    inspect_command += ["--detectors", "models/detectors", "--metrics", "metrics/distribution.json"]
    inspect_command += ["--figure", "reports/distribution.png"]
    push = ["genfusion", "annotate", "push", "--subject", SUBJECT, "--generated", "data/generated"]
    push += ["--prelabels", "data/prelabels", "--budget", str(BUDGET)]
    datasets = dataset_commands()
    return [
        (
            "bare loop: the same images saved by PIL",
            [*made["generate"][:3], "bare", "--n", str(n), "--out", "data/bare"],
        ),
        ("generate stand-in: runner, from nothing", made["generate"]),
        ("generate stand-in: runner, all kept (resume)", made["generate"]),
        ("prelabel stand-in: writer", made["prelabel"]),
        ("composite stand-in: runner, with labels", made["composite"]),
        ("datasets synthetic", datasets["datasets_synthetic"]),
        ("datasets composite", datasets["datasets_composite"]),
        ("dvc commit (3 N files cached, 2 N links hashed)", ["dvc", "commit", "-f"]),
        ("dvc status", ["dvc", "status"]),
        ("dvc repro, nothing to do", ["dvc", "repro"]),
        ("filter composite", filter_command),
        ("inspect build", inspect_command),
        (f"annotate push --budget {BUDGET}, first", push),
        (f"annotate push --budget {BUDGET}, next batch", push),
    ]


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of the command; its output goes to `log`."""
    usage = log.with_suffix(".time")
    with log.open("w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(usage), *command],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=out,
        )
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(command)} failed in {cwd} (rc {done.returncode}):\n{tail}")
    seconds, kib = usage.read_text().split()[-2:]
    return float(seconds), int(kib) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(n: int, root: Path) -> dict[str, tuple[float, float]]:
    from genfusion.integrations import label_studio as ls

    scratch_project(root, n)
    (root / "logs").mkdir()
    token, port = secrets.token_hex(20), free_port()
    account = {ls.USER_VAR: "bench@example.org", ls.PASSWORD_VAR: secrets.token_hex(8), ls.TOKEN_VAR: token}
    env = os.environ | {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", ls.URL_VAR: f"http://127.0.0.1:{port}"}
    env |= {ls.TOKEN_VAR: token, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server_env = ls.server_env(root / "labelstudio-home", root, account)
    server = ls.start_server(
        ls.server_executable(ROOT / ".labelstudio"), port, server_env, root / "logs/ls.log"
    )
    figures = {}
    try:
        for k, (name, command) in enumerate(steps(n)):
            log = root / "logs" / f"{k:02d}.log"
            figures[name] = timed(command, root, env, log)
            idle = command[:2] in (["dvc", "status"], ["dvc", "repro"])
            if idle and "up to date" not in log.read_text():
                raise SystemExit(f"{shlex.join(command)} found work to do at N={n}: see {log}")
            print(f"  {n:>7}  {name}: {figures[name][0]:.1f} s, {figures[name][1]:.0f} MiB", flush=True)
    finally:
        ls.stop_server(server)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one in the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    results = {}
    try:
        for n in args.sizes:
            results[n] = measure(n, work / f"n{n}")
            if not args.keep:
                shutil.rmtree(work / f"n{n}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sizes = list(results)
    print(f"\n{SIDE} px images, 2 CPU cores; seconds / peak MiB per size; growth = time ratio / size ratio")
    print("| step | " + " | ".join(f"{n:,}" for n in sizes) + " | growth |")
    print("|---" * (len(sizes) + 2) + "|")
    for name in results[sizes[0]]:
        cells = [f"{results[n][name][0]:.1f} s / {results[n][name][1]:.0f}" for n in sizes]
        growth = ""
        if len(sizes) > 1:
            (a, b), (ta, tb) = sizes[-2:], (results[sizes[-2]][name][0], results[sizes[-1]][name][0])
            growth = f"{(tb / ta) / (b / a):.2f}" if ta > 0 else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
    runner, bare = "generate stand-in: runner, from nothing", "bare loop: the same images saved by PIL"
    ratios = ", ".join(f"{results[n][runner][0] / results[n][bare][0]:.2f} at {n:,}" for n in sizes)
    print(f"runner from nothing / bare loop (time): {ratios}")


def brain_main(argv: list[str]) -> None:
    """FiftyOne Brain alone, on N samples with random embeddings of the descriptor's size (208):
    the uniqueness and similarity runs `inspect` makes, timed apart from the rest of the stage."""
    parser = argparse.ArgumentParser(prog="bench_scale.py brain")
    parser.add_argument("--samples", type=int, nargs="+", default=[20000, 60000, 200000])
    args = parser.parse_args(argv)
    import time

    import numpy as np

    from genfusion.integrations.fiftyone import connect, use_database

    scratch = Path(tempfile.mkdtemp(prefix="bench-brain-"))
    # Registered before FiftyOne is imported, so it runs after FiftyOne's own exit handlers
    # have stopped the database that lives in this folder.
    atexit.register(shutil.rmtree, scratch, True)
    use_database(scratch / "db")
    connect()
    import fiftyone as fo
    import fiftyone.brain as fob

    for n in args.samples:
        embeddings = np.random.default_rng(0).random((n, 208))
        dataset = fo.Dataset(f"brain-{n}")
        dataset.add_samples([fo.Sample(filepath=f"/bench/{k}.png") for k in range(n)])
        start = time.perf_counter()
        fob.compute_uniqueness(dataset, embeddings=embeddings)
        uniqueness = time.perf_counter() - start
        start = time.perf_counter()
        fob.compute_similarity(dataset, embeddings=embeddings, backend="sklearn", brain_key="sim")
        similarity = time.perf_counter() - start
        print(f"{n:>7} samples: compute_uniqueness {uniqueness:.1f} s, compute_similarity {similarity:.1f} s")
        dataset.delete()


def make_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_scale.py make")
    parser.add_argument("what", choices=["images", "bare", "prelabels"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prefix", default=SUBJECT)
    parser.add_argument("--labels", action="store_true")
    parser.add_argument("--generated", type=Path)
    args = parser.parse_args(argv)
    if args.what == "images":
        make_images(args.out, args.n, args.prefix, args.labels)
    elif args.what == "bare":
        make_bare(args.out, args.n)
    else:
        make_prelabels(args.generated, args.out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make_main(sys.argv[2:])
    elif sys.argv[1:2] == ["brain"]:
        brain_main(sys.argv[2:])
    else:
        main()
