"""dvc.yaml declares what each stage reads: every stage's command runs under `dependency_trace` in
the tiny pipeline's `dvc repro` (tests/tiny_pipeline.py), and each params key, pipeline file and
genfusion module it read must be declared.

An undeclared read means `dvc repro` does not rerun the stage when that input changes, and serves a
stale output as up to date.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from dvc.stage import PipelineStage
from tiny_pipeline import TinyRun

from genfusion import variants
from genfusion.params import load_params

ROOT = Path(__file__).resolve().parents[1]

# Infrastructure that every stage imports: the command line, how it starts (threads, torchrun),
# params parsing, errors, progress bars and atomic writes. None of it decides what a stage computes
# (params values are checked as keys), and declaring it would rerun the whole pipeline on any edit
# of the command line's help text.
SHARED_MODULES = (
    "src/genfusion/cli.py",
    "src/genfusion/launch.py",
    "src/genfusion/params.py",
    "src/genfusion/errors.py",
    "src/genfusion/progress.py",
    "src/genfusion/fsio.py",
)
# The variant registry: params.py checks the names params.yaml gives against it, so every stage
# imports it. It decides what these stages compute (which images a variant trains on, which sets
# FiftyOne shows), and they must declare it.
REGISTRY = "src/genfusion/variants.py"
REGISTRY_READERS = ("real_dataset", "datasets", "filter", "inspect")
# Params every stage reads that choose how it runs, not what it computes: `threads` sizes the
# thread pools, and declaring it would rerun the whole pipeline when the machine's load changes
# (params.yaml says so beside it).
SHARED_PARAMS = ("threads",)
# Package __init__.py files (src/genfusion/__init__.py, any subpackage's) only make the package.
PACKAGE_INIT = "__init__.py"


def within(item: str, container: str, separator: str) -> bool:
    """`item` is `container` or inside it: a folder holds its files, a params key its sub-keys."""
    return item == container or item.startswith(container + separator)


def covered(path: str, declared: Iterable[str]) -> bool:
    return any(within(path, d, "/") for d in declared)


def key_covered(key: str, declared: Iterable[str]) -> bool:
    return any(within(key, d, ".") for d in declared)


def shared(module: str, stage: str) -> bool:
    """`module` is infrastructure that `stage` (a name such as datasets@composite) need not declare."""
    if module == REGISTRY:
        return stage.split("@")[0] not in REGISTRY_READERS
    return module in SHARED_MODULES or module.rsplit("/", 1)[-1] == PACKAGE_INIT


def grouped(paths: list[str], depth: int = 3) -> dict[str, list[str]]:
    """Paths by their first `depth` parts (data/datasets/real), so that a folder of images read
    without being declared is one finding, not one per image."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault("/".join(path.split("/")[:depth]), []).append(path)
    return groups


def undeclared(trace: dict, stage: dict) -> list[str]:
    """What the stage read (`trace`, from dependency_trace) that its declaration (`stage`: name,
    params, deps, outs) lacks, one message each."""
    name, params = stage["name"], stage["params"]
    found = [
        f"{name}: reads param {key}, not declared"
        for key in trace["params"]
        if not key_covered(key, params) and key not in SHARED_PARAMS
    ]
    found += [
        f"{name}: reads the names in param {key}, not declared"
        for key in trace["param_names"]
        # The names are declared with the mapping, or with any entry of it (subjects.canopy).
        if not any(within(d, key, ".") for d in params)
    ]
    # A stage may read back what it writes; writes are recorded too, so they must be outs.
    missing = [path for path in trace["paths"] if not covered(path, stage["deps"] + stage["outs"])]
    for folder, paths in grouped(missing).items():
        more = f" and {len(paths) - 1} more under {folder}/" if len(paths) > 1 else ""
        found.append(f"{name}: reads {paths[0]}{more}, not declared")
    found += [
        f"{name}: imports {module}, not declared"
        for module in trace["modules"]
        if not shared(module, name) and not covered(module, stage["deps"])
    ]
    return found


def read_in_some_cases(stage: str) -> tuple[str, ...]:
    """Params `stage` declares and reads only for some matrix items or settings: DVC has no
    conditional dependencies, so the declaration covers every case."""
    base, _, item = stage.partition("@")
    # The variants made from generated images (or a set per subject) read what chooses them.
    if base == "datasets" and not variants.REGISTRY[item].reads_subjects:
        return ("subjects", "labels", "datasets")
    # With prelabel.method: attention, generate keeps the attention maps these choose.
    if base == "generate":
        return ("prelabel.blocks", "prelabel.map_size", "prelabel.steps")
    return ()


def never_read(trace: dict, stage: dict) -> list[str]:
    """Declared params keys the stage did not read, but those it reads in other cases: a stale
    declaration reruns the stage for nothing."""
    read = trace["params"] + trace["param_names"]
    return [
        f"{stage['name']}: declares param {key}, never read"
        for key in stage["params"]
        if not any(within(r, key, ".") or within(key, r, ".") for r in read)
        and key not in read_in_some_cases(stage["name"])
    ]


def declarations(repo: Path) -> list[dict]:
    """Every dvc.yaml stage as DVC resolves it (foreach, matrix, ${...} filled in), each after the
    stages it depends on."""
    with Repo(str(repo)) as dvc:
        # Edges go from a stage to the stages it depends on.
        order = reversed(list(nx.topological_sort(dvc.index.graph)))
        return [declaration(stage, dvc.root_dir) for stage in order if stage.cmd]


def declaration(stage: PipelineStage, root: str) -> dict:
    def relative(paths) -> list[str]:
        return [Path(os.path.relpath(p.fs_path, root)).as_posix() for p in paths]

    params = [key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params]
    files = [dep for dep in stage.deps if not isinstance(dep, ParamsDependency)]
    return {
        "name": stage.name,
        "cmd": stage.cmd,
        "params": params,
        "deps": relative(files),
        "outs": relative(stage.outs),
    }


@pytest.fixture(scope="module")
def traced(tiny_run: TinyRun) -> list[tuple[dict, dict]]:
    """(declaration, trace) of every stage of the tiny pipeline, whose `dvc repro` ran each stage's
    command under dependency_trace (tests/tiny_pipeline.py)."""
    stages = declarations(tiny_run.repo)
    untraced = [s["name"] for s in stages if not (tiny_run.traces / f"{s['name']}.json").is_file()]
    assert not untraced, f"the tiny pipeline ran these stages without the tracer: {untraced}"
    return [(s, json.loads((tiny_run.traces / f"{s['name']}.json").read_text())) for s in stages]


@pytest.mark.integration
def test_every_stage_declares_what_it_reads(traced: list[tuple[dict, dict]]) -> None:
    assert {stage["name"] for stage, _ in traced} >= {"seeds", "report", "evaluate@real-0"}
    # A tracer that saw nothing would pass every stage.
    blind = [
        s["name"] for s, t in traced if not t["paths"] or all(shared(m, s["name"]) for m in t["modules"])
    ]
    assert not blind, f"no data read or no stage module imported seen in {blind}"
    found = [message for stage, trace in traced for message in undeclared(trace, stage)]
    assert not found, "read but not declared in dvc.yaml:\n" + "\n".join(found)
    stale = [message for stage, trace in traced for message in never_read(trace, stage)]
    assert not stale, "declared in dvc.yaml but never read:\n" + "\n".join(stale)


@pytest.mark.integration
def test_a_read_left_out_of_the_declaration_is_named(traced: list[tuple[dict, dict]]) -> None:
    stage, trace = next((s, t) for s, t in traced if s["name"] == "report")
    modules = [dep for dep in stage["deps"] if dep.startswith("src/") and dep in trace["modules"]]
    assert modules and "data/scenes" in stage["deps"] and "report" in stage["params"]
    reduced = stage | {
        "params": [key for key in stage["params"] if key != "report"],
        "deps": [dep for dep in stage["deps"] if dep != "data/scenes" and dep not in modules],
    }
    planted = set(undeclared(trace, reduced)) - set(undeclared(trace, stage))
    assert "report: reads param report.conf, not declared" in planted
    assert any(m.startswith("report: reads data/scenes/") for m in planted), planted
    assert {f"report: imports {module}, not declared" for module in modules} <= planted


STAGE = {
    "name": "evaluate@real-0",
    "params": ["train.imgsz", "evaluate", "subjects.canopy"],
    "deps": ["data/real", "models/detectors/real-0", "src/genfusion/evaluate.py"],
    "outs": ["metrics/eval/real-0.json"],
}


def test_undeclared_names_the_stage_and_each_read_it_lacks() -> None:
    trace = {
        "params": ["evaluate.conf", "train.imgsz", "train.batch", "train"],
        "param_names": ["subjects", "labels"],
        "paths": [
            "data/real/images/test/a.png",
            "metrics/eval/real-0.json",
            "data/datasets/real/dataset.yaml",
            "data/datasets/real/counts.json",
            "models/detectors/real-1/weights/best.pt",
        ],
        "modules": [
            "src/genfusion/__init__.py",
            "src/genfusion/stages/__init__.py",
            "src/genfusion/cli.py",
            "src/genfusion/evaluate.py",
            "src/genfusion/yolo.py",
        ],
    }
    assert undeclared(trace, STAGE) == [
        "evaluate@real-0: reads param train.batch, not declared",
        "evaluate@real-0: reads param train, not declared",
        "evaluate@real-0: reads the names in param labels, not declared",
        "evaluate@real-0: reads data/datasets/real/dataset.yaml and 1 more under data/datasets/real/,"
        " not declared",
        "evaluate@real-0: reads models/detectors/real-1/weights/best.pt, not declared",
        "evaluate@real-0: imports src/genfusion/yolo.py, not declared",
    ]


def test_never_read_lists_declared_keys_no_read_touches() -> None:
    trace = {"params": ["evaluate.conf"], "param_names": ["subjects"], "paths": [], "modules": []}
    assert never_read(trace, STAGE) == ["evaluate@real-0: declares param train.imgsz, never read"]


def test_params_a_variant_does_not_read_are_stale_only_where_the_registry_says_it_reads_them() -> None:
    declared = {"params": ["task", "subjects", "labels", "datasets"], "deps": [], "outs": []}
    trace = {"params": ["task"], "param_names": [], "paths": [], "modules": []}
    assert never_read(trace, declared | {"name": "datasets@composite"}) == []
    assert never_read(trace, declared | {"name": "datasets@mixed"}) == [
        f"datasets@mixed: declares param {key}, never read" for key in ("subjects", "labels", "datasets")
    ]


def test_the_registry_is_declared_by_the_stages_it_decides_only() -> None:
    trace = {"params": [], "param_names": [], "paths": [], "modules": [REGISTRY]}
    stage = {"params": [], "deps": [], "outs": []}
    assert undeclared(trace, stage | {"name": "train@real-0"}) == []
    assert undeclared(trace, stage | {"name": "datasets@inpaint"}) == [
        f"datasets@inpaint: imports {REGISTRY}, not declared"
    ]


def test_the_artifacts_are_the_default_runs_detectors() -> None:
    """dvc.yaml's rule: every row of the report at the first seed, and the ONNX export of each
    synthetic variant trained, so a change of the default run's variants fails here until the
    artifacts follow."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    train = load_params(ROOT / "params.yaml").train
    seed = train.seeds[0]
    expected = {
        f"detector-{row}-{seed}": f"models/detectors/{row}-{seed}/weights/best.pt" for row in train.rows
    }
    expected |= {
        f"detector-{v}-{seed}-onnx": f"models/onnx/{v}-{seed}.onnx"
        for v in train.variants
        if v != variants.REAL
    }
    assert {name: artifact["path"] for name, artifact in pipeline["artifacts"].items()} == expected


# The stages DVC's run cache neither saves nor restores, and why. The rest come back from it when
# their inputs come back (a fold, a tuning trial or a queued experiment starts in a fresh
# workspace, and the run cache is all that spares it a fine-tuning or a training run).
NOT_RUN_CACHED = {
    # persist: the output folder is the stage's resume state (genfusion.jobs), so a stopped run
    # keeps its finished images and a grown request keeps those it already has.
    "class_images": "persist",
    "generate": "persist",
    "variations": "persist",
    "inpaint": "persist",
    "composite": "persist",
    # Link farms rebuilt in a second; dataset.yaml and counts.json are kept in git.
    "real_dataset": "uncached dataset",
    "datasets": "uncached dataset",
    # Curves and figures kept in git, so `dvc plots diff` compares revisions without the cache.
    "evaluate": "uncached precision-recall curve",
    "evaluate_two_phase": "uncached precision-recall curve",
    "gallery": "uncached figure",
    "report": "uncached figures",
    "inspect": "uncached figure",
}


def outside_the_run_cache(stage: PipelineStage) -> list[str]:
    """The outputs that keep DVC from caching the stage's run: a persistent one
    (dvc/stage/cache.py), or an uncached one that is neither a metric nor a plot (Stage.run)."""
    return [
        str(out) for out in stage.outs if out.persist or not (out.use_cache or out.is_metric or out.is_plot)
    ]


def test_only_the_stages_named_here_are_left_out_of_the_run_cache() -> None:
    with Repo(str(ROOT)) as dvc:
        refused = {s.name.split("@")[0] for s in dvc.index.stages if s.cmd and outside_the_run_cache(s)}
    assert refused == set(NOT_RUN_CACHED), (
        f"left out of DVC's run cache but not named here: {sorted(refused - set(NOT_RUN_CACHED))}; "
        f"named here but cached: {sorted(set(NOT_RUN_CACHED) - refused)}"
    )
