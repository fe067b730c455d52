"""`inpaint@subject` stage: layout-conditioned inpainting, images whose labels are known by construction.

Image j of the s-th real train tile (in file-name order) takes that tile as background, with its
own labels, and uses seed `inpaint.seed + s * per_image + j` for its layout and its noise:

- the layout: boxes drawn by the placement plan composite also uses (`genfusion.placement`): how many
  is `inpaint.density` times the box count of a real train tile drawn at random (at least one);
  each box has the size of a real box at least `inpaint.min_size` px on each side (times a factor
  drawn from `inpaint.scale`, width and height swapped at random with `inpaint.rotate`) and the
  class of that box, and is centred near the centre of a real box drawn at random;
- the mask: the layout boxes, each grown by `inpaint.mask_grow` px on every side;
- the tile is resized to the model's working size (longer side about `diffusion.resolution`,
  sides multiples of 8, as in `variations`); the subject's generator repaints the mask there
  (widened to whole latent cells, so that every masked pixel is repainted) from `inpaint.prompt`,
  and the result is resized back to the tile's size. Only the pixels inside the mask are pasted
  onto the tile: every other pixel is the tile's own, byte for byte.

How the model inpaints: the generator's own UNet (4 input channels: the builtin model, any SD
1.x / 2.x / SDXL checkpoint, with the subject's fine-tune) inpaints by blending, as diffusers'
inpainting pipelines do for such a UNet: after every step the latents outside the mask are reset
to the tile's, noised to that step, so the masked area is painted to fit around it.
`inpaint.strength` sets how much of the masked area's content is noised away (1: painted from
pure noise). `inpaint.checkpoint` names a dedicated inpainting checkpoint instead (a
save_pretrained folder whose UNet also reads the mask and the masked image, 9 input channels,
e.g. stable-diffusion-inpainting), with the subject's LoRA fine-tune applied. `inpaint.controlnet`
names a ControlNet that also conditions every step on the layout map: the layout boxes filled
white on black at the working size (a ControlNet trained on such maps puts one object per box).

Labels: the tile's own objects, then the layout boxes in layout order. Each is covered by the
repainted areas (grown boxes) of the layout boxes after it: one more than
`inpaint.max_occlusion` covered is removed, a partly covered box shrinks to its uncovered part
(`placement.settle_occlusion`; an outline is kept as it is). They are right by construction as
far as the model paints one object filling each box: without a layout ControlNet nothing but the
prompt and the box's size asks it to.

The manifest records, per image, the background and its sha256, the sha256 of its labels, the
layout (`boxes`: [class, x0, y0, x1, y1] in tile pixels, as JSON), the seed, the model, the
ControlNet's fingerprint (empty without one), the prompt, the sampler settings and what changes
the pixels (dtype, device, attention slicing). Same incremental, resumable writing as `generate`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion.boxes import Box
from genfusion.diffusion.pipelines import (
    check_prompt,
    check_resolution,
    is_sdxl,
    memory_guard,
    pixel_settings,
    use_scheduler,
    weights_fingerprint,
    working_size,
)
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import label_text
from genfusion.jobs import ImageJob, run_jobs
from genfusion.placement import Tile, box_statistics, cut_instances, load_tiles, plan, settle_occlusion

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline
    from PIL import Image

    from genfusion.params import InpaintParams, Params

INPAINT_COLUMNS = (
    "file",
    "label",
    "background",
    "background_sha256",
    "labels_sha256",
    "boxes",
    "seed",
    "strength",
    "prompt",
    "model",
    "controlnet",
    "controlnet_scale",
    "scheduler",
    "steps",
    "guidance",
    "resolution",
    "mask_grow",
    "max_occlusion",
    "task",
    "dtype",
    "device",
    "attention_slicing",
)
# Pipelines whose components a dedicated inpainting checkpoint may hold, by model_index.json's
# _class_name: the family's text-to-image class loads them all (the inpainting class is built
# on the loaded components).
CHECKPOINT_CLASSES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLPipeline",
}


def draw_layout(
    rng: np.random.Generator, tile: Tile, instances, statistics, settings: InpaintParams, task: str
) -> list[Box]:
    """The layout boxes of one image, in tile pixels, each with the class of the real box whose
    size it took (its outline is the box, for `segment`)."""
    placements = plan(rng, tile, instances, statistics, settings)
    boxes = [Box(instances[p.instance].label, p.x, p.y, p.x + p.width, p.y + p.height) for p in placements]
    return [replace(box, polygon=box.corners) for box in boxes] if task == "segment" else boxes


def grown_boxes(boxes: Sequence[Box], grow: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Each box grown by `grow` px on every side, in whole pixels, kept inside the tile."""
    width, height = size
    return [
        (
            max(int(math.floor(b.x0)) - grow, 0),
            max(int(math.floor(b.y0)) - grow, 0),
            min(int(math.ceil(b.x1)) + grow, width),
            min(int(math.ceil(b.y1)) + grow, height),
        )
        for b in boxes
    ]


def tile_mask(grown: Sequence[tuple[int, int, int, int]], size: tuple[int, int]) -> np.ndarray:
    """True inside the repainted area, at the tile's size (H x W)."""
    mask = np.zeros((size[1], size[0]), bool)
    for x0, y0, x1, y1 in grown:
        mask[y0:y1, x0:x1] = True
    return mask


def working_mask(
    grown: Sequence[tuple[int, int, int, int]], size: tuple[int, int], work: tuple[int, int], cell: int
) -> np.ndarray:
    """The repainted area at the working size (uint8, 255 inside), each box widened to whole
    latent cells of `cell` px: the pipeline resizes the mask to the latents, and a cell only
    partly inside would be kept."""
    sx, sy = work[0] / size[0], work[1] / size[1]
    mask = np.zeros((work[1], work[0]), np.uint8)
    for x0, y0, x1, y1 in grown:
        wx0, wy0 = math.floor(x0 * sx / cell) * cell, math.floor(y0 * sy / cell) * cell
        wx1, wy1 = math.ceil(x1 * sx / cell) * cell, math.ceil(y1 * sy / cell) * cell
        mask[wy0:wy1, wx0:wx1] = 255
    return mask


def layout_map(boxes: Sequence[Box], size: tuple[int, int], work: tuple[int, int]) -> np.ndarray:
    """The ControlNet's condition: the layout boxes filled white on black at the working size
    (RGB uint8), each at least a pixel."""
    sx, sy = work[0] / size[0], work[1] / size[1]
    image = np.zeros((work[1], work[0], 3), np.uint8)
    for b in boxes:
        x0, y0 = round(b.x0 * sx), round(b.y0 * sy)
        x1, y1 = max(round(b.x1 * sx), x0 + 1), max(round(b.y1 * sy), y0 + 1)
        image[y0:y1, x0:x1] = 255
    return image


def layout_labels(
    tile: Tile, boxes: Sequence[Box], grown: Sequence[tuple[int, int, int, int]], max_occlusion: float
) -> list[Box]:
    """The tile's objects then the layout boxes, each covered by the repainted areas of the
    layout boxes after it (`placement.settle_occlusion`)."""
    order = np.zeros((tile.size[1], tile.size[0]), np.int32)
    for k, (x0, y0, x1, y1) in enumerate(grown):
        order[y0:y1, x0:x1] = len(tile.boxes) + k + 1
    everything = [*tile.boxes, *boxes]
    return settle_occlusion(everything, [None] * len(everything), order, max_occlusion)


def paste_inside(background: np.ndarray, painted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The background with the painted pixels inside the mask, its own everywhere else."""
    result = background.copy()
    result[mask] = painted[mask]
    return result


def inpaint_pipeline(pipe, controlnet: ControlNetModel | None = None):
    """The inpainting pipeline of `pipe`'s family on the same loaded components (with the
    ControlNet, the ControlNet inpainting one). Built directly, as `img2img_pipeline` is."""
    import inspect

    from diffusers import (
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    if controlnet is None:
        cls = StableDiffusionXLInpaintPipeline if is_sdxl(pipe) else StableDiffusionInpaintPipeline
    elif is_sdxl(pipe):
        cls = StableDiffusionXLControlNetInpaintPipeline
    else:
        cls = StableDiffusionControlNetInpaintPipeline
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted}
    if controlnet is not None:
        components["controlnet"] = controlnet
    settings = {k: v for k, v in pipe.config.items() if k in accepted and k not in pipe.components}
    inpainter = cls(**components, **settings)
    inpainter.set_progress_bar_config(disable=True)
    return inpainter


def load_controlnet(folder: Path | str, pipe) -> ControlNetModel:
    """A ControlNetModel save_pretrained folder, checked to fit the generator; every problem is
    an error naming inpaint.controlnet and the folder."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    key = f"inpaint.controlnet: {folder}"
    config = folder / "config.json"
    if not folder.is_dir():
        raise GenfusionError(f"{key} is not a folder; give a ControlNetModel saved with save_pretrained")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise GenfusionError(f"{key} holds no readable config.json, so no ControlNetModel ({exc})") from exc
    if class_name != "ControlNetModel":
        raise GenfusionError(f"{key} holds a {class_name}, not a ControlNetModel")
    try:
        model, info = ControlNetModel.from_pretrained(
            folder, dtype=pipe.unet.dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise GenfusionError(f"{key}: cannot load the ControlNetModel: {exc}") from exc
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = [*info.get("missing_keys", []), *(str(k[0]) for k in info.get("mismatched_keys", []))]
        raise GenfusionError(
            f"{key}: its weights lack or mismatch {len(missing)} tensors ({missing[:3]} ...)"
        )
    unet = pipe.unet.config
    stride = 2 ** (len(model.config.conditioning_embedding_out_channels) - 1)
    problems = []
    if model.config.cross_attention_dim != unet.cross_attention_dim:
        problems.append(
            f"reads text of width {model.config.cross_attention_dim},"
            f" the generator's is {unet.cross_attention_dim}"
        )
    if tuple(model.config.block_out_channels) != tuple(unet.block_out_channels):
        problems.append(
            f"has blocks {list(model.config.block_out_channels)}, the generator's UNet"
            f" {list(unet.block_out_channels)}"
        )
    if stride != pipe.vae_scale_factor:
        problems.append(
            f"shrinks its condition {stride} times, the generator's latents are"
            f" {pipe.vae_scale_factor} times smaller"
        )
    if problems:
        raise GenfusionError(
            f"{key}: this ControlNet does not fit the generator: it {'; it '.join(problems)}"
        )
    return model.to(pipe.device)


def load_checkpoint(folder: Path | str, dtype: str, device: str):
    """A dedicated inpainting checkpoint: a local save_pretrained folder of an SD 1.x / 2.x or SDXL
    (inpainting) pipeline, loaded with its family's text-to-image class; every problem is an error
    naming inpaint.checkpoint and the folder."""
    import diffusers

    from genfusion.diffusion.pipelines import _quiet_library_progress_bars, torch_dtype

    _quiet_library_progress_bars()
    folder = Path(folder)
    key = f"inpaint.checkpoint: {folder}"
    if not folder.is_dir():
        raise GenfusionError(f"{key} is not a folder; give a diffusers pipeline folder (save_pretrained)")
    try:
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenfusionError(
            f"{key} is not a diffusers pipeline folder (no readable model_index.json: {exc!r})"
        ) from exc
    if class_name not in CHECKPOINT_CLASSES:
        raise GenfusionError(
            f"{key} holds a {class_name}; only {', '.join(CHECKPOINT_CLASSES)} checkpoints inpaint here"
        )
    pipeline_class = getattr(diffusers, CHECKPOINT_CLASSES[class_name])
    try:
        pipe = pipeline_class.from_pretrained(folder, dtype=torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise GenfusionError(f"{key}: cannot load the pipeline: {exc}") from exc
    if pipe.unet.config.in_channels not in (4, 9):
        raise GenfusionError(
            f"{key}: its UNet reads {pipe.unet.config.in_channels} channels; an inpainting UNet reads 9"
            " (latents, mask, masked image) and a text-to-image one 4"
        )
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except RuntimeError as exc:
        raise GenfusionError(f"diffusion.device: cannot use device {device!r}: {exc}") from exc


def make_inpaintings(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    tiles: Sequence[Tile],
    names: Sequence[str],
    settings: InpaintParams,
    out_dir: Path,
    *,
    prompt: str,
    resolution: int,
    fingerprint: str,
    task: str = "detect",
    state: PartialState | None = None,
    controlnet: Path | str | None = None,
) -> list[dict[str, str]]:
    """Write `settings.per_image` inpainted images on each tile into `out_dir/images|labels/`,
    with `prompt` (the rendered `settings.prompt`). `pipe` is the generator (or a loaded
    inpainting checkpoint); `controlnet` a ControlNetModel folder (main passes
    `settings.controlnet`; `settings.checkpoint` is main's to load)."""
    import torch
    from PIL import Image

    check_resolution(resolution)
    check_prompt(pipe.tokenizer, prompt, "inpaint.prompt")
    control = None if controlnet is None else load_controlnet(controlnet, pipe)
    control_print = "" if controlnet is None else weights_fingerprint(Path(controlnet))[:16]
    inpainter = inpaint_pipeline(pipe, control)
    use_scheduler(inpainter, settings.scheduler)
    pixels = pixel_settings(pipe)
    cell = pipe.vae_scale_factor
    statistics = box_statistics(tiles)
    instances = cut_instances(tiles, settings, task)

    specs: dict[str, tuple[Tile, list[Box]]] = {}
    jobs = []
    for s, tile in enumerate(tiles):
        labels_sha256 = hashlib.sha256(label_text(tile.boxes, names, tile.size, task).encode()).hexdigest()
        for j in range(settings.per_image):
            name = f"{tile.stem}_i{j}"
            seed = settings.seed + s * settings.per_image + j
            boxes = draw_layout(np.random.default_rng(seed), tile, instances, statistics, settings, task)
            row = {
                "file": f"images/{name}.png",
                "label": f"labels/{name}.txt",
                "background": tile.path,
                "background_sha256": tile.sha256,
                "labels_sha256": labels_sha256,
                "boxes": json.dumps(
                    [[b.label, b.x0, b.y0, b.x1, b.y1] for b in boxes], separators=(",", ":")
                ),
                "seed": seed,
                "strength": settings.strength,
                "prompt": prompt,
                "model": fingerprint,
                "controlnet": control_print,
                "controlnet_scale": settings.controlnet_scale if control is not None else "",
                "scheduler": settings.scheduler,
                "steps": settings.steps,
                "guidance": settings.guidance,
                "resolution": resolution,
                "mask_grow": settings.mask_grow,
                "max_occlusion": settings.max_occlusion,
                "task": task,
                **pixels,
            }
            text_row = {k: str(v) for k, v in row.items()}
            specs[text_row["file"]] = (tile, boxes)
            jobs.append(
                ImageJob(text_row["file"], text_row, seed, prompt, tile.path, extras=(text_row["label"],))
            )

    def size_of(job: ImageJob) -> tuple[int, int]:
        return specs[job.file][0].size

    def render(chunk: list[ImageJob]) -> list[tuple[Image.Image, dict[str, bytes]]]:
        size = size_of(chunk[0])
        work = working_size(size, resolution)
        images, masks, maps = [], [], []
        for job in chunk:
            tile, boxes = specs[job.file]
            grown = grown_boxes(boxes, settings.mask_grow, size)
            images.append(Image.fromarray(tile.pixels).resize(work, Image.LANCZOS))
            masks.append(Image.fromarray(working_mask(grown, size, work, cell)))
            if control is not None:
                maps.append(Image.fromarray(layout_map(boxes, size, work)))
        call = {
            "prompt": [job.prompt for job in chunk],
            "image": images,
            "mask_image": masks,
            "width": work[0],
            "height": work[1],
            "strength": settings.strength,
            "guidance_scale": settings.guidance,
            "num_inference_steps": settings.steps,
            "generator": [torch.Generator(pipe.device).manual_seed(job.seed) for job in chunk],
        }
        if control is not None:
            call |= {"control_image": maps, "controlnet_conditioning_scale": settings.controlnet_scale}
        with memory_guard("inpaint", "inpaint.batch"):
            painted = inpainter(**call).images
        made = []
        for job, image in zip(chunk, painted, strict=True):
            tile, boxes = specs[job.file]
            grown = grown_boxes(boxes, settings.mask_grow, size)
            back = np.asarray(image.convert("RGB").resize(size, Image.LANCZOS))
            result = paste_inside(tile.pixels, back, tile_mask(grown, size))
            labels = layout_labels(tile, boxes, grown, settings.max_occlusion)
            text = label_text(labels, names, size, task)
            made.append((Image.fromarray(result), {job.row["label"]: text.encode()}))
        return made

    return run_jobs(
        out_dir,
        jobs,
        INPAINT_COLUMNS,
        render,
        settings.batch,
        "inpaint",
        subdirs=("images", "labels"),
        # One pipeline call takes images of one size.
        batch_key=size_of,
        state=state,
    )


def check_tracked(settings: InpaintParams, checkpoints: Path) -> None:
    """The checkpoint and ControlNet folders must be in `checkpoints`, this stage's DVC
    dependency: elsewhere an edited one would rerun nothing."""
    for key, folder in (
        ("inpaint.checkpoint", settings.checkpoint),
        ("inpaint.controlnet", settings.controlnet),
    ):
        if folder is not None and not Path(folder).resolve().is_relative_to(Path(checkpoints).resolve()):
            raise GenfusionError(
                f"{key}: {folder} is outside {checkpoints}/, so DVC cannot see when it changes; move it"
                f" to {checkpoints}/{Path(folder).name} and version it with `dvc add`"
            )


def main(
    params: Params,
    *,
    subject: str,
    base: Path,
    finetuned: Path | None,
    real: Path,
    out: Path,
    checkpoints: Path = Path("models/checkpoints"),
) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (inpaint.*, diffusion.*,
    classes, task)."""
    from genfusion.diffusion.pipelines import (
        apply_finetune,
        check_model_resolution,
        model_fingerprint,
        open_generator,
        read_finetune,
        render_prompt,
        stage_device,
    )
    from genfusion.launch import process_state

    diffusion, request = params.diffusion, params.inpaint
    check_tracked(request, checkpoints)
    # As in generate: {instance_prompt} is the fine-tune's prompt, the class prompt without one.
    values = {
        "subject": subject,
        "class_prompt": diffusion.class_prompt,
        "instance_prompt": diffusion.class_prompt,
    }
    recorded = read_finetune(finetuned) if finetuned is not None else {}
    values |= {key: recorded[key] for key in ("instance_prompt", "class_prompt") if key in recorded}
    prompt = render_prompt(request.prompt, "inpaint.prompt", **values)
    tiles = load_tiles(real, params.classes)
    state = process_state(diffusion.device)
    fingerprint = model_fingerprint(base, finetuned)
    if request.checkpoint is None:
        pipe = open_generator(diffusion, base, finetuned, state)
    else:
        if recorded.get("method") == "full":
            raise GenfusionError(
                f"inpaint.checkpoint: {request.checkpoint}: the subject's fine-tune ({finetuned}) is a whole"
                " UNet (finetune.method: full), which would replace the inpainting checkpoint's; fine-tune"
                " with finetune.method: lora, or set inpaint.checkpoint: null"
            )
        pipe = load_checkpoint(request.checkpoint, diffusion.dtype, stage_device(diffusion, state))
        check_model_resolution(pipe, diffusion.resolution)
        if finetuned is not None:
            apply_finetune(pipe, finetuned)
        if diffusion.attention_slicing:
            pipe.enable_attention_slicing()
        checkpoint_print = weights_fingerprint(Path(request.checkpoint))
        fingerprint = hashlib.sha256(f"{fingerprint}\n{checkpoint_print}".encode()).hexdigest()[:16]
    make_inpaintings(
        pipe,
        tiles,
        params.classes,
        request,
        out,
        prompt=prompt,
        resolution=diffusion.resolution,
        fingerprint=fingerprint,
        task=params.task,
        state=state,
        controlnet=request.controlnet,
    )
