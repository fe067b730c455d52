"""GPU check: fine-tuning, generation, UNet throughput and a YOLO epoch on one CUDA device.

The check a session runs when it is lent a GPU; it needs nothing from the pipeline and downloads
nothing. From the project root (about 8 minutes at most on an H200, model building included):
    .venv/bin/python benchmarks/gpu_check.py
Under the `device` tool the project's .venv does not travel (it is ignored, and too large): there
the command is `PYTHONPATH=src python3 benchmarks/gpu_check.py`, with the packages that machine
lacks (diffusers, ultralytics, pydantic, ...) carried as wheels as its README says, and
`PYTHONUNBUFFERED=1` and a timeout_s of about 540 s.
`--smoke` runs every code path on the CPU at tiny sizes (a scaled-down UNet, 64 px, float32,
2 steps, 2 images, YOLO at 64 px on 8 images) in well under a minute: a check of the code, not
of speed (one torch thread by default: on a shared 2-core machine two threads wait on each
other, 5 to 50 times slower). Without `--smoke` and without CUDA it exits with a one-line message.

It builds a Stable Diffusion 1.5-size pipeline with random weights (the SD 1.5 UNet, autoencoder
and a CLIP ViT-L/14-shaped text encoder; the byte-level tokenizer of
`genfusion.diffusion.pipelines` in place of CLIP's vocabulary), saves it to a temporary folder
and loads it with the project's `load_pipeline` in float16. It prints the device, the versions,
the model and one table, whose rows are:
- LoRA fine-tuning: optimizer steps per second after a warm-up, the project's `make_accelerator`
  + `encode` + `finetune_unet` against a bare diffusers / peft loop doing the same work (same
  UNet and LoRA config, float16 frozen weights, float32 adapters via `cast_training_params`,
  torch.autocast + GradScaler, AdamW, the same instance and prior-preservation images per step,
  drawn from the same cached latents, but on the GPU); ratio genfusion / bare (>= 1.0 is the
  goal). The detail gives images per second and each loop's peak GPU memory (ours / bare).
- generation: images per second of the project's `text_to_image` (manifest, atomic PNG writes)
  against bare `StableDiffusionPipeline.__call__` calls saving PNGs, same model, scheduler,
  steps, guidance, batch and images; median of alternating rounds after a warm-up; ratio as above.
- inpainting: images per second of the `inpaint` stage's `make_inpaintings` (layouts, masks,
  paste inside the mask, labels, manifest, atomic writes) against bench_inpaint.py's bare
  `StableDiffusionInpaintPipeline` loop doing the same work, on random tiles of the generation
  size with 8 random boxes each, the UNet blending latents (4 input channels); median of
  alternating rounds after a warm-up; ratio as above (>= 0.95 is the issue's goal).
- UNet forward: the UNet's achieved TFLOP/s (FLOPs of one forward counted with
  `torch.utils.flop_counter.FlopCounterMode`, times forwards per second) at the generation
  batch doubled by classifier-free guidance, and its share of the device's peak dense fp16
  tensor throughput (from a small table of known devices; "unknown" otherwise). On the CPU the
  counter misses attention, which it counts only for the CUDA kernels.
- YOLOv8n epoch: one Ultralytics training epoch from `yolov8n.yaml` on a synthetic dataset
  (random images and boxes written to a temporary folder), with the project's offline
  configuration, `load_yolo` and the train stage's arguments (`train_args`; mosaic kept on);
  seconds of the epoch (validation excluded; a first epoch, so the data loader's and cuDNN's
  start-up are in it) and images per second.
The last line gives the wall time of the whole run and of each part.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

PROMPT = "an aerial photo of sks tree crowns"
CLASS_PROMPT = "an aerial photo of tree crowns"
MAX_LENGTH = 77
# Peak dense fp16 tensor-core TFLOP/s (fp32 accumulate, no sparsity) by device name; first match wins.
PEAK_FP16_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H200|H100", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.0),
    (r"\bT4\b", 65.0),
)


@dataclass
class Settings:
    device: str
    dtype: str  # diffusion.dtype name
    mixed_precision: str  # finetune.mixed_precision
    resolution: int
    unet_channels: tuple[int, ...]
    cross_attention_dim: int
    vae_channels: tuple[int, ...]
    text_layers: int
    text_heads: int
    text_intermediate: int
    train_images: int  # instance images, and as many class images
    ft_batch: int
    ft_warmup: int
    ft_steps: int
    lora_rank: int
    prior: bool
    gen_images: int
    gen_batch: int
    gen_steps: int
    guidance: float
    repeats: int
    forwards: int
    yolo_images: int
    yolo_imgsz: int
    yolo_batch: int
    yolo_workers: int
    seed: int


def settings_from(args: argparse.Namespace) -> Settings:
    smoke = args.smoke
    chosen = {k: v for k, v in vars(args).items() if v is not None and k not in ("smoke", "threads")}
    model = {
        "resolution": 64 if smoke else 512,
        "unet_channels": (32, 64, 64, 64) if smoke else (320, 640, 1280, 1280),
        "cross_attention_dim": 32 if smoke else 768,
        "vae_channels": (32, 64, 64, 64) if smoke else (128, 256, 512, 512),
        "text_layers": 2 if smoke else 12,
        "text_heads": 4 if smoke else 12,
        "text_intermediate": 128 if smoke else 3072,
    }
    sizes = {
        "train_images": 2 if smoke else 8,
        "ft_batch": 1 if smoke else 4,
        "ft_warmup": 1 if smoke else 5,
        "ft_steps": 2 if smoke else 30,
        "lora_rank": 8,
        "prior": True,
        "gen_images": 2 if smoke else 16,
        "gen_batch": 2 if smoke else 4,
        "gen_steps": 2 if smoke else 20,
        "guidance": 2.0,
        "repeats": 1 if smoke else 3,
        "forwards": 2 if smoke else 20,
        "yolo_images": 8 if smoke else 64,
        "yolo_imgsz": 64 if smoke else 640,
        "yolo_batch": 4 if smoke else 16,
        "yolo_workers": 2,
        "seed": 0,
    }
    return Settings(
        device="cpu" if smoke else "cuda",
        dtype="float32" if smoke else "float16",
        mixed_precision="fp32" if smoke else "fp16",
        **model,
        **(sizes | chosen),
    )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def build_checkpoint(s: Settings, folder: Path) -> Path:
    """An SD 1.5-architecture pipeline with random weights, saved in `s.dtype`."""
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from genfusion.diffusion.pipelines import byte_level_tokenizer

    diffusers.utils.logging.disable_progress_bar()  # save_pretrained's per-file bars
    transformers.utils.logging.disable_progress_bar()
    tokenizer = byte_level_tokenizer(MAX_LENGTH)
    torch.manual_seed(s.seed)
    unet = UNet2DConditionModel(
        sample_size=s.resolution // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=s.unet_channels,
        layers_per_block=2,
        cross_attention_dim=s.cross_attention_dim,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=s.vae_channels,
        layers_per_block=2,
        latent_channels=4,
        sample_size=s.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.cross_attention_dim,
            intermediate_size=s.text_intermediate,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.text_heads,
            hidden_act="quick_gelu",
            max_position_embeddings=MAX_LENGTH,
            projection_dim=s.cross_attention_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for module in (unet, vae, text_encoder):
        module.eval()
        if s.dtype == "float16":
            module.half()  # nn.Module's cast: diffusers' `to` logs a spurious warning for it
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """Smooth random RGB images (upsampled noise), as PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        path = folder / f"{i:03d}.png"
        small.resize((size, size), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def finetune_ours(s: Settings, checkpoint: Path, instance, prior) -> tuple[float, float]:
    """Steps/s of the project's `finetune_unet` after `ft_warmup` steps, and peak GPU GiB.

    `log_loss` is called once a step after the loss's `.item()`, a device sync: its timestamps
    are the step ends."""
    import torch

    from genfusion.diffusion.pipelines import load_pipeline
    from genfusion.params import FinetuneParams
    from genfusion.stages.finetune import finetune_unet, make_accelerator

    params = FinetuneParams(
        method="lora",
        mixed_precision=s.mixed_precision,
        batch=s.ft_batch,
        steps=s.ft_warmup + s.ft_steps,
        lora_rank=s.lora_rank,
        seed=s.seed,
    )
    accelerator = make_accelerator(params, s.device)
    pipe = load_pipeline(str(checkpoint), dtype=s.dtype, device=s.device)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ends: list[float] = []
    finetune_unet(
        pipe, instance, prior, params, lambda step, loss: ends.append(time.perf_counter()), accelerator
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else float("nan")
    del pipe
    free(s.device)
    return s.ft_steps / (ends[-1] - ends[s.ft_warmup - 1]), peak


def finetune_bare(s: Settings, checkpoint: Path, instance, prior) -> tuple[float, float]:
    """Steps/s of a diffusers DreamBooth-LoRA-style loop on the same UNet, latents and conditioning."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    device, fp16 = s.device, s.mixed_precision == "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(
        checkpoint, dtype=getattr(torch, s.dtype), local_files_only=True
    ).to(device)
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=s.lora_rank,
            lora_alpha=s.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    sources = [instance] if prior is None else [instance, prior]
    means = [e.mean.to(device) for e in sources]
    stds = [e.std.to(device) for e in sources]
    hidden = torch.cat([e.condition.embedding.expand(s.ft_batch, -1, -1) for e in sources]).to(unet.dtype)
    generator = torch.Generator(device).manual_seed(s.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(s.ft_warmup + s.ft_steps):
        if step == s.ft_warmup:
            sync(device)
            start = time.perf_counter()
        parts = []
        for mean, std in zip(means, stds, strict=True):
            index = torch.randint(len(mean), (s.ft_batch,), device=device, generator=generator)
            noise = torch.randn(mean[index].shape, device=device, generator=generator)
            parts.append((mean[index] + std[index] * noise) * scale)
        latents = torch.cat(parts)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device, generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)
        with torch.autocast(device, dtype=torch.float16, enabled=fp16):
            prediction = unet(noisy, timesteps, hidden).sample.float()
        if prior is not None:
            pred_instance, pred_class = prediction.chunk(2)
            noise_instance, noise_class = noise.chunk(2)
            loss = F.mse_loss(pred_instance, noise_instance) + F.mse_loss(pred_class, noise_class)
        else:
            loss = F.mse_loss(prediction, noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    sync(device)
    rate = s.ft_steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del pipe, unet, optimizer
    free(device)
    return rate, peak


def bench_finetune(s: Settings, checkpoint: Path, tmp: Path) -> dict:
    from genfusion.diffusion.pipelines import load_pipeline
    from genfusion.stages.finetune import encode, load_pixels

    # The frozen encoders' outputs, computed once by the project's `encode` and used by both loops.
    pipe = load_pipeline(str(checkpoint), dtype=s.dtype, device=s.device)
    instance_paths = write_images(tmp / "instance", s.train_images, s.resolution, s.seed)
    instance = encode(pipe, load_pixels(instance_paths, s.resolution), PROMPT)
    prior = None
    if s.prior:
        class_paths = write_images(tmp / "class", s.train_images, s.resolution, s.seed + 1)
        prior = encode(pipe, load_pixels(class_paths, s.resolution), CLASS_PROMPT)
    del pipe
    free(s.device)
    seed_everything(s.seed)
    bare, bare_peak = finetune_bare(s, checkpoint, instance, prior)
    seed_everything(s.seed)
    ours, ours_peak = finetune_ours(s, checkpoint, instance, prior)
    return {"ours": ours, "bare": bare, "ours_peak": ours_peak, "bare_peak": bare_peak}


def bare_generate(pipe, s: Settings, n: int, out: Path) -> None:
    """What a user writes with diffusers alone: batched calls, a seeded generator per image, PNGs."""
    import torch

    out.mkdir(parents=True)
    for first in range(0, n, s.gen_batch):
        indices = range(first, min(first + s.gen_batch, n))
        images = pipe(
            prompt=[PROMPT] * len(indices),
            height=s.resolution,
            width=s.resolution,
            num_inference_steps=s.gen_steps,
            guidance_scale=s.guidance,
            generator=[torch.Generator(pipe.device).manual_seed(i) for i in indices],
        ).images
        for i, image in zip(indices, images, strict=True):
            image.save(out / f"{i:05d}.png")


def bench_inpainting(s: Settings, checkpoint: Path, tmp: Path) -> dict:
    """Images per second of the inpaint stage's `make_inpaintings` and of a bare
    `StableDiffusionInpaintPipeline` loop doing the same work (bench_inpaint.py's two loops), on
    `gen_images` random tiles of `resolution` px with 8 random boxes each, median of alternating
    rounds after a warm-up."""
    import numpy as np
    from bench_inpaint import bare, ours  # beside this file

    from genfusion.boxes import Box
    from genfusion.diffusion.pipelines import load_pipeline
    from genfusion.params import InpaintParams
    from genfusion.stages.composite import Tile

    pipe = load_pipeline(str(checkpoint), dtype=s.dtype, device=s.device)
    rng = np.random.default_rng(s.seed)
    side, tiles = s.resolution, []
    for k in range(s.gen_images):
        boxes = []
        for _ in range(8):
            w, h = (int(v) for v in rng.integers(side // 16, side // 6, 2))
            x, y = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
            boxes.append(Box("tree", x, y, x + w, y + h))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        tiles.append(Tile(f"tile{k:03d}", tmp / f"tile{k:03d}.png", pixels, tuple(boxes), f"{k:064x}"))
    settings = InpaintParams(
        per_image=1, batch=s.gen_batch, steps=s.gen_steps, guidance=s.guidance, min_size=2
    )
    loops = {"ours": ours, "bare": bare}
    timings: dict[str, list[float]] = {"ours": [], "bare": []}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        for name, loop in loops.items():
            loop(
                pipe,
                tiles[: s.gen_batch],
                settings,
                ["tree"],
                "detect",
                PROMPT,
                s.resolution,
                tmp / f"warm-{name}",
            )
        for r in range(s.repeats):
            for name in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                sync(s.device)
                seconds = loops[name](
                    pipe, tiles, settings, ["tree"], "detect", PROMPT, s.resolution, tmp / f"{name}{r}"
                )
                sync(s.device)
                timings[name].append(seconds)
    return {name: s.gen_images / statistics.median(times) for name, times in timings.items()}


def bench_generation_and_flops(s: Settings, checkpoint: Path, tmp: Path) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from genfusion.diffusion.pipelines import load_pipeline
    from genfusion.diffusion.text_to_image import text_to_image
    from genfusion.params import GenerateParams

    pipe = load_pipeline(str(checkpoint), dtype=s.dtype, device=s.device)
    sampler = GenerateParams(steps=s.gen_steps, batch=s.gen_batch, guidance=s.guidance, scheduler="ddim")

    def ours(out: Path, n: int) -> None:
        text_to_image(
            pipe,
            sampler,
            out,
            prompts=[PROMPT],
            count=n,
            seed=0,
            resolution=s.resolution,
            subject="bench",
            fingerprint="bench",
        )

    def bare(out: Path, n: int) -> None:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        bare_generate(pipe, s, n, out)

    timings: dict[str, list[float]] = {"ours": [], "bare": []}
    with warnings.catch_warnings():
        # Random weights may decode to NaN pixels in float16; numpy warns when casting them.
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        ours(tmp / "warm-ours", s.gen_batch)
        bare(tmp / "warm-bare", s.gen_batch)
        for r in range(s.repeats):
            # Alternate the order, so warm caches favour neither.
            for name in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                sync(s.device)
                start = time.perf_counter()
                (ours if name == "ours" else bare)(tmp / f"{name}{r}", s.gen_images)
                sync(s.device)
                timings[name].append(time.perf_counter() - start)
    result = {name: s.gen_images / statistics.median(times) for name, times in timings.items()}

    # The UNet alone, at the batch the generation above runs it (doubled by classifier-free guidance).
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    n = 2 * s.gen_batch
    latent = s.resolution // 8
    generator = torch.Generator(s.device).manual_seed(s.seed)
    sample = torch.randn((n, 4, latent, latent), generator=generator, device=s.device, dtype=unet.dtype)
    hidden = torch.randn(
        (n, MAX_LENGTH, s.cross_attention_dim), generator=generator, device=s.device, dtype=unet.dtype
    )
    timestep = torch.full((n,), 500, device=s.device)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, timestep, hidden)
        flops = counter.get_total_flops()
        for _ in range(min(3, s.forwards)):
            unet(sample, timestep, hidden)
        sync(s.device)
        start = time.perf_counter()
        for _ in range(s.forwards):
            unet(sample, timestep, hidden)
        sync(s.device)
        seconds = (time.perf_counter() - start) / s.forwards
    return result | {"flops": flops, "forward_s": seconds, "tflops": flops / seconds / 1e12}


def write_yolo_dataset(folder: Path, n: int, size: int, seed: int) -> Path:
    """`n` random images with 1-6 random boxes each (2 classes), YOLO layout; its data yaml."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = folder / "images" / "train", folder / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        image.save(images / f"{i:04d}.jpg", quality=90)
        rows = []
        for _ in range(rng.integers(1, 7)):
            w, h = rng.uniform(0.05, 0.3, 2)
            x, y = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
            rows.append(f"{rng.integers(0, 2)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}")
        (labels / f"{i:04d}.txt").write_text("\n".join(rows) + "\n")
    data = folder / "dataset.yaml"
    data.write_text(
        f"path: {folder}\ntrain: images/train\nval: images/train\nnames:\n  0: tree\n  1: shrub\n"
    )
    return data


def bench_yolo(s: Settings, tmp: Path) -> dict:
    from genfusion.integrations.ultralytics import configure_offline, load_yolo
    from genfusion.params import TrainParams
    from genfusion.stages.train import train_args

    configure_offline()  # before Ultralytics is first imported
    if s.device == "cuda":
        import ultralytics.engine.trainer

        # Ultralytics' AMP check downloads yolo26n.pt to compare outputs; offline it can only fail
        # (or wait on the network). Skip it and keep AMP on, as the check passes on these GPUs.
        ultralytics.engine.trainer.check_amp = lambda model: True
    data = write_yolo_dataset(tmp / "yolo", s.yolo_images, s.yolo_imgsz, s.seed)
    params = TrainParams(
        model="yolov8n.yaml",
        epochs=1,
        same_steps=False,
        imgsz=s.yolo_imgsz,
        batch=s.yolo_batch,
        workers=s.yolo_workers,
        device="0" if s.device == "cuda" else "cpu",
        close_mosaic=0,  # mosaic on, as in all but the last epochs of a run
    )
    marks: dict[str, float] = {}

    def mark(name: str):
        def callback(trainer) -> None:
            sync(s.device)
            marks[name] = time.perf_counter()

        return callback

    model = load_yolo(params.model)
    model.add_callback("on_train_epoch_start", mark("start"))
    model.add_callback("on_train_epoch_end", mark("end"))
    start = time.perf_counter()
    model.train(
        data=str(data),
        project=str(tmp / "runs"),
        name="yolo",
        exist_ok=True,
        plots=False,
        verbose=False,
        **train_args(params, seed=s.seed, counts={}),
    )
    total = time.perf_counter() - start
    epoch = marks["end"] - marks["start"]
    return {"epoch_s": epoch, "images_s": s.yolo_images / epoch, "total_s": total}


def peak_tflops(name: str) -> float | None:
    return next((peak for pattern, peak in PEAK_FP16_TFLOPS if re.search(pattern, name)), None)


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("check", "genfusion", "bare library", "genfusion / bare", "detail")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            c.ljust(w) if i in (0, 4) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|" + "|".join("-" * (w + 1) + (":" if i in (1, 2, 3) else "-") for i, w in enumerate(widths)) + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code paths")
    parser.add_argument("--ft-steps", type=int, help="timed fine-tuning steps (30; smoke 2)")
    parser.add_argument("--ft-warmup", type=int, help="fine-tuning steps before timing (5; smoke 1)")
    parser.add_argument("--ft-batch", type=int, help="instance images per step, 1..4 (4; smoke 1)")
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, help="prior preservation (on)")
    parser.add_argument("--gen-images", type=int, help="images per timed generation round (16; smoke 2)")
    parser.add_argument("--gen-batch", type=int, help="generation batch (4; smoke 2)")
    parser.add_argument("--gen-steps", type=int, help="DDIM steps (20; smoke 2)")
    parser.add_argument("--repeats", type=int, help="generation rounds of each (3; smoke 1)")
    parser.add_argument("--forwards", type=int, help="timed UNet forwards (20; smoke 2)")
    parser.add_argument("--yolo-images", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, default=1, help="--smoke: torch threads (1)")
    args = parser.parse_args()
    if args.ft_batch is not None and not 1 <= args.ft_batch <= 4:
        parser.error("--ft-batch: 1..4")
    if args.ft_steps is not None and args.ft_steps < 1 or args.ft_warmup is not None and args.ft_warmup < 1:
        parser.error("--ft-steps and --ft-warmup: at least 1")

    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine, or with --smoke to check the code")
    s = settings_from(args)
    if args.smoke:
        torch.set_num_threads(args.threads)
    import accelerate
    import diffusers
    import peft
    import transformers
    import ultralytics

    device_name = torch.cuda.get_device_name(0) if s.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    smoke = "; SMOKE run (tiny sizes: its figures mean nothing)" if args.smoke else ""
    print(f"device: {device_name}; {torch.get_num_threads()} torch threads{smoke}")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__},"
        f" transformers {transformers.__version__}, peft {peft.__version__},"
        f" accelerate {accelerate.__version__}, ultralytics {ultralytics.__version__}"
    )
    model = (
        f"UNet {s.unet_channels} cross-attention {s.cross_attention_dim}, VAE {s.vae_channels},"
        f" CLIP text {s.cross_attention_dim} x {s.text_layers} layers"
    )
    print(f"model: SD 1.x architecture, random weights, {s.dtype}: {model}; seed {s.seed}")

    wall = time.perf_counter()
    phases: dict[str, float] = {}
    seed_everything(s.seed)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        checkpoint = build_checkpoint(s, tmp / "checkpoint")
        phases["build"] = time.perf_counter() - start

        start = time.perf_counter()
        ft = bench_finetune(s, checkpoint, tmp / "finetune")
        phases["fine-tuning"] = time.perf_counter() - start
        seed_everything(s.seed)
        start = time.perf_counter()
        gen = bench_generation_and_flops(s, checkpoint, tmp / "generate")
        free(s.device)
        phases["generation + UNet"] = time.perf_counter() - start
        seed_everything(s.seed)
        start = time.perf_counter()
        paint = bench_inpainting(s, checkpoint, tmp / "inpaint")
        free(s.device)
        phases["inpainting"] = time.perf_counter() - start
        seed_everything(s.seed)
        start = time.perf_counter()
        yolo = bench_yolo(s, tmp / "yolo")
        phases["YOLO"] = time.perf_counter() - start

    per_step = s.ft_batch * (2 if s.prior else 1)
    prior = f"batch {s.ft_batch} + {s.ft_batch} prior" if s.prior else f"batch {s.ft_batch}, no prior"
    peak = peak_tflops(device_name) if s.device == "cuda" else None
    share = f"{100 * gen['tflops'] / peak:.1f} % of {peak:.0f} peak" if peak else "unknown share of peak"
    memory = f"; peak {ft['ours_peak']:.1f} / {ft['bare_peak']:.1f} GiB" if s.device == "cuda" else ""
    rows = [
        (
            f"LoRA fine-tuning, {s.resolution} px, {s.mixed_precision}, {prior}, rank {s.lora_rank}",
            f"{ft['ours']:.2f} steps/s",
            f"{ft['bare']:.2f} steps/s",
            f"{ft['ours'] / ft['bare']:.2f}",
            f"{s.ft_steps} steps after {s.ft_warmup}; {ft['ours'] * per_step:.1f} images/s ours{memory}",
        ),
        (
            f"generation, {s.resolution} px, {s.dtype}, {s.gen_steps} DDIM steps, batch {s.gen_batch}",
            f"{gen['ours']:.2f} images/s",
            f"{gen['bare']:.2f} images/s",
            f"{gen['ours'] / gen['bare']:.2f}",
            f"{s.gen_images} images, guidance {s.guidance}, median of {s.repeats} rounds",
        ),
        (
            f"inpainting, {s.resolution} px, {s.dtype}, {s.gen_steps} DDIM steps x 0.9, batch {s.gen_batch}",
            f"{paint['ours']:.2f} images/s",
            f"{paint['bare']:.2f} images/s",
            f"{paint['ours'] / paint['bare']:.2f}",
            f"{s.gen_images} tiles, 8 boxes each, median of {s.repeats} rounds",
        ),
        (
            f"UNet forward, {s.resolution} px, {s.dtype}, batch 2 x {s.gen_batch}",
            "-",
            f"{gen['tflops']:.3g} TFLOP/s",
            "-",
            f"{share}; {gen['flops'] / 1e9:.4g} GFLOP per forward, {1000 * gen['forward_s']:.1f} ms",
        ),
        (
            f"YOLOv8n epoch, {s.yolo_images} images, {s.yolo_imgsz} px, batch {s.yolo_batch}",
            f"{yolo['epoch_s']:.2f} s",
            "-",
            "-",
            f"{yolo['images_s']:.1f} images/s; train() {yolo['total_s']:.1f} s with validation",
        ),
    ]
    print(table(rows))
    print(
        f"wall time {time.perf_counter() - wall:.0f} s: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    )


if __name__ == "__main__":
    main()
