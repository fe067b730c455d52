"""`finetune@subject` stage: DreamBooth with prior preservation, as LoRA or full UNet.

One generator per visual subgroup (a *subject*), as in the Genfusion study: the UNet
learns the subject's real train tiles under an instance prompt with an identifier
token, while the prior-preservation loss on class images (made once by the base model
under the class prompt) keeps the class prompt's meaning. The VAE and text encoder stay
frozen, so their outputs are computed once before the loop. `accelerate` places the
model and runs mixed precision and gradient accumulation; `accelerate launch` runs the
same command on several GPUs. The loss curve goes to dvclive.

Output folder (read back by `genfusion.diffusion.pipelines.load_generator`):
- `finetune.json`: method, subject, prompts, the base model's fingerprint, settings;
- LoRA: `pytorch_lora_weights.safetensors` (diffusers' LoRA format);
- full: `unet/` (a UNet2DConditionModel folder).
"""

from __future__ import annotations

import csv
import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import fsio, layout
from genfusion.errors import GenfusionError
from genfusion.params import FinetuneParams, SubjectParams
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    import torch

    from genfusion.params import Params

log = logging.getLogger(__name__)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


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
class Encoded:
    """Frozen-encoder outputs computed once: latent distributions and prompt embeddings."""

    mean: torch.Tensor
    std: torch.Tensor
    prompt_embedding: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
        import torch

        noise = torch.randn(self.mean[index].shape, generator=generator)
        return (self.mean[index] + self.std[index] * noise) * scale


def encode(pipe, pixels: torch.Tensor, prompt: str, batch: int = 8) -> Encoded:
    import torch

    with torch.no_grad():
        parts = [pipe.vae.encode(pixels[i : i + batch]).latent_dist for i in range(0, len(pixels), batch)]
        tokens = pipe.tokenizer(
            prompt,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embedding = pipe.text_encoder(tokens)[0]
    return Encoded(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]), embedding)


def finetune_unet(pipe, instance: Encoded, prior: Encoded | None, params: FinetuneParams, log_loss) -> object:
    """Train `pipe.unet` in place (LoRA adapters or all weights); returns the unwrapped UNet."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    accelerator = Accelerator(
        gradient_accumulation_steps=params.grad_accum,
        mixed_precision="no" if params.mixed_precision == "fp32" else params.mixed_precision,
    )
    unet = pipe.unet
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
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
    else:
        unet.requires_grad_(True)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    # Each process draws its own batches; process 0 alone reproduces a one-GPU run.
    generator = torch.Generator().manual_seed(params.seed + accelerator.process_index)
    device = accelerator.device
    for step in progress_bar(range(params.steps), "finetune", total=params.steps):
        with accelerator.accumulate(unet):
            index = torch.randint(len(instance.mean), (params.batch,), generator=generator)
            latents = instance.sample(index, generator, scale)
            embeddings = instance.prompt_embedding.expand(params.batch, -1, -1)
            if prior is not None:
                class_index = torch.randint(len(prior.mean), (params.batch,), generator=generator)
                latents = torch.cat([latents, prior.sample(class_index, generator, scale)])
                embeddings = torch.cat([embeddings, prior.prompt_embedding.expand(params.batch, -1, -1)])
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            prediction = unet(noisy.to(device), timesteps.to(device), embeddings.to(device)).sample.float()
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
        log_loss(step, loss.item())
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    return unet


def save_finetuned(unet, out: Path, method: str, record: dict) -> None:
    """Write the fine-tuned weights and `finetune.json`; `out` appears only when complete."""
    with fsio.replace_dir(out) as tmp:
        if method == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        else:
            unet.save_pretrained(tmp / "unet")
        fsio.write_json(tmp / "finetune.json", record)


def main(
    params: Params, *, subject: str, base: Path, real: Path, class_images: Path, out: Path, live: Path
) -> None:
    import torch
    from dvclive import Live

    from genfusion.diffusion.pipelines import load_generator, memory_guard, model_fingerprint

    spec = params.subject(subject)
    settings = params.finetune_for(subject)
    torch.manual_seed(settings.seed)
    resolution = params.diffusion.resolution
    pipe = load_generator(base, None, params.diffusion.dtype, "cpu")
    instance_paths = select_instance_images(real, subject, spec, params.classes)
    log.info(
        "finetune@%s: %s on %d real tiles at %d px, %d steps",
        subject,
        settings.method,
        len(instance_paths),
        resolution,
        settings.steps,
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

    with Live(str(live), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log_loss(step: int, loss: float) -> None:
            live.step = step
            live.log_metric("loss", loss)

        with memory_guard(f"finetune@{subject}", "finetune.batch"):
            unet = finetune_unet(pipe, instance, prior, settings, log_loss)
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
    save_finetuned(unet, out, settings.method, record)
