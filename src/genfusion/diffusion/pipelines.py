"""One loader for every Stable Diffusion model the pipeline uses.

A generator is a base model (the builtin tiny one saved by `base_model`, a local
`save_pretrained` folder or a Hugging Face hub id already in the local cache) plus, optionally,
a fine-tuned subject folder (LoRA weights or a full UNet). SD 1.x and 2.x load as
`StableDiffusionPipeline`, SDXL as `StableDiffusionXLPipeline`; the stages use what the two
share. Nothing is ever downloaded.
torch and diffusers are imported inside the functions so that `genfusion --help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline

    from genfusion.params import DiffusionParams

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
SOURCE_FILE = "source.json"
FINETUNE_FILE = "finetune.json"
# The text encoder's context; CLIP's own length, so prompts that fit a real SD 1.x fit here too.
TINY_MAX_LENGTH = 77
# Inference schedulers by params name (generate.scheduler, variations.scheduler).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# The checkpoints the stages run on, with the resolution each family was trained at (for advice).
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "SD 1.x: 512 px, SD 2.x: 768 px (512 px for the -base models)",
    "StableDiffusionXLPipeline": "SDXL: 1024 px",
}
# diffusion.resolution may be this factor off the model's own before it is refused: far from it,
# a UNet makes repeated or broken objects (SDXL at 512 px, SD 1.x at 1024 px).
RESOLUTION_TOLERANCE = 1.5


def byte_level_tokenizer(max_length: int):
    """A CLIP tokenizer over single bytes: any text tokenizes, no vocabulary download needed."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [f"{s}</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def _quiet_library_progress_bars() -> None:
    """The stages draw their own progress bars; the libraries' per-file load/save bars are noise."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def build_tiny_pipeline(seed: int) -> StableDiffusionPipeline:
    """A tiny SD 1.x-architecture pipeline with random weights (same seed, same weights)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_library_progress_bars()
    tokenizer = byte_level_tokenizer(TINY_MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's noise schedule; generation swaps in the inference scheduler named in params.
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    # Inference mode, as from_pretrained gives: the same seed then gives the same images
    # before and after a save (some layers differ by an ulp between training and eval mode).
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype for a diffusion.dtype name (float32, float16, bfloat16)."""
    import torch

    return getattr(torch, name)


def resolve_source(source: str, revision: str | None) -> Path:
    """The local folder holding `source`: the folder itself, or a hub id's snapshot in the HF cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise GenfusionError(
            f"diffusion.base: {source} is a file; give a pipeline folder (with model_index.json)"
        )
    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except HFValidationError as exc:
        raise GenfusionError(
            f"diffusion.base: {source!r}: no such folder, and not a Hugging Face hub id (owner/name)"
        ) from exc
    except OSError as exc:
        name = source.rsplit("/", 1)[-1]
        raise GenfusionError(
            f"diffusion.base: {source!r} (revision {revision or 'main'}) is not a local folder and not in"
            f" the Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded at run time."
            f" On a machine with internet run `hf download {source} --local-dir models/checkpoints/{name}`"
            f" (`huggingface-cli download` in older huggingface_hub), bring that folder here and set"
            f" diffusion.base: models/checkpoints/{name}"
        ) from exc


def pipeline_class_name(folder: Path) -> str:
    """The pipeline class a checkpoint folder's model_index.json names, checked to be one we run,
    with every component it lists present."""
    index = folder / "model_index.json"
    try:
        entries = json.loads(index.read_text())
        class_name = entries["_class_name"]
    except FileNotFoundError as exc:
        raise GenfusionError(
            f"diffusion.base: {folder} is not a diffusers pipeline folder (no model_index.json);"
            " save one with `pipeline.save_pretrained(folder)` or download a checkpoint in diffusers format"
        ) from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise GenfusionError(f"{index}: not a diffusers model index ({exc!r})") from exc
    if class_name not in SUPPORTED_PIPELINES:
        raise GenfusionError(
            f"diffusion.base: {folder} holds a {class_name}; only {' and '.join(SUPPORTED_PIPELINES)}"
            " checkpoints (Stable Diffusion 1.x / 2.x and SDXL) are supported"
        )
    missing = [
        name
        for name, entry in entries.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and None not in entry
        and not (folder / name).is_dir()
    ]
    if missing:
        raise GenfusionError(
            f"diffusion.base: {folder} lacks {', '.join(f'{name}/' for name in missing)}, which its"
            f" model_index.json lists: the checkpoint is incomplete; download or copy the whole folder again"
        )
    return class_name


def load_pipeline(
    source: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x/2.x or SDXL pipeline from a `save_pretrained` folder or a cached hub id."""
    import diffusers

    _quiet_library_progress_bars()
    folder = resolve_source(source, revision)
    pipeline_class = getattr(diffusers, pipeline_class_name(folder))
    try:
        pipe = pipeline_class.from_pretrained(folder, dtype=torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise GenfusionError(f"diffusion.base: cannot load the pipeline in {folder}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except RuntimeError as exc:
        raise GenfusionError(f"diffusion.device: cannot use device {device!r}: {exc}") from exc


def is_sdxl(pipe) -> bool:
    """SDXL: two text encoders, and a UNet conditioned on pooled text and image size ("time ids")."""
    return type(pipe).__name__.startswith("StableDiffusionXL")


def native_resolution(pipe) -> int:
    """The image side the model was trained at: its UNet's latent side times the autoencoder's stride."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_model_resolution(pipe, resolution: int) -> None:
    """Refuse a diffusion.resolution far from the checkpoint's own, naming the fix."""
    native = native_resolution(pipe)
    if not native / RESOLUTION_TOLERANCE <= resolution <= native * RESOLUTION_TOLERANCE:
        family = SUPPORTED_PIPELINES[type(pipe).__name__.replace("Img2Img", "")]
        raise GenfusionError(
            f"diffusion.resolution: {resolution} px is far from the {native} px this"
            f" {type(pipe).__name__} checkpoint was trained at; set diffusion.resolution: {native}"
            f" ({family})"
        )


def img2img_pipeline(pipe):
    """The image-to-image pipeline of `pipe`'s family on the same loaded components.

    Built directly rather than with `from_pipe`, whose dtype cast logs a spurious float32 warning.
    """
    import inspect

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if is_sdxl(pipe) else StableDiffusionImg2ImgPipeline
    accepted = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in pipe.config.items() if k in accepted and k not in pipe.components}
    img2img = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, **settings)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def pixel_settings(pipe) -> dict[str, str]:
    """What changes a generated image's pixels besides model, prompt, seed and sampler: the
    weights' precision, the device type and sliced attention. Each is a manifest column, so a
    change remakes the images."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    sliced = any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    return {
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "device": pipe.device.type,
        "attention_slicing": str(sliced),
    }


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_fingerprint(folder: Path) -> str:
    """sha256 over every weight and config file of a model folder: relative name, size, content hash.

    Hidden files (e.g. `hf download`'s `.cache/`) and our own `source.json` are left out.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.as_posix() == SOURCE_FILE or any(p.startswith(".") for p in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{path.stat().st_size}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def read_source(base_dir: Path) -> dict:
    """The `source.json` that the base_model stage wrote: which base model, and its fingerprint."""
    path = Path(base_dir) / SOURCE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GenfusionError(
            f"{path}: missing; run the base_model stage first (`dvc repro base_model`)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise GenfusionError(f"{path}: not valid JSON ({exc})") from exc


def read_finetune(finetuned_dir: Path) -> dict:
    path = Path(finetuned_dir) / FINETUNE_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GenfusionError(f"{path}: missing; not a fine-tuned subject folder") from exc
    except json.JSONDecodeError as exc:
        raise GenfusionError(f"{path}: not valid JSON ({exc})") from exc
    if info.get("method") not in ("lora", "full"):
        raise GenfusionError(f"{path}: method must be 'lora' or 'full', got {info.get('method')!r}")
    return info


def apply_finetune(pipe: StableDiffusionPipeline, finetuned_dir: Path) -> None:
    """Put a fine-tuned subject into the pipeline: LoRA weights fused into it, or a whole new UNet."""
    from diffusers import UNet2DConditionModel

    finetuned_dir = Path(finetuned_dir)
    method = read_finetune(finetuned_dir)["method"]
    try:
        if method == "lora":
            pipe.load_lora_weights(finetuned_dir)
            # Fused weights run as fast as the base model; the adapter layers are then dropped.
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:
            unet = UNet2DConditionModel.from_pretrained(
                finetuned_dir / "unet", dtype=pipe.unet.dtype, local_files_only=True
            )
            pipe.unet = unet.to(pipe.device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise GenfusionError(f"{finetuned_dir}: cannot load the {method} fine-tune: {exc}") from exc


def load_generator(
    base_dir: Path,
    finetuned_dir: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attention_slicing: bool = False,
) -> StableDiffusionPipeline:
    """The base model that `base_model` recorded in `base_dir`, plus an optional fine-tuned subject."""
    source = read_source(base_dir)
    if source["base"] == BUILTIN_TINY:
        pipe = load_pipeline(str(base_dir), None, dtype, device)
    else:
        pipe = load_pipeline(source["base"], source.get("revision"), dtype, device)
    if finetuned_dir is not None:
        apply_finetune(pipe, finetuned_dir)
    if attention_slicing:
        pipe.enable_attention_slicing()
    return pipe


def model_fingerprint(base_dir: Path, finetuned_dir: Path | None = None) -> str:
    """A short hash naming the generator (base weights plus fine-tune), for manifests."""
    parts = [read_source(base_dir)["fingerprint"]]
    if finetuned_dir is not None:
        parts.append(weights_fingerprint(finetuned_dir))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def use_scheduler(pipe, name: str) -> None:
    """Swap in the named inference scheduler, keeping the model's noise schedule."""
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def check_prompt(tokenizer, prompt: str, key: str) -> None:
    """Refuse an empty prompt; warn, naming the param and the lost words, when one is too long."""
    if not prompt.strip():
        raise GenfusionError(f"{key}: the prompt is empty; describe the images to generate")
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
        log.warning(
            "%s: the prompt is %d tokens but the text encoder reads %d; this part is cut: %r",
            key,
            len(ids),
            limit,
            cut,
        )


def render_prompt(template: str, key: str, **values: str) -> str:
    """Fill a prompt template's placeholders (e.g. {class_prompt}), naming the param on error."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join(f"{{{k}}}" for k in values)
        raise GenfusionError(f"{key}: cannot fill {template!r} ({exc!r}); placeholders: {known}") from exc


@contextmanager
def memory_guard(stage: str, batch_key: str) -> Iterator[None]:
    """Turn an out-of-memory error into a message that names the knobs that fix it."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        raise GenfusionError(
            f"{stage}: out of memory ({str(exc).splitlines()[0]}); lower {batch_key}, set"
            " diffusion.attention_slicing: true, or lower diffusion.resolution"
        ) from exc


def check_resolution(resolution: int) -> None:
    if resolution % 8:
        raise GenfusionError(
            f"diffusion.resolution: must be a multiple of 8 (the autoencoder's stride), got {resolution}"
        )


def working_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """An image's size scaled so its longer side is `resolution`, each side a multiple of 8: the
    size the model works at on it (img2img variations, inpainting)."""
    scale = resolution / max(size)
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)


def stage_device(diffusion: DiffusionParams, state: PartialState) -> str:
    """diffusion.device, or under several processes each process's own device."""
    return str(state.device) if state.num_processes > 1 else diffusion.device


def open_generator(
    diffusion: DiffusionParams, base_dir: Path, finetuned_dir: Path | None, state: PartialState
) -> StableDiffusionPipeline:
    """The stage's generator on its device, checked against diffusion.resolution."""
    pipe = load_generator(
        base_dir, finetuned_dir, diffusion.dtype, stage_device(diffusion, state), diffusion.attention_slicing
    )
    if read_source(base_dir)["base"] != BUILTIN_TINY:  # the builtin model learns at any resolution
        check_model_resolution(pipe, diffusion.resolution)
    return pipe
