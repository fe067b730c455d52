"""Text-to-image into a folder, resumable: the core of the `generate` and `class_images` stages.

Image i uses seed `seed + i` and prompt `i mod len(prompts)`, so every image can be remade
alone (the same pixels up to float rounding; the same bytes when it is made in the same batch,
on the same machine and thread count). A rerun renders only what is missing (see
`genfusion.jobs`), and raising the count renders only the new images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion.diffusion.pipelines import (
    check_prompt,
    check_resolution,
    memory_guard,
    pixel_settings,
    use_scheduler,
)
from genfusion.errors import GenfusionError
from genfusion.jobs import ImageJob, run_jobs

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from genfusion.params import GenerateParams, PrelabelParams

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
    "dtype",
    "device",
    "attention_slicing",
)


def text_to_image(
    pipe: StableDiffusionPipeline,
    sampler: GenerateParams,
    out_dir: Path,
    *,
    prompts: Sequence[str],
    count: int,
    seed: int,
    resolution: int,
    subject: str,
    fingerprint: str,
    state: PartialState | None = None,
    attention: PrelabelParams | None = None,
    classes: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Make images 0..count-1 of `prompts` into `out_dir/images/` with `sampler`'s negative prompt,
    guidance, steps, scheduler and batch; image i has seed `seed + i`. Images already made for
    this request are kept.

    With `attention` (prelabel.method: attention) the class names are appended to the prompts
    and each image's attention maps are saved beside it as `attention/<stem>.npz`.
    """
    import torch

    from genfusion.diffusion.attention import (
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
    use_scheduler(pipe, sampler.scheduler)
    settings = pixel_settings(pipe)
    jobs = []
    for i in range(count):
        stem = f"{subject}_{i:05d}"
        row = {
            "file": f"images/{stem}.png",
            "subject": subject,
            "prompt": prompts[i % len(prompts)],
            "negative_prompt": sampler.negative_prompt,
            "seed": seed + i,
            "model": fingerprint,
            "scheduler": sampler.scheduler,
            "steps": sampler.steps,
            "guidance": sampler.guidance,
            "resolution": resolution,
            **settings,
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
                negative_prompt=[sampler.negative_prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=sampler.steps,
                guidance_scale=sampler.guidance,
                generator=[torch.Generator(pipe.device).manual_seed(job.seed) for job in chunk],
            ).images

    def render_with_maps(chunk: list[ImageJob]) -> list[tuple[Image.Image, dict[str, bytes]]]:
        with capture_attention(
            pipe, attention, [positions[job.prompt] for job in chunk], sampler.steps
        ) as recorder:
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
        sampler.batch,
        f"generate@{subject}",
        # Maps of an earlier run with capture on are strays once it is off.
        subdirs=("images", "attention")
        if attention is not None or (out_dir / "attention").exists()
        else ("images",),
        state=state,
    )
