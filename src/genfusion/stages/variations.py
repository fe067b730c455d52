"""`variations` stage: img2img variations of every real train tile, boxes carried over.

Variation j of the s-th source tile (in file-name order) uses seed `variations.seed +
s * per_image + j`. The tile is resized to the model's working scale (longer side about
`diffusion.resolution`, sides multiples of 8), varied, and resized back to the tile's size,
so the source's normalised YOLO boxes stay valid; its label file is copied byte for byte.
That is sound at low strength, where img2img keeps the layout; at high strength objects
move and the copied boxes are wrong. Same incremental, resumable writing as `generate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import layout
from genfusion.diffusion.pipelines import (
    check_prompt,
    check_resolution,
    img2img_pipeline,
    memory_guard,
    pixel_settings,
    use_scheduler,
    working_size,
)
from genfusion.errors import GenfusionError
from genfusion.images import open_image, read_header, to_rgb
from genfusion.jobs import ImageJob, run_jobs

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from PIL import Image

    from genfusion.params import Params, VariationsParams

VARIATION_COLUMNS = (
    "file",
    "label",
    "source_image",
    "source_label",
    "source_sha256",
    "variation",
    "seed",
    "strength",
    "prompt",
    "model",
    "scheduler",
    "steps",
    "guidance",
    "resolution",
    "dtype",
    "device",
    "attention_slicing",
)


def source_pairs(real: Path) -> list[tuple[Path, Path]]:
    """(image, label) for every real train tile, in file-name order; every tile needs its label."""
    pairs = []
    for image in layout.image_files(Path(real), "train"):
        label = layout.label_file(Path(real), image.stem, "train")
        if not label.is_file():
            raise GenfusionError(
                f"variations: {label} is missing; every real train tile needs its YOLO label file"
                " (empty when the tile has no objects)"
            )
        pairs.append((image, label))
    return pairs


def make_variations(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    sources: Sequence[tuple[Path, Path]],
    settings: VariationsParams,
    out_dir: Path,
    *,
    prompt: str,
    resolution: int,
    fingerprint: str,
    state: PartialState | None = None,
) -> list[dict[str, str]]:
    """Write `settings.per_image` variations of each (image, label) source into
    `out_dir/images|labels/`, with `prompt` (the rendered `settings.prompt`)."""
    import torch
    from PIL import Image

    check_resolution(resolution)
    check_prompt(pipe.tokenizer, prompt, "variations.prompt")
    img2img = img2img_pipeline(pipe)
    use_scheduler(img2img, settings.scheduler)
    pixels = pixel_settings(pipe)
    sizes: dict[Path, tuple[int, int]] = {}
    jobs = []
    for s, (image, label) in enumerate(sorted(sources, key=lambda pair: pair[0].name)):
        sizes[image] = read_header(image).size
        digest, boxes = hashlib.sha256(image.read_bytes()).hexdigest(), label.read_bytes()
        for j in range(settings.per_image):
            name = f"{image.stem}_v{j}"
            row = {
                "file": f"images/{name}.png",
                "label": f"labels/{name}.txt",
                "source_image": image,
                "source_label": label,
                "source_sha256": digest,
                "variation": j,
                "seed": settings.seed + s * settings.per_image + j,
                "strength": settings.strength,
                "prompt": prompt,
                "model": fingerprint,
                "scheduler": settings.scheduler,
                "steps": settings.steps,
                "guidance": settings.guidance,
                "resolution": resolution,
                **pixels,
            }
            text_row = {k: str(v) for k, v in row.items()}
            jobs.append(ImageJob(row["file"], text_row, row["seed"], prompt, image, {row["label"]: boxes}))

    def render(chunk: list[ImageJob]) -> list[Image.Image]:
        size = sizes[chunk[0].source]
        inputs = []
        for job in chunk:
            with open_image(job.source) as raw:
                pixels = to_rgb(raw, job.source)[0]
            inputs.append(pixels.resize(working_size(size, resolution), Image.LANCZOS))
        with memory_guard("variations", "variations.batch"):
            images = img2img(
                prompt=[job.prompt for job in chunk],
                image=inputs,
                strength=settings.strength,
                guidance_scale=settings.guidance,
                num_inference_steps=settings.steps,
                generator=[torch.Generator(pipe.device).manual_seed(job.seed) for job in chunk],
            ).images
        return [image.resize(size, Image.LANCZOS) for image in images]

    return run_jobs(
        out_dir,
        jobs,
        VARIATION_COLUMNS,
        render,
        settings.batch,
        "variations",
        subdirs=("images", "labels"),
        # One pipeline call takes images of one size.
        batch_key=lambda job: sizes[job.source],
        state=state,
    )


def main(params: Params, *, base: Path, finetuned: Path | None, real: Path, out: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (variations.*, diffusion.*)."""
    from genfusion.diffusion.pipelines import model_fingerprint, open_generator, render_prompt
    from genfusion.launch import process_state

    diffusion, request = params.diffusion, params.variations
    prompt = render_prompt(request.prompt, "variations.prompt", class_prompt=diffusion.class_prompt)
    state = process_state(diffusion.device)
    make_variations(
        open_generator(diffusion, base, finetuned, state),
        source_pairs(real),
        request,
        out,
        prompt=prompt,
        resolution=diffusion.resolution,
        fingerprint=model_fingerprint(base, finetuned),
        state=state,
    )
