"""`base_model` stage: the Stable Diffusion model every generator starts from.

`diffusion.base: builtin:tiny` builds a tiny SD 1.x-architecture model and pretrains it on
the real train tiles (its autoencoder first, then its UNet on noise prediction), so that it
runs offline on a CPU; it is saved with `save_pretrained`, the same format as a real
checkpoint. Any other `diffusion.base` (a local folder or a cached hub id) is loaded once to
check it and recorded, not copied: `source.json` names it and fingerprints its weights, so
downstream stages rerun when the weights change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import fsio, layout
from genfusion.diffusion.pipelines import (
    BUILTIN_TINY,
    SOURCE_FILE,
    build_tiny_pipeline,
    check_model_resolution,
    check_prompt,
    load_pipeline,
    memory_guard,
    resolve_source,
    weights_fingerprint,
)
from genfusion.errors import GenfusionError
from genfusion.images import open_image, to_rgb
from genfusion.params import DiffusionParams
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from genfusion.params import Params

log = logging.getLogger(__name__)

# Share of UNet steps trained on the empty prompt, so classifier-free guidance has an
# unconditional model to push away from (Stable Diffusion drops 10% of captions too).
UNCOND_FRACTION = 0.1
WARMUP_STEPS = 20


def load_train_tiles(real: Path) -> list[np.ndarray]:
    """The real train tiles as 8-bit RGB arrays (height, width, 3), in file-name order."""
    folder = layout.images_dir(real, "train")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise GenfusionError(f"base_model: no train tiles in {folder}; run the seeds stage first")
    tiles = []
    for path in paths:
        with open_image(path) as raw:
            tiles.append(np.array(to_rgb(raw, path)[0]))
    return tiles


class TileSampler:
    """Random square crops of the real tiles, resized to `resolution`, randomly flipped and rotated.

    A crop keeps at least half the tile's side, so samples show the ground at about the scale
    of a whole tile shrunk to `resolution` (what a generated image stands in for). Aerial and
    microscope images have no "up", hence the rotations.
    """

    def __init__(self, tiles: Sequence[np.ndarray], resolution: int, generator: torch.Generator) -> None:
        import torch

        self.tiles = [torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1) for t in tiles]
        self.resolution = resolution
        self.generator = generator

    def _randint(self, low: int, high: int) -> int:
        import torch

        return int(torch.randint(low, high, (1,), generator=self.generator))

    def sample(self, n: int) -> torch.Tensor:
        """A batch (n, 3, resolution, resolution) scaled to [-1, 1]."""
        import torch
        import torch.nn.functional as F

        out = []
        for _ in range(n):
            tile = self.tiles[self._randint(0, len(self.tiles))]
            height, width = tile.shape[1:]
            side = min(height, width)
            crop = self._randint(min(side, max(self.resolution, side // 2)), side + 1)
            y, x = self._randint(0, height - crop + 1), self._randint(0, width - crop + 1)
            pixels = tile[:, y : y + crop, x : x + crop].float()[None] / 127.5 - 1
            pixels = F.interpolate(pixels, size=(self.resolution,) * 2, mode="bilinear", antialias=True)[0]
            pixels = torch.rot90(pixels, self._randint(0, 4), dims=(1, 2))
            out.append(pixels.flip(2) if self._randint(0, 2) else pixels)
        return torch.stack(out)


def train_loop(
    module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int, lr: float, description: str
) -> float:
    """AdamW with warm-up and cosine decay; returns the mean loss of the last tenth of the steps."""
    import torch

    if steps == 0:
        module.requires_grad_(False)
        return math.nan
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    losses = []
    with memory_guard("base_model", "diffusion.pretrain_batch"):
        for _ in progress_bar(range(steps), description, total=steps):
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    module.eval()
    module.requires_grad_(False)
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def pretrain_tiny(tiles: Sequence[np.ndarray], params: DiffusionParams) -> StableDiffusionPipeline:
    """Build the builtin tiny model and pretrain it on the tiles (deterministic for params.seed)."""
    import torch
    import torch.nn.functional as F

    pipe = build_tiny_pipeline(params.seed)
    check_prompt(pipe.tokenizer, params.class_prompt, "diffusion.class_prompt")
    generator = torch.Generator().manual_seed(params.seed)
    sampler = TileSampler(tiles, params.resolution, generator)
    vae, unet, batch = pipe.vae, pipe.unet, params.pretrain_batch
    pipe.text_encoder.requires_grad_(False)
    started = time.perf_counter()

    # The autoencoder is fully convolutional: half-size crops teach it the same textures at a
    # quarter of the cost.
    half = params.resolution // 2

    def vae_loss() -> torch.Tensor:
        x = sampler.sample(batch)[:, :, :half, :half]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        return F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

    vae_final = train_loop(
        vae, vae_loss, params.pretrain_vae_steps, params.pretrain_lr, "base_model: autoencoder"
    )
    with torch.no_grad():
        latents = vae.encode(sampler.sample(4 * batch)).latent_dist.mean
    # Unit-variance latents, as Stable Diffusion's 0.18215 gives for its own autoencoder.
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())

    with torch.no_grad():
        tokens = pipe.tokenizer(
            [params.class_prompt, ""],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        conditions = pipe.text_encoder(tokens.input_ids)[0]
    noise_schedule = pipe.scheduler

    def unet_loss() -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(sampler.sample(batch)).latent_dist.sample(generator=generator)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        uncond = torch.rand(batch, generator=generator) < UNCOND_FRACTION
        prompt_embeds = conditions[uncond.long()]
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        return F.mse_loss(unet(noisy, timesteps, prompt_embeds).sample, noise)

    unet_final = train_loop(unet, unet_loss, params.pretrain_steps, params.pretrain_lr, "base_model: UNet")
    log.info(
        "base_model: pretrained the tiny model in %.0f s (autoencoder L1 %.4f, UNet noise MSE %.4f)",
        time.perf_counter() - started,
        vae_final,
        unet_final,
    )
    return pipe


def save_builtin(pipe: StableDiffusionPipeline, folder: Path) -> None:
    """The builtin model as this stage writes it: the saved pipeline plus its source.json."""
    pipe.save_pretrained(folder)
    fsio.write_json(
        Path(folder) / SOURCE_FILE, {"base": BUILTIN_TINY, "fingerprint": weights_fingerprint(folder)}
    )


def check_tracked(base: str, checkpoints: Path) -> None:
    """A local checkpoint folder must be in `checkpoints`, this stage's DVC dependency: elsewhere
    an edited checkpoint would rerun nothing. A hub id names a fixed snapshot by its revision."""
    folder = Path(base)
    if folder.is_dir() and not folder.resolve().is_relative_to(checkpoints.resolve()):
        raise GenfusionError(
            f"diffusion.base: {base} is outside {checkpoints}/, so DVC cannot see when it changes;"
            f" move or copy it to {checkpoints}/{folder.name}, version it with"
            f" `dvc add {checkpoints}/{folder.name}` and set diffusion.base: {checkpoints}/{folder.name}"
        )


def describe_external(params: DiffusionParams) -> dict:
    """Load an external checkpoint once to check it; its source record with a weights fingerprint."""
    # Loading on the CPU checks the files and their format without needing the GPU here.
    pipe = load_pipeline(params.base, params.revision, params.dtype, "cpu")
    check_model_resolution(pipe, params.resolution)
    folder = resolve_source(params.base, params.revision)
    log.info("base_model: fingerprinting the weights in %s", folder)
    return {"base": params.base, "revision": params.revision, "fingerprint": weights_fingerprint(folder)}


def main(params: Params, *, real: Path, out: Path, checkpoints: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params.diffusion."""
    settings = params.diffusion
    if settings.base != BUILTIN_TINY:
        check_tracked(settings.base, checkpoints)
        source = describe_external(settings)
        with fsio.replace_dir(out) as scratch:
            fsio.write_json(scratch / SOURCE_FILE, source)
        return
    pipe = pretrain_tiny(load_train_tiles(real), settings)
    with fsio.replace_dir(out) as scratch:
        save_builtin(pipe, scratch)
