"""`finetune@subject` stage: DreamBooth with prior preservation, as LoRA or full UNet.

One generator per visual subgroup (a *subject*), as in the Genfusion study: the UNet
learns the subject's real train tiles under an instance prompt with an identifier
token, while the prior-preservation loss on class images (made once by the base model
under the class prompt) keeps the class prompt's meaning. The autoencoder and text encoder(s)
stay frozen, in `diffusion.dtype` on the training device, so their outputs are computed once
before the loop. The trained weights (LoRA adapters, or the whole UNet) are float32 under
`accelerate`'s mixed precision (`finetune.mixed_precision`), as in diffusers' DreamBooth
examples; SD 1.x / 2.x and SDXL (two text encoders, size conditioning) train alike.
`finetune.steps` counts optimizer steps of `grad_accum` batches each. Under several processes
(`diffusion.processes`) each draws its own batches and gradients are averaged; the main one
alone logs the loss curve (dvclive) and writes the output.

Output folder (read back by `genfusion.diffusion.pipelines.load_generator`):
- `finetune.json`: method, subject, prompts, the base model's fingerprint, settings;
- LoRA: `pytorch_lora_weights.safetensors` (diffusers' LoRA format);
- full: `unet/` (a UNet2DConditionModel folder).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import fsio, layout
from genfusion.diffusion.pipelines import is_sdxl
from genfusion.errors import GenfusionError
from genfusion.params import FinetuneParams, SubjectParams
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from genfusion.params import Params

log = logging.getLogger(__name__)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# Images per autoencoder call when encoding the instance and class images.
ENCODE_BATCH = 8


def select_instance_images(
    real: Path, subject: str, spec: SubjectParams, classes: Sequence[str]
) -> list[Path]:
    """The real train tiles a subject trains on: by scene, by class present, by file pattern."""
    with (real / layout.MANIFEST).open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "train"]
    wanted_ids = {str(classes.index(c)) for c in spec.select.classes}
    chosen = []
    for row in rows:
        image = real / row["image"]
        if spec.select.scenes and row["scene"] not in spec.select.scenes:
            continue
        if not fnmatch.fnmatch(image.name, spec.select.pattern):
            continue
        if wanted_ids:
            label = layout.label_file(real, image.stem, "train")
            if not wanted_ids & {line.split()[0] for line in label.read_text().splitlines() if line}:
                continue
        chosen.append(image)
    if not chosen:
        raise GenfusionError(
            f"finetune@{subject}: subjects.{subject}.select ({spec.select.model_dump()}) selects none of the"
            f" {len(rows)} real train tiles in {real}"
        )
    return sorted(chosen)


def load_pixels(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    """Images as a (N, 3, R, R) tensor in [-1, 1]: centre square crop, then resize."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(square, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class Condition:
    """A prompt's conditioning of the UNet, computed once by the frozen text encoder(s); SDXL adds
    the pooled embedding of its second encoder and the "time ids" (image size and crop)."""

    embedding: torch.Tensor  # (1, tokens, width)
    pooled: torch.Tensor | None = None  # SDXL: (1, projection width)
    time_ids: torch.Tensor | None = None  # SDXL: (1, 6)

    def unet_kwargs(self, n: int, dtype: torch.dtype) -> dict:
        """The UNet's conditioning arguments for a batch of `n`, in the UNet's input `dtype`."""
        kwargs = {"encoder_hidden_states": self.embedding.expand(n, -1, -1).to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.expand(n, -1).to(dtype),
                "time_ids": self.time_ids.expand(n, -1).to(dtype),
            }
        return kwargs


@dataclass
class Encoded:
    """Frozen-encoder outputs computed once: latent distributions (float32, on the CPU, where the
    batches are drawn) and the prompt's conditioning (on the training device)."""

    mean: torch.Tensor
    std: torch.Tensor
    condition: Condition

    def sample(self, index: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
        import torch

        noise = torch.randn(self.mean[index].shape, generator=generator)
        return (self.mean[index] + self.std[index] * noise) * scale


def encode_prompt(pipe, prompt: str, resolution: int) -> Condition:
    """The prompt's conditioning, by the pipeline's own `encode_prompt` (SDXL: both encoders'
    penultimate layers, and the second's pooled output)."""
    import torch

    device = pipe.device
    with torch.no_grad():
        if not is_sdxl(pipe):
            return Condition(pipe.encode_prompt(prompt, device, 1, False)[0])
        embedding, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
    # Original size, crop corner and target size, as SDXL's pipelines give for an uncropped image
    # of the generated size (diffusers' SDXL DreamBooth example conditions training the same way).
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return Condition(embedding, pooled, time_ids)


def encode(pipe, pixels: torch.Tensor, prompt: str, batch: int = ENCODE_BATCH) -> Encoded:
    """Encode images (batched, on the pipeline's device) and their prompt once for training.

    The autoencoder runs in its own dtype, or in float32 instead of float16 when its config asks
    to be upcast (SDXL's overflows in float16), as diffusers' pipelines do; that cast is made in
    place, so the pipeline is for training afterwards, not for generating."""
    import torch

    vae = pipe.vae
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.float()  # in place; nn.Module's cast, which does not log diffusers' dtype warning
    dtype = vae.dtype
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            chunk = pixels[start : start + batch].to(pipe.device, dtype)
            latent = vae.encode(chunk).latent_dist
            means.append(latent.mean.float().cpu())
            stds.append(latent.std.float().cpu())
    return Encoded(torch.cat(means), torch.cat(stds), encode_prompt(pipe, prompt, pixels.shape[-1]))


def make_accelerator(params: FinetuneParams, device: str) -> Accelerator:
    """accelerate's mixed precision and gradient accumulation; the model is placed by us, on
    `device` (diffusion.device, or each process's own under several processes)."""
    from accelerate import Accelerator

    return Accelerator(
        gradient_accumulation_steps=params.grad_accum,
        mixed_precision="no" if params.mixed_precision == "fp32" else params.mixed_precision,
        cpu=device == "cpu",
        device_placement=False,
    )


def trainable_unet(pipe, params: FinetuneParams):
    """The pipeline's UNet made trainable as diffusers' DreamBooth examples do: LoRA adapters (or,
    full, every weight) in float32, whatever the frozen weights' dtype, so that gradients and
    optimizer state keep full precision under fp16 / bf16 mixed precision."""
    import torch
    from diffusers.training_utils import cast_training_params

    unet = pipe.unet
    pipe.vae.requires_grad_(False)
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.requires_grad_(False)
    if params.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=params.lora_rank,
                lora_alpha=params.lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.float()  # nn.Module's cast: diffusers' `to` logs a spurious warning for it
        unet.requires_grad_(True)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def finetune_unet(
    pipe,
    instance: Encoded,
    prior: Encoded | None,
    params: FinetuneParams,
    log_loss: Callable[[int, float], None],
    accelerator: Accelerator,
) -> object:
    """Train the pipeline's UNet for `params.steps` optimizer steps, each of `params.grad_accum`
    batches; returns the unwrapped UNet. `log_loss(step, loss)` gets each step's loss, averaged
    over its batches and the processes (every process calls it)."""
    import torch
    from diffusers import DDPMScheduler

    # The frozen weights' dtype (LoRA), or float32 (full): what the UNet's first layers take.
    input_dtype = pipe.unet.dtype if params.method == "lora" else torch.float32
    unet = trainable_unet(pipe, params)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    # Each process draws its own batches; process 0 alone reproduces a one-process run.
    generator = torch.Generator().manual_seed(params.seed + accelerator.process_index)
    device = pipe.device
    for step in progress_bar(range(params.steps), "finetune", total=params.steps):
        losses = []
        for _ in range(params.grad_accum):
            with accelerator.accumulate(unet):
                index = torch.randint(len(instance.mean), (params.batch,), generator=generator)
                latents = instance.sample(index, generator, scale)
                conditions = [instance.condition]
                if prior is not None:
                    class_index = torch.randint(len(prior.mean), (params.batch,), generator=generator)
                    latents = torch.cat([latents, prior.sample(class_index, generator, scale)])
                    conditions.append(prior.condition)
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                conditioning = stack_conditions(conditions, params.batch, input_dtype)
                noisy = noisy.to(device, input_dtype)
                prediction = unet(noisy, timesteps.to(device), **conditioning).sample.float()
                target = target.to(device).float()
                if prior is not None:
                    pred_instance, pred_class = prediction.chunk(2)
                    target_instance, target_class = target.chunk(2)
                    instance_loss = torch.nn.functional.mse_loss(pred_instance, target_instance)
                    prior_loss = torch.nn.functional.mse_loss(pred_class, target_class)
                    loss = instance_loss + params.prior_loss_weight * prior_loss
                else:
                    loss = torch.nn.functional.mse_loss(prediction, target)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        if not accelerator.sync_gradients:
            raise RuntimeError("finetune: the optimizer step did not fall on the last accumulated batch")
        log_loss(step, accelerator.reduce(torch.stack(losses).mean(), "mean").item())
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    return unet


def stack_conditions(conditions: Sequence[Condition], n: int, dtype: torch.dtype) -> dict:
    """The UNet's conditioning for `n` images of each condition, in batch order."""
    import torch

    parts = [condition.unet_kwargs(n, dtype) for condition in conditions]
    kwargs = {"encoder_hidden_states": torch.cat([p["encoder_hidden_states"] for p in parts])}
    if "added_cond_kwargs" in parts[0]:
        kwargs["added_cond_kwargs"] = {
            key: torch.cat([p["added_cond_kwargs"][key] for p in parts])
            for key in ("text_embeds", "time_ids")
        }
    return kwargs


def save_finetuned(unet, out: Path, method: str, record: dict, pipeline_class: type) -> None:
    """Write the fine-tuned weights and `finetune.json`; `out` appears only when complete.

    LoRA weights are written in the format of the base model's pipeline class (SD or SDXL), which
    `load_lora_weights` of the same class reads back."""
    with fsio.replace_dir(out) as tmp:
        if method == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            pipeline_class.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        else:
            unet.save_pretrained(tmp / "unet")
        fsio.write_json(tmp / "finetune.json", record)


def main(
    params: Params, *, subject: str, base: Path, real: Path, class_images: Path, out: Path, live: Path
) -> None:
    """Entry point: paths from dvc.yaml, everything else from params. Under several processes every
    process trains on its own batches (gradients averaged); only the main one logs and writes."""
    import torch
    from dvclive import Live

    from genfusion.diffusion.pipelines import (
        BUILTIN_TINY,
        check_model_resolution,
        load_generator,
        memory_guard,
        model_fingerprint,
        read_source,
        stage_device,
    )
    from genfusion.launch import process_state

    spec = params.subject(subject)
    settings = params.finetune_for(subject)
    diffusion = params.diffusion
    torch.manual_seed(settings.seed)
    resolution = diffusion.resolution
    state = process_state(diffusion.device)
    accelerator = make_accelerator(settings, diffusion.device)
    pipe = load_generator(base, None, diffusion.dtype, stage_device(diffusion, state))
    if read_source(base)["base"] != BUILTIN_TINY:
        check_model_resolution(pipe, resolution)
    instance_paths = select_instance_images(real, subject, spec, params.classes)
    log.info(
        "finetune@%s: %s on %d real tiles at %d px, %d steps of %d x %d images on %d process(es)",
        subject,
        settings.method,
        len(instance_paths),
        resolution,
        settings.steps,
        settings.grad_accum,
        settings.batch,
        state.num_processes,
    )
    instance = encode(pipe, load_pixels(instance_paths, resolution), spec.instance_prompt)
    prior = None
    if settings.num_class_images and settings.prior_loss_weight > 0:
        class_paths = layout.image_files(class_images)[: settings.num_class_images]
        if len(class_paths) < settings.num_class_images:
            raise GenfusionError(
                f"finetune@{subject}: {class_images} has {len(class_paths)} class images,"
                f" finetune.num_class_images asks for {settings.num_class_images};"
                f" rerun `dvc repro class_images@{subject}`"
            )
        prior = encode(pipe, load_pixels(class_paths, resolution), spec.class_prompt)

    curves = Live(str(live), dvcyaml=None, save_dvc_exp=False, report=None) if state.is_main_process else None
    with curves or contextlib.nullcontext():

        def log_loss(step: int, loss: float) -> None:
            if curves is not None:
                curves.step = step
                curves.log_metric("loss", loss)

        with memory_guard(f"finetune@{subject}", "finetune.batch"):
            unet = finetune_unet(pipe, instance, prior, settings, log_loss, accelerator)
    record = {
        "method": settings.method,
        "subject": subject,
        "instance_prompt": spec.instance_prompt,
        "class_prompt": spec.class_prompt,
        "base_fingerprint": model_fingerprint(base, None),
        "instance_images": len(instance_paths),
        "class_images": 0 if prior is None else len(prior.mean),
        **settings.model_dump(),
    }
    if state.is_main_process:
        save_finetuned(unet, out, settings.method, record, type(pipe))
    state.wait_for_everyone()
