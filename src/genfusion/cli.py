"""`genfusion` command line: one sub-command per pipeline stage (dvc.yaml calls these).

Heavy libraries (torch, ultralytics, dvclive) are imported inside the commands so
that `genfusion --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer

from genfusion.errors import GenfusionError
from genfusion.variants import MADE, REGISTRY

app = typer.Typer(
    help="Train object detectors from a few real images plus diffusion-generated data (run `dvc repro`).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEBUG_VAR = "GENFUSION_DEBUG"
ParamsOpt = Annotated[Path, typer.Option("--params", help="Parameters file.")]
RealOpt = Annotated[Path, typer.Option(help="Real dataset written by `seeds`.")]
GeneratedOpt = Annotated[Path | None, typer.Option(help="Generated images, a folder per subject.")]
PrelabelsOpt = Annotated[Path | None, typer.Option(help="Automatic labels, a folder per subject.")]
AnnotationsOpt = Annotated[Path | None, typer.Option(help="People's labels, a folder per subject.")]
FilteredOpt = Annotated[Path | None, typer.Option(help="The quality filter's choices, a folder per set.")]
VariationsOpt = Annotated[Path | None, typer.Option(help="Variations written by `variations`.")]
MadeSetsOpt = Annotated[
    list[str],
    typer.Option(
        "--set",
        help=f"NAME=FOLDER: the set a stage made from the real tiles for variant NAME ({', '.join(MADE)});"
        " repeat for each set.",
    ),
]


def _debug() -> bool:
    return os.environ.get(DEBUG_VAR, "") not in ("", "0")


@app.callback()
def _setup(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help=f"Debug logging, and full tracebacks (also {DEBUG_VAR}=1)."),
    ] = False,
) -> None:
    from rich.logging import RichHandler

    if verbose:
        # Through the environment, so that child processes (torchrun ranks) inherit it.
        os.environ[DEBUG_VAR] = "1"
    verbose = verbose or _debug()

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, rich_tracebacks=False)],
    )
    if not verbose:
        # The Label Studio SDK's HTTP client logs every request at INFO, among them the
        # `404 Not Found` that ends its paging, which reads like an error.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _params(path: Path):
    """params.yaml, checked whole: a typo anywhere is caught by the first stage that runs."""
    from genfusion.launch import use_threads
    from genfusion.params import load_params

    params = load_params(path)
    use_threads(params.threads)
    return params


def _relaunched(params) -> bool:
    """True when this command has just run as `diffusion.processes` processes (torchrun)."""
    from genfusion.launch import relaunch_as_processes

    return relaunch_as_processes(params.diffusion.processes)


@app.command()
def params(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Check params.yaml and print it with every default filled in."""
    import yaml

    typer.echo(yaml.safe_dump(_params(params_path).model_dump(mode="json"), sort_keys=False))


@app.command()
def seeds(
    out: Annotated[Path, typer.Option(help="Output YOLO dataset folder.")],
    scenes: Annotated[Path, typer.Option(help="The test split's scenes, whole.")],
    report: Annotated[Path, typer.Option(help="Import report (JSON metric).")],
    val_scenes: Annotated[
        Path | None, typer.Option(help="The val split's scenes, whole (what `validate` scores).")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import, normalise, tile and split the real seed images (source: seeds.source)."""
    from genfusion.stages.seeds import main

    main(_params(params_path), out=out, scenes=scenes, val_scenes=val_scenes, report=report)


@app.command()
def datasets(
    variant: Annotated[
        str,
        typer.Argument(help=f"Dataset variant, one of: {', '.join(REGISTRY)}."),
    ],
    out: Annotated[Path, typer.Option(help="Output folder for this variant.")],
    real: RealOpt,
    # The other folders only where the variant reads them (the `real` stage gives none).
    generated: GeneratedOpt = None,
    prelabels: PrelabelsOpt = None,
    annotations: AnnotationsOpt = None,
    filtered: FilteredOpt = None,
    sets: MadeSetsOpt = [],  # noqa: B006 (typer reads the default, never mutates it)
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write the YOLO dataset a detector variant trains on (params: labels, datasets)."""
    from genfusion.layout import Sources
    from genfusion.stages.datasets import main
    from genfusion.variants import parse_sets

    sources = Sources(
        real=real,
        generated=generated,
        prelabels=prelabels,
        annotations=annotations,
        filtered=filtered,
        sets=parse_sets(sets, f"datasets@{variant}"),
    )
    counts = main(_params(params_path), variant=variant, sources=sources, out=out)
    logging.getLogger("genfusion").info("datasets@%s: %s", variant, counts)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder from `datasets`.")],
    out: Annotated[Path, typer.Option(help="Output folder for the trained detector.")],
    live: Annotated[Path, typer.Option(help="dvclive folder for training curves.")],
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from this detector's weights (a two-phase row) instead of train.model."),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train one YOLO detector (params: train.*)."""
    from genfusion.params import check_pretrained_weights
    from genfusion.stages.train import main

    settings = _params(params_path)
    if init is None:
        check_pretrained_weights(settings.train.model)
    elif not init.is_file():
        raise GenfusionError(
            f"--init {init}: no detector weights there; train the first phase first"
            " (`dvc repro` trains each train.init_from variant before its two-phase row)"
        )
    main(settings, data=data, seed=seed, out=out, live=live, init=init)


ScenesOpt = Annotated[Path, typer.Option(help="Scene set folder (images/ and annotations.json).")]


@app.command()
def evaluate(
    weights: Annotated[Path, typer.Option(help="Trained weights (best.pt).")],
    scenes: ScenesOpt,
    out: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    detections: Annotated[Path, typer.Option(help="The detections to write (COCO results JSON).")],
    variant: Annotated[str, typer.Option(help="Variant name, recorded in the metrics.")],
    seed: Annotated[int, typer.Option(help="Seed, recorded in the metrics.")] = 0,
    pr: Annotated[Path | None, typer.Option(help="Precision-recall curve CSV to write.")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset folder from `datasets`: adds the tile-level figures of its test split."),
    ] = None,
    real: Annotated[
        Path | None,
        typer.Option(help="The real dataset `seeds` wrote with the scenes (another import's are refused)."),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score a detector on whole scenes (params: predict, evaluate)."""
    from genfusion.stages.evaluate import main

    main(
        _params(params_path), weights=weights, scenes=scenes, variant=variant, seed=seed, out=out,
        detections=detections, pr=pr, data=data, real=real,
    )  # fmt: skip


@app.command("test-set")
def test_set(
    name: Annotated[str, typer.Argument(help="The set's name in evaluate.extra_sets.")],
    source: Annotated[Path, typer.Option(help="The labelled set: a folder or file in a seeds format.")],
    out: ScenesOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import one of evaluate.extra_sets as a scene set (classes through seeds.class_map)."""
    from genfusion.stages.test_set import main

    main(_params(params_path), name=name, source=source, out=out)


@app.command()
def report(
    eval_dir: Annotated[Path, typer.Option(help="Folder of evaluate's metrics.")],
    pr_dir: Annotated[Path, typer.Option(help="Folder of evaluate's PR curves.")],
    predictions: Annotated[Path, typer.Option(help="Folder of evaluate's detections.")],
    scenes: Annotated[Path, typer.Option(help="Folder of the scene sets.")],
    summary: Annotated[Path, typer.Option(help="Summary JSON to write.")],
    markdown: Annotated[Path, typer.Option(help="Markdown table to write.")],
    figures: Annotated[Path, typer.Option(help="Folder for the figures (PNG).")],
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Every detector on every test set: AP with bootstrap intervals, paired differences to
    `real`, and figures."""
    from genfusion.stages.report import main

    main(
        _params(params_path), eval_dir=eval_dir, pr_dir=pr_dir, predictions=predictions, scenes=scenes,
        summary=summary, markdown=markdown, figures=figures,
    )  # fmt: skip


@app.command()
def export(
    weights: Annotated[Path, typer.Option(help="Trained weights (best.pt).")],
    scenes: ScenesOpt,
    out: Annotated[Path, typer.Option(help="The ONNX model to write.")],
    metrics: Annotated[Path, typer.Option(help="The parity check's figures (JSON metric).")],
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Export a detector to ONNX and check that it scores as the PyTorch model does."""
    from genfusion.stages.export import main

    main(_params(params_path), weights=weights, scenes=scenes, out=out, metrics=metrics)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Images (any size; GeoTIFF too) or folders of them.")],
    weights: Annotated[
        Path, typer.Option(help="A trained detector, e.g. models/detectors/real-0/weights/best.pt.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for predictions.json, predictions.csv and GeoJSON.")],
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run a detector over whole scenes, slice by slice (params: predict, train.imgsz, train.device)."""
    from genfusion.commands.predict import main

    main(_params(params_path), weights=weights, images=images, out=out)


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("reports/sweep.png"),
) -> None:
    """Plot AP50 against synthetic images over every experiment (`dvc exp show`), e.g. after a
    sweep of datasets.mixed_ratio or variations.per_image."""
    from genfusion.commands.experiments import sweep_main

    sweep_main(out)


@app.command()
def exp(
    profile: Annotated[Path, typer.Argument(help="A params file of what differs (profiles/*.yaml).")],
    name: Annotated[str | None, typer.Option(help="Experiment name (without a sweep).")] = None,
    queue: Annotated[bool, typer.Option(help="Queue them; run them with `dvc queue start`.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the dvc command instead of running it.")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run (or queue) `dvc exp run` with a profile's params, e.g. the published protocols."""
    from genfusion.commands.experiments import exp_main

    sys.exit(exp_main(profile, params_path, name=name, queue=queue, dry_run=dry_run))


FinetunedOpt = Annotated[
    Path | None, typer.Option(help="Fine-tuned subject folder (LoRA or full UNet); none = the base model.")
]
BaseOpt = Annotated[Path, typer.Option(help="Base model folder from `base-model`.")]


@app.command("base-model")
def base_model(
    real: RealOpt,
    out: Annotated[Path, typer.Option(help="Output folder for the base model.")],
    checkpoints: Annotated[
        Path, typer.Option(help="Folder of local checkpoints (the stage's DVC dependency).")
    ],
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pretrain the builtin tiny Stable Diffusion, or check and record an external one (diffusion.*)."""
    from genfusion.stages.base_model import main

    main(_params(params_path), real=real, out=out, checkpoints=checkpoints)


@app.command()
def generate(
    subject: Annotated[str, typer.Argument(help="Subject name, used in file names and prompt templates.")],
    out: Annotated[Path, typer.Option(help="Output folder (images/, manifest.csv).")],
    base: BaseOpt,
    real: RealOpt,
    finetuned: FinetunedOpt = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Text-to-image with a subject's generator; keeps images already made (generate.*)."""
    from genfusion.stages.generate import main

    settings = _params(params_path)
    if not _relaunched(settings):
        main(settings, subject=subject, base=base, finetuned=finetuned, real=real, out=out)


@app.command()
def variations(
    out: Annotated[Path, typer.Option(help="Output folder (images/, labels/, manifest.csv).")],
    base: BaseOpt,
    real: RealOpt,
    finetuned: FinetunedOpt = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """img2img variations of every real train tile, boxes carried over (variations.*)."""
    from genfusion.stages.variations import main

    settings = _params(params_path)
    if not _relaunched(settings):
        main(settings, base=base, finetuned=finetuned, real=real, out=out)


@app.command()
def inpaint(
    subject: Annotated[str, typer.Argument(help="Subject whose generator paints the objects.")],
    out: Annotated[Path, typer.Option(help="Output folder (images/, labels/, manifest.csv).")],
    base: BaseOpt,
    real: RealOpt,
    checkpoints: Annotated[
        Path, typer.Option(help="Where inpaint.checkpoint and inpaint.controlnet must be (DVC tracks it).")
    ],
    finetuned: FinetunedOpt = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Objects inpainted into layouts drawn on the real train tiles, labels known by construction
    (inpaint.*)."""
    from genfusion.stages.inpaint import main

    settings = _params(params_path)
    if not _relaunched(settings):
        main(
            settings,
            subject=subject,
            base=base,
            finetuned=finetuned,
            real=real,
            out=out,
            checkpoints=checkpoints,
        )


@app.command("filter")
def filter_set(
    name: Annotated[str, typer.Argument(help=f"The set's name, a key of filter.sets ({', '.join(MADE)}).")],
    out: Annotated[Path, typer.Option(help="Output folder (manifest.csv, summary.json).")],
    images: Annotated[Path, typer.Option("--set", help="The set's folder (the value of filter.sets).")],
    weights: Annotated[Path, typer.Option(help="The real detector's weights.")],
    real: RealOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score a set whose labels are known by construction and keep its best filter.keep share."""
    from genfusion.stages.quality_filter import main

    summary = main(_params(params_path), name=name, set_dir=images, real=real, weights=weights, out=out)
    logging.getLogger("genfusion").info(
        "filter@%s: kept %d of %d images (filter.keep %g)",
        name,
        summary["kept"],
        summary["n"],
        summary["keep"],
    )


@app.command()
def composite(
    out: Annotated[Path, typer.Option(help="Output folder (images/, labels/, manifest.csv).")],
    real: RealOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Copy-paste composites of the real train tiles, labels known by construction (composite.*)."""
    from genfusion.stages.composite import main

    main(_params(params_path), real=real, out=out)


@app.command("class-images")
def class_images(
    subject: Annotated[str, typer.Argument(help="Subject name (a key of `subjects` in params).")],
    out: Annotated[Path, typer.Option(help="Output folder (images/, manifest.csv).")],
    base: BaseOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Prior-preservation images of a subject's class prompt, made by the base model."""
    from genfusion.stages.class_images import main

    settings = _params(params_path)
    if not _relaunched(settings):
        main(settings, subject=subject, base=base, out=out)


@app.command()
def finetune(
    subject: Annotated[str, typer.Argument(help="Subject name (a key of `subjects` in params).")],
    out: Annotated[Path, typer.Option(help="Output folder for the fine-tuned weights.")],
    live: Annotated[Path, typer.Option(help="dvclive folder for the loss curve.")],
    class_images: Annotated[Path, typer.Option(help="Folder from `class-images`.")],
    base: BaseOpt,
    real: RealOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """DreamBooth fine-tuning of one subject, LoRA or full UNet (finetune.*, subjects.*)."""
    from genfusion.stages.finetune import main

    settings = _params(params_path)
    if not _relaunched(settings):
        main(settings, subject=subject, base=base, real=real, class_images=class_images, out=out, live=live)


@app.command()
def gallery(
    generated: GeneratedOpt,
    real: RealOpt,
    variations: VariationsOpt,
    out: Annotated[Path, typer.Option(help="PNG to write.")],
) -> None:
    """A picture of real tiles beside their variations and each subject's generated images."""
    from genfusion.stages.gallery import main

    main(real=real, generated=generated, variations=variations, out=out)


RealDetectorOpt = Annotated[
    Path, typer.Option(help="The real detector of prelabel.seed (train@real-<seed>): its best.pt.")
]


@app.command()
def prelabel(
    subject: Annotated[str, typer.Argument(help="Subject name (a key of `subjects` in params).")],
    generated: Annotated[Path, typer.Option(help="The subject's generated folder (images/, attention/).")],
    out: Annotated[Path, typer.Option(help="Output folder (labels/, masks/, manifest.csv).")],
    weights: RealDetectorOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Automatic labels for generated images: attention maps or a detector (prelabel.*)."""
    from genfusion.stages.prelabel import main

    main(_params(params_path), subject=subject, generated=generated, weights=weights, out=out)


@app.command("label-quality")
def label_quality(
    out: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    prelabels: PrelabelsOpt,
    annotations: AnnotationsOpt,
    generated: GeneratedOpt,
    real: RealOpt,
    weights: RealDetectorOpt,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Precision and recall of the automatic labels against people's, and of the detector on real val."""
    from genfusion.stages.label_quality import main

    main(
        _params(params_path),
        prelabels=prelabels,
        annotations=annotations,
        generated=generated,
        real=real,
        weights=weights,
        out=out,
    )


annotate_app = typer.Typer(
    help="People's labels in Label Studio: serve it, push tasks with the automatic labels, pull the results.",
    no_args_is_help=True,
)
app.add_typer(annotate_app, name="annotate")
# Outside a stage, the folders default to dvc.yaml's (its `vars: paths`).
PipelineGeneratedOpt = Annotated[
    Path | None, typer.Option(help="Generated images, a folder per subject (default: dvc.yaml's).")
]
PipelinePrelabelsOpt = Annotated[
    Path | None, typer.Option(help="Automatic labels, a folder per subject (default: dvc.yaml's).")
]
SubjectOpt = Annotated[
    str, typer.Option("--subject", help="Subject (params subjects) whose images to label.")
]


@annotate_app.command("install")
def annotate_install(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Install Label Studio into its own venv under annotate.home (what `serve` does the first time)."""
    from genfusion.commands.annotate import install_main

    install_main(_params(params_path))


@annotate_app.command("serve")
def annotate_serve(
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: annotate.url's).")] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Install (first time) and run Label Studio on 127.0.0.1 (account and token: environment or .env)."""
    from genfusion.commands.annotate import serve_main

    serve_main(_params(params_path), port=port)


@annotate_app.command("push")
def annotate_push(
    subject: SubjectOpt,
    generated: PipelineGeneratedOpt = None,
    prelabels: PipelinePrelabelsOpt = None,
    order: Annotated[
        str,
        typer.Option(
            metavar="[uncertainty|file]",
            help="Order of the new tasks: uncertainty (most uncertain automatic labels first,"
            " where a person's label is worth most) or file (by file name).",
        ),
    ] = "uncertainty",
    budget: Annotated[
        int | None,
        typer.Option(metavar="N", help="Push only the N first new images in that order (default: all)."),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Create or update the subject's project; add a task per new image, automatic labels as predictions."""
    from genfusion.commands.annotate import push_main
    from genfusion.commands.pipeline_paths import pipeline_path

    push_main(
        _params(params_path),
        subject=subject,
        generated=generated or pipeline_path("generated"),
        prelabels=prelabels or pipeline_path("prelabels"),
        order=order,
        budget=budget,
    )


@annotate_app.command("pull")
def annotate_pull(
    subject: SubjectOpt,
    generated: PipelineGeneratedOpt = None,
    annotations: Annotated[
        Path | None, typer.Option(help="People's labels, a folder per subject (default: dvc.yaml's).")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write people's labels to data/annotations/<subject>/ and `dvc add` it; print what changed."""
    from genfusion.commands.annotate import pull_main
    from genfusion.commands.pipeline_paths import pipeline_path

    pull_main(
        _params(params_path),
        subject=subject,
        generated=generated or pipeline_path("generated"),
        annotations=annotations or pipeline_path("annotations"),
    )


inspect_app = typer.Typer(
    help="Real against synthetic: distribution metrics and a FiftyOne dataset (build), and its App (app).",
    no_args_is_help=True,
)
app.add_typer(inspect_app, name="inspect")


@inspect_app.command("build")
def inspect_build(
    metrics: Annotated[Path, typer.Option(help="Distribution metrics (JSON, a DVC metric).")],
    figure: Annotated[Path, typer.Option(help="Distribution figure (PNG).")],
    real: RealOpt,
    generated: GeneratedOpt,
    prelabels: PrelabelsOpt,
    annotations: AnnotationsOpt,
    filtered: FilteredOpt,
    detectors: Annotated[Path, typer.Option(help="Trained detectors, a folder each.")],
    sets: MadeSetsOpt = [],  # noqa: B006 (typer reads the default, never mutates it)
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """The `inspect` stage: measure synthetic against real and build or update the FiftyOne dataset."""
    from genfusion.layout import Sources
    from genfusion.stages.inspect import main
    from genfusion.variants import parse_sets

    sources = Sources(
        real=real,
        generated=generated,
        prelabels=prelabels,
        annotations=annotations,
        detectors=detectors,
        filtered=filtered,
        sets=parse_sets(sets, "inspect"),
    )
    main(_params(params_path), sources=sources, metrics=metrics, figure=figure)


@inspect_app.command("app")
def inspect_app_command(
    port: Annotated[int | None, typer.Option(help="Port (default: inspect.app_port).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the FiftyOne App with the inspect stage's dataset and saved views (Ctrl-C stops it)."""
    from genfusion.commands.inspect_app import main

    main(_params(params_path), port=port, host=host)


tune_app = typer.Typer(
    help="Settings chosen on validation: a profile's sweep run on every cross-scene fold, ranked.",
    no_args_is_help=True,
)
app.add_typer(tune_app, name="tune")


@tune_app.command("run")
def tune_run(
    profile: Annotated[
        Path, typer.Argument(help="Profile whose sweep: is what to try (profiles/tune-real.yaml).")
    ],
    jobs: Annotated[int, typer.Option(help="Experiments run at once.")] = 1,
    dry_run: Annotated[bool, typer.Option(help="Print the dvc commands instead of running them.")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Queue and run each trial of the profile on each fold, up to the val scenes' scores; trials
    already run are skipped."""
    from genfusion.commands.tuning import run_main
    from genfusion.params import profile_trials

    trials = profile_trials(profile, params_path)
    sys.exit(run_main(_params(params_path), trials, jobs=jobs, dry_run=dry_run))


@tune_app.command("report")
def tune_report(
    by: Annotated[
        str, typer.Option(help="The row whose pooled val AP50 ranks the trials that train it.")
    ] = "real",
    summary: Annotated[Path, typer.Option(help="JSON to write.")] = Path("metrics/tuning.json"),
    markdown: Annotated[Path, typer.Option(help="Markdown to write.")] = Path("reports/tuning.md"),
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pool each trial's val scenes over its folds and rank the trials (params: evaluate)."""
    from genfusion.commands.pipeline_paths import pipeline_path
    from genfusion.commands.tuning import report_main

    report_main(
        _params(params_path), scenes=pipeline_path("scenes"), predictions=pipeline_path("predictions"),
        by=by, summary=summary, markdown=markdown,
    )  # fmt: skip


cross_scene_app = typer.Typer(
    help="Leave-one-scene-out evaluation: one DVC experiment per held-out scene, then pooled AP.",
    no_args_is_help=True,
)
app.add_typer(cross_scene_app, name="cross-scene")


@cross_scene_app.command("run")
def cross_scene_run(
    jobs: Annotated[int, typer.Option(help="Experiments run at once (each a full pipeline).")] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-S", help="A param of every fold, as `dvc exp run -S` takes it (train.seeds=[0])."
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="A profile's params in every fold, before --set (profiles/study.yaml)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the dvc commands instead of running them.")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Queue and run one experiment per scene of seeds.source and training seed, the scene held out
    as the test split; experiments already run with the same params are skipped."""
    from genfusion.commands.cross_scene import profile_of_folds, run_main

    overrides = [*(profile_of_folds(profile, params_path) if profile else []), *(set_ or [])]
    sys.exit(run_main(params_path, jobs=jobs, overrides=overrides, dry_run=dry_run))


@cross_scene_app.command("report")
def cross_scene_report(
    scenes: Annotated[
        Path | None, typer.Option(help="Folder of the scene sets (default: dvc.yaml's paths.scenes).")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Folder of evaluate's detections (default: dvc.yaml's paths.predictions)."),
    ] = None,
    summary: Annotated[Path, typer.Option(help="JSON to write.")] = Path("metrics/cross_scene.json"),
    markdown: Annotated[Path, typer.Option(help="Markdown to write.")] = Path("reports/cross_scene.md"),
    figure: Annotated[Path, typer.Option(help="The verdict's forest plot (PNG) to write.")] = Path(
        "reports/cross_scene_verdict.png"
    ),
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pool the folds' detections: AP per variant with intervals, paired differences to real, and
    each fold's figures (params: evaluate)."""
    from genfusion.commands.cross_scene import report_main
    from genfusion.commands.pipeline_paths import pipeline_path

    report_main(
        _params(params_path),
        scenes=scenes or pipeline_path("scenes"),
        predictions=predictions or pipeline_path("predictions"),
        summary=summary,
        markdown=markdown,
        figure=figure,
    )


def main() -> None:
    from genfusion.launch import RELAUNCHED_VAR, leave_process_group

    try:
        app(standalone_mode=True)
    except GenfusionError as exc:
        if _debug():
            traceback.print_exception(exc)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file and "LOCAL_RANK" in os.environ:
            # A process of a run on several: its launcher's summary names the error.
            Path(error_file).write_text(json.dumps({"message": str(exc), "timestamp": str(int(time.time()))}))
        if not (error_file and RELAUNCHED_VAR in os.environ):
            # Under `diffusion.processes` the relaunching command says it once (a process that said
            # it itself could be stopped by the launcher first, when another failed sooner).
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    finally:
        leave_process_group()


if __name__ == "__main__":  # `torchrun -m genfusion.cli ...` runs the module
    main()
