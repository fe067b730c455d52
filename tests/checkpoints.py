"""Scaled-down Stable Diffusion checkpoints with random weights, saved for the tests.

Each builder saves a diffusers `save_pretrained` folder (model_index.json plus one folder per
component) whose architecture has the shape of a real checkpoint's, so the project's loading
and generation code meets the real model classes, configs and code paths offline; only the
widths, depths and vocabulary are small. The same seed gives byte-identical weight files.

What all three keep: the UNet's block types and their order, layers_per_block 2, the
cross-attention mid block, the attention projection style (conv or linear) and the way the
number of attention heads is given; an AutoencoderKL with 4 blocks of 2 layers, so
vae_scale_factor is 8 as in SD; CLIP text encoders with the real activation functions and a
77-token context; the real noise schedule and prediction type in the scheduler config.

What all three scale down: the native resolution is 64 px (UNet sample_size 8 with the 8x
VAE; SD 1.5 is 512 px, SD 2.1 768 px, SDXL 1024 px); channel counts are the smallest that
group norm (32 groups) allows, 32 and 64; the text encoders have 1 or 2 layers; the tokenizers
are `byte_level_tokenizer(77)`, a CLIPTokenizer over single bytes (514 tokens) instead of CLIP's
49408-token BPE vocabulary, which cannot be downloaded here.

- `save_sd1` (SD 1.5): StableDiffusionPipeline; UNet with CrossAttnDownBlock2D x3 +
  DownBlock2D and the mirrored up blocks, conv attention projections
  (use_linear_projection False) and one attention_head_dim (8, which diffusers reads as 8
  heads, as in SD 1.5's config); channels (32, 64, 64, 64) for (320, 640, 1280, 1280).
  CLIPTextModel with quick_gelu, 32 wide and 2 layers (ViT-L/14: 768 wide, 12 layers), so
  cross_attention_dim is 32 (768). PNDMScheduler with SD 1.5's config, epsilon prediction.
  No safety checker or feature extractor.
- `save_sd2` (SD 2.1): as SD 1.x, but linear attention projections, a per-block
  attention_head_dim tuple (2, 4, 4, 4) giving a constant head width of 16 (SD 2.1:
  (5, 10, 20, 20), head width 64), upcast_attention as in SD 2.1's UNet, and a CLIPTextModel
  with gelu at OpenCLIP ViT-H's full width of 1024 (so cross_attention_dim is 1024, as in
  SD 2) but 1 layer (23) and intermediate_size 64 (4096). DDIMScheduler with SD 2.1's config:
  v_prediction.
- `save_sdxl` (SDXL base 1.0): StableDiffusionXLPipeline with two text encoders, a
  CLIPTextModel (quick_gelu, 32 wide; CLIP ViT-L's 768) and a CLIPTextModelWithProjection
  (gelu, 64 wide; OpenCLIP bigG's 1280), both 2 layers so the penultimate hidden state SDXL
  reads is a transformer layer's output, and two tokenizers. text_encoder_2's projection_dim is
  48 (SDXL: 1280, equal to its width) so that code mixing up width and projection fails here.
  UNet with DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D and the mirrored up blocks,
  transformer_layers_per_block (1, 2, 3) (SDXL: (1, 2, 10), the mid block taking the last),
  linear projections, attention_head_dim (2, 4, 4) (SDXL: (5, 10, 20)), channels (32, 64, 64)
  for (320, 640, 1280), the "text_time" addition embedding with addition_time_embed_dim 16
  (256), projection_class_embeddings_input_dim 6 * 16 + 48 = 144 (6 * 256 + 1280 = 2816) and
  cross_attention_dim 32 + 64 = 96 (768 + 1280 = 2048). VAE with force_upcast and
  scaling_factor 0.13025. EulerDiscreteScheduler with SDXL's config (leading timestep spacing),
  epsilon prediction; force_zeros_for_empty_prompt; no image encoder, no watermarker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from genfusion.diffusion.pipelines import byte_level_tokenizer

MAX_LENGTH = 77
# UNet latent size; with the 8x VAE the native resolution is 64 px.
SAMPLE_SIZE = 8
RESOLUTION = 64

# The noise schedule shared by SD 1.x, SD 2.x and SDXL.
_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """SD's AutoencoderKL: 4 blocks of 2 layers (8x downsampling), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def _text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int, intermediate: int, act: str, **kw
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )


def _sd_unet(cross_attention_dim: int, attention_head_dim: int | tuple[int, ...], linear: bool, **kw):
    """SD 1.x / 2.x's UNet layout: three cross-attention down blocks, then a plain one."""
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        use_linear_projection=linear,
        **kw,
    )


def _eval(*modules: torch.nn.Module) -> None:
    # Inference mode, as from_pretrained gives.
    for module in modules:
        module.eval()


def _save(pipe, folder: Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def _save_sd(folder: Path, **components) -> Path:
    """An SD 1.x / 2.x pipeline of `components`, without safety checker, saved to `folder`."""
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return _save(pipe, folder)


def save_sd1(folder: Path, seed: int = 0) -> Path:
    """Save a scaled-down SD 1.5 (epsilon prediction, conv attention projections) to `folder`."""
    tokenizer = byte_level_tokenizer(MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _sd_unet(cross_attention_dim=32, attention_head_dim=8, linear=False)
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config(tokenizer, 32, 2, 4, 128, "quick_gelu", projection_dim=32))
    _eval(unet, vae, text_encoder)
    scheduler = PNDMScheduler(
        **_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon"
    )
    return _save_sd(
        folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


def save_sd2(folder: Path, seed: int = 0) -> Path:
    """Save a scaled-down SD 2.1 (v-prediction, linear projections, 1024-wide text encoder)."""
    tokenizer = byte_level_tokenizer(MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _sd_unet(
            cross_attention_dim=1024, attention_head_dim=(2, 4, 4, 4), linear=True, upcast_attention=True
        )
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config(tokenizer, 1024, 1, 16, 64, "gelu", projection_dim=512))
    _eval(unet, vae, text_encoder)
    scheduler = DDIMScheduler(
        **_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    )
    return _save_sd(
        folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


def save_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a scaled-down SDXL base (two text encoders, "text_time" added conditioning)."""
    tokenizer = byte_level_tokenizer(MAX_LENGTH)
    tokenizer_2 = byte_level_tokenizer(MAX_LENGTH)
    width_1, width_2, projection_dim, time_dim = 32, 64, 48, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 3),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=width_1 + width_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # Six micro-conditioning numbers (original size, crop offset, target size), each
            # embedded to time_dim, plus text_encoder_2's pooled, projected prompt.
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        )
        vae = _vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(
            _text_config(tokenizer, width_1, 2, 4, 4 * width_1, "quick_gelu", projection_dim=width_1)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, width_2, 2, 4, 4 * width_2, "gelu", projection_dim=projection_dim)
        )
    _eval(unet, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(
        **_SCHEDULE,
        num_train_timesteps=1000,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipe, folder)


ARCHITECTURES: dict[str, Callable[..., Path]] = {"sd1": save_sd1, "sd2": save_sd2, "sdxl": save_sdxl}
