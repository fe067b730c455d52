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

from genfusion.errors import GenfusionError
from genfusion.generate import ImageJob, check_resolution, run_jobs
from genfusion.images import open_image, read_header, to_rgb
from genfusion.sd import check_prompt, memory_guard, use_scheduler

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline
    from PIL import Image

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
)


def working_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The tile's size scaled so its longer side is `resolution`, each side a multiple of 8."""
    scale = resolution / max(size)
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)


def source_pairs(real: Path) -> list[tuple[Path, Path]]:
    """(image, label) for every real train tile, in file-name order; every tile needs its label."""
    pairs = []
    for image in sorted((Path(real) / "images" / "train").glob("*.png")):
        label = Path(real) / "labels" / "train" / f"{image.stem}.txt"
        if not label.is_file():
            raise GenfusionError(
                f"variations: {label} is missing; every real train tile needs its YOLO label file"
                " (empty when the tile has no objects)"
            )
        pairs.append((image, label))
    return pairs


def make_variations(
    pipe: StableDiffusionPipeline,
    sources: Sequence[tuple[Path, Path]],
    per_image: int,
    strength: float,
    guidance: float,
    steps: int,
    prompt: str,
    batch: int,
    seed: int,
    resolution: int,
    out_dir: Path,
    *,
    fingerprint: str,
    scheduler: str = "ddim",
    state: PartialState | None = None,
) -> list[dict[str, str]]:
    """Write `per_image` variations of each (image, label) source into `out_dir/images|labels/`."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    check_resolution(resolution)
    check_prompt(pipe.tokenizer, prompt, "variations.prompt")
    # The loaded components, shared: what `from_pipe` does, minus its dtype cast that logs a
    # spurious float32 warning.
    img2img = StableDiffusionImg2ImgPipeline(
        **pipe.components, requires_safety_checker=pipe.config.requires_safety_checker
    )
    img2img.set_progress_bar_config(disable=True)
    use_scheduler(img2img, scheduler)
    sizes: dict[Path, tuple[int, int]] = {}
    jobs = []
    for s, (image, label) in enumerate(sorted(sources, key=lambda pair: pair[0].name)):
        sizes[image] = read_header(image).size
        digest, boxes = hashlib.sha256(image.read_bytes()).hexdigest(), label.read_bytes()
        for j in range(per_image):
            name = f"{image.stem}_v{j}"
            row = {
                "file": f"images/{name}.png",
                "label": f"labels/{name}.txt",
                "source_image": image,
                "source_label": label,
                "source_sha256": digest,
                "variation": j,
                "seed": seed + s * per_image + j,
                "strength": strength,
                "prompt": prompt,
                "model": fingerprint,
                "scheduler": scheduler,
                "steps": steps,
                "guidance": guidance,
                "resolution": resolution,
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
                strength=strength,
                guidance_scale=guidance,
                num_inference_steps=steps,
                generator=[torch.Generator(pipe.device).manual_seed(job.seed) for job in chunk],
            ).images
        return [image.resize(size, Image.LANCZOS) for image in images]

    return run_jobs(
        out_dir,
        jobs,
        VARIATION_COLUMNS,
        render,
        batch,
        "variations",
        subdirs=("images", "labels"),
        # One pipeline call takes images of one size.
        batch_key=lambda job: sizes[job.source],
        state=state,
    )


def main(params_path: Path, base_dir: Path, finetuned_dir: Path | None, real: Path, out: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (variations.*, diffusion.*)."""
    from accelerate import PartialState

    from genfusion.generate import open_generator
    from genfusion.params import load_params
    from genfusion.sd import model_fingerprint, render_prompt

    params = load_params(params_path)
    diffusion, request = params.diffusion, params.variations
    prompt = render_prompt(request.prompt, "variations.prompt", class_prompt=diffusion.class_prompt)
    sources = source_pairs(real)
    state = PartialState()
    pipe = open_generator(diffusion, base_dir, finetuned_dir, state)
    make_variations(
        pipe,
        sources,
        request.per_image,
        request.strength,
        request.guidance,
        request.steps,
        prompt,
        request.batch,
        request.seed,
        diffusion.resolution,
        out,
        fingerprint=model_fingerprint(base_dir, finetuned_dir),
        scheduler=request.scheduler,
        state=state,
    )
