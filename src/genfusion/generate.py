"""`generate@subject` stage: text-to-image with one subject's generator.

Image i uses seed `generate.seed + i` and prompt `i mod len(prompts)`, so every image can be
remade alone (the same pixels up to float rounding; the same bytes when it is made in the same
batch, on the same machine and thread count). The output folder is its own resume state: an
image is kept when its manifest row matches the current request (same model fingerprint,
prompt, seed and sampler settings), so a rerun renders only what is missing, raising
`generate.n` renders only the new images, and a killed run loses at most the batch in flight.
Each PNG is renamed into place when complete and the manifest is rewritten after every
batch. The job runner here is shared with the `variations` stage.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import fsio
from genfusion.errors import GenfusionError
from genfusion.progress import progress_bar
from genfusion.sd import check_prompt, memory_guard, use_scheduler

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from genfusion.params import DiffusionParams, PrelabelParams

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
GENERATE_COLUMNS = (
    "file",
    "subject",
    "prompt",
    "negative_prompt",
    "seed",
    "model",
    "scheduler",
    "steps",
    "guidance",
    "resolution",
)


@dataclass(frozen=True)
class ImageJob:
    """One output image: its file, its manifest row, and what rendering it needs."""

    file: str  # relative to the output folder, e.g. images/canopy_00003.png
    row: dict[str, str]  # the manifest row; the same row means the same image
    seed: int
    prompt: str
    source: Path | None = None  # img2img input image
    companions: dict[str, bytes] = field(default_factory=dict)  # files written beside it (labels)
    extras: tuple[str, ...] = ()  # files `render` makes beside it (attention maps)


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows by file; an unreadable manifest counts as empty (its images are made again)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return {row["file"]: row for row in csv.DictReader(f)}
    except FileNotFoundError:
        return {}
    except (csv.Error, KeyError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); its images will be made again", path, exc)
        return {}


def write_manifest(path: Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fsio.write_text(path, text.getvalue())


def _intact(out_dir: Path, job: ImageJob) -> bool:
    return (
        (out_dir / job.file).is_file()
        and all(
            (out_dir / name).is_file() and (out_dir / name).read_bytes() == data
            for name, data in job.companions.items()
        )
        and all((out_dir / name).is_file() for name in job.extras)
    )


def _remove_strays(out_dir: Path, subdirs: Sequence[str], keep: set[str]) -> None:
    """Delete what a clean run would not have written: images of other requests, temp files."""
    for sub in subdirs:
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (out_dir / sub).iterdir():
            if f"{sub}/{path.name}" not in keep and path.is_file():
                path.unlink()
    for tmp in out_dir.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink()


def _batches(
    jobs: Sequence[ImageJob], size: int, key: Callable[[ImageJob], Hashable]
) -> Iterator[list[ImageJob]]:
    """Consecutive jobs with the same key, at most `size` at a time (a pipeline call needs one size)."""
    for _, group in itertools.groupby(jobs, key):
        group = list(group)
        for start in range(0, len(group), size):
            yield group[start : start + size]


def run_jobs(
    out_dir: Path,
    jobs: Sequence[ImageJob],
    columns: Sequence[str],
    render: Callable[[list[ImageJob]], list[Image.Image] | list[tuple[Image.Image, dict[str, bytes]]]],
    batch: int,
    description: str,
    subdirs: Sequence[str] = ("images",),
    batch_key: Callable[[ImageJob], Hashable] = lambda job: None,
    state: PartialState | None = None,
) -> list[dict[str, str]]:
    """Render the jobs not already in `out_dir` with the same row; return the manifest rows.

    `render` gives an image per job, or (image, {file: bytes}) when it also makes the job's
    `extras`; these and the companions are written before the image, which marks the job done.

    Several processes (`accelerate launch`) share the work batch by batch; only the main
    process deletes strays and writes the manifest.
    """
    from accelerate import PartialState

    state = state or PartialState()
    out_dir = Path(out_dir)
    previous = read_manifest(out_dir / MANIFEST)
    kept = {job.file for job in jobs if previous.get(job.file) == job.row and _intact(out_dir, job)}
    log.info(
        "%s: %d images to make, %d kept from earlier runs", description, len(jobs) - len(kept), len(kept)
    )
    state.wait_for_everyone()
    if state.is_main_process:
        keep = kept | {name for job in jobs if job.file in kept for name in (*job.companions, *job.extras)}
        _remove_strays(out_dir, subdirs, keep)
        write_manifest(out_dir / MANIFEST, columns, [job.row for job in jobs if job.file in kept])
    state.wait_for_everyone()

    # Batches are fixed blocks of the whole request, so a resumed or sharded run renders each
    # image in the same company as an uninterrupted one: batched kernels can round differently
    # with a different batch, and identical bytes need identical batches.
    blocks = [[job for job in block if job.file not in kept] for block in _batches(jobs, batch, batch_key)]
    blocks = [block for block in blocks if block]
    mine = blocks[state.process_index :: state.num_processes]
    done = set(kept)
    count = sum(len(block) for block in mine)
    for chunk in progress_bar(mine, f"{description} ({count} images)", total=len(mine)):
        for job, made in zip(chunk, render(chunk), strict=True):
            image, extras = made if isinstance(made, tuple) else (made, {})
            for name, data in (job.companions | extras).items():
                fsio.write_bytes(out_dir / name, data)
            fsio.write_png(out_dir / job.file, image)
            done.add(job.file)
        if state.is_main_process:
            write_manifest(out_dir / MANIFEST, columns, [job.row for job in jobs if job.file in done])
    state.wait_for_everyone()
    rows = [job.row for job in jobs]
    if state.is_main_process and state.num_processes > 1:
        write_manifest(out_dir / MANIFEST, columns, rows)
    return rows


def check_resolution(resolution: int) -> None:
    if resolution % 8:
        raise GenfusionError(
            f"diffusion.resolution: must be a multiple of 8 (the autoencoder's stride), got {resolution}"
        )


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    negative_prompt: str,
    indices: Sequence[int],
    seed_base: int,
    guidance: float,
    steps: int,
    resolution: int,
    batch: int,
    out_dir: Path,
    *,
    subject: str,
    fingerprint: str,
    scheduler: str = "ddim",
    state: PartialState | None = None,
    attention: PrelabelParams | None = None,
    classes: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Make images `indices` into `out_dir/images/`, keeping those already made for this request.

    With `attention` (prelabel.method: attention) the class names are appended to the prompts
    and each image's attention maps are saved beside it as `attention/<stem>.npz`.
    """
    import torch

    from genfusion.attention import (
        capture_attention,
        class_prompt,
        class_token_positions,
        npz_bytes,
        settings_key,
    )

    check_resolution(resolution)
    if not prompts:
        raise GenfusionError("generate.prompts: needs at least one prompt")
    for k, prompt in enumerate(prompts):
        check_prompt(pipe.tokenizer, prompt, f"generate.prompts[{k}]")
    columns = GENERATE_COLUMNS
    positions: dict[str, list[list[int]]] = {}
    if attention is not None:
        # The manifest records the prompt actually used, and what the maps depend on.
        columns = (*GENERATE_COLUMNS, "attention")
        prompts = [class_prompt(prompt, classes) for prompt in prompts]
        for k, prompt in enumerate(prompts):
            positions[prompt] = class_token_positions(
                pipe.tokenizer, prompt, classes, f"generate.prompts[{k}]"
            )
    use_scheduler(pipe, scheduler)
    jobs = []
    for i in indices:
        stem = f"{subject}_{i:05d}"
        row = {
            "file": f"images/{stem}.png",
            "subject": subject,
            "prompt": prompts[i % len(prompts)],
            "negative_prompt": negative_prompt,
            "seed": seed_base + i,
            "model": fingerprint,
            "scheduler": scheduler,
            "steps": steps,
            "guidance": guidance,
            "resolution": resolution,
        }
        extras: tuple[str, ...] = ()
        if attention is not None:
            row["attention"] = settings_key(attention)
            extras = (f"attention/{stem}.npz",)
        text_row = {k: str(v) for k, v in row.items()}
        jobs.append(ImageJob(row["file"], text_row, row["seed"], row["prompt"], extras=extras))

    def call(chunk: list[ImageJob]) -> list[Image.Image]:
        with memory_guard(f"generate@{subject}", "generate.batch"):
            return pipe(
                prompt=[job.prompt for job in chunk],
                negative_prompt=[negative_prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator(pipe.device).manual_seed(job.seed) for job in chunk],
            ).images

    def render_with_maps(chunk: list[ImageJob]) -> list[tuple[Image.Image, dict[str, bytes]]]:
        with capture_attention(pipe, attention, [positions[job.prompt] for job in chunk], steps) as recorder:
            images = call(chunk)
        maps = recorder.maps()
        return [
            (image, {job.extras[0]: npz_bytes(arrays)})
            for job, image, arrays in zip(chunk, images, maps, strict=True)
        ]

    render = call if attention is None else render_with_maps
    return run_jobs(
        out_dir,
        jobs,
        columns,
        render,
        batch,
        f"generate@{subject}",
        # Maps of an earlier run with capture on are strays once it is off.
        subdirs=("images", "attention")
        if attention is not None or (out_dir / "attention").exists()
        else ("images",),
        state=state,
    )


def open_generator(
    diffusion: DiffusionParams, base_dir: Path, finetuned_dir: Path | None, state: PartialState
) -> StableDiffusionPipeline:
    """The stage's generator on its device: diffusion.device, or each process's own GPU under
    `accelerate launch`."""
    from genfusion.sd import load_generator

    device = str(state.device) if state.num_processes > 1 else diffusion.device
    return load_generator(base_dir, finetuned_dir, diffusion.dtype, device, diffusion.attention_slicing)


def count_real_train(real: Path) -> int:
    return len(list((Path(real) / "images" / "train").glob("*.png")))


def main(
    params_path: Path, subject: str, base_dir: Path, finetuned_dir: Path | None, real: Path, out: Path
) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (generate.*, diffusion.*)."""
    from accelerate import PartialState

    from genfusion.params import load_params
    from genfusion.sd import model_fingerprint, read_finetune, render_prompt

    params = load_params(params_path)
    diffusion, request = params.diffusion, params.generate
    n = request.n
    if n == "match_real":
        n = count_real_train(real)
        if n == 0:
            raise GenfusionError(
                f"generate.n: match_real, but {real}/images/train holds no tiles; run the seeds stage first"
            )
    # {instance_prompt} is the fine-tune's prompt (with its identifier token); without a
    # fine-tune it is the class prompt the base model was trained on, so one template serves both.
    values = {
        "subject": subject,
        "class_prompt": diffusion.class_prompt,
        "instance_prompt": diffusion.class_prompt,
    }
    if finetuned_dir is not None:
        recorded = read_finetune(finetuned_dir)
        values |= {key: recorded[key] for key in ("instance_prompt", "class_prompt") if key in recorded}
    prompts = [render_prompt(t, f"generate.prompts[{k}]", **values) for k, t in enumerate(request.prompts)]
    state = PartialState()
    pipe = open_generator(diffusion, base_dir, finetuned_dir, state)
    generate(
        pipe,
        prompts,
        request.negative_prompt,
        range(n),
        request.seed,
        request.guidance,
        request.steps,
        diffusion.resolution,
        request.batch,
        out,
        subject=subject,
        fingerprint=model_fingerprint(base_dir, finetuned_dir),
        scheduler=request.scheduler,
        state=state,
        attention=params.prelabel if params.prelabel.method == "attention" else None,
        classes=params.classes,
    )
