"""The scaled-down SD 1.x / 2.x / XL checkpoints of tests/checkpoints.py: reproducible, loadable
by diffusers as their real architecture, and able to generate (text-to-image and img2img)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import ARCHITECTURES, RESOLUTION
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
# name: pipeline class, prediction type, cross_attention_dim, use_linear_projection
EXPECTED = {
    "sd1": (StableDiffusionPipeline, "epsilon", 32, False),
    "sd2": (StableDiffusionPipeline, "v_prediction", 1024, True),
    "sdxl": (StableDiffusionXLPipeline, "epsilon", 96, True),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(name, folder, a second folder saved with the same seed)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    return name, ARCHITECTURES[name](root / "a", seed=0), ARCHITECTURES[name](root / "b", seed=0)


@pytest.fixture(scope="module")
def loaded(saved) -> tuple[str, DiffusionPipeline]:
    name, folder, _ = saved
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return name, pipe


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files(saved, tmp_path: Path) -> None:
    name, first, second = saved
    files = _files(first)
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    assert files == _files(second)  # weights, configs and tokenizers, byte for byte
    other = ARCHITECTURES[name](tmp_path / "seed1", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != files[unet]


def test_loads_as_its_architecture(loaded) -> None:
    name, pipe = loaded
    cls, prediction, cross_dim, linear = EXPECTED[name]
    assert type(pipe) is cls
    assert pipe.scheduler.config.prediction_type == prediction
    unet = pipe.unet.config
    assert (unet.cross_attention_dim, unet.use_linear_projection) == (cross_dim, linear)
    assert pipe.vae_scale_factor == 8 and unet.sample_size * pipe.vae_scale_factor == RESOLUTION
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    if name == "sdxl":
        assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection) and pipe.tokenizer_2 is not None
        text, text_2 = pipe.text_encoder.config, pipe.text_encoder_2.config
        assert cross_dim == text.hidden_size + text_2.hidden_size
        assert unet.addition_embed_type == "text_time"
        assert unet.projection_class_embeddings_input_dim == (
            6 * unet.addition_time_embed_dim + text_2.projection_dim
        )
    else:
        assert cross_dim == pipe.text_encoder.config.hidden_size


def test_text_to_image(loaded) -> None:
    _, pipe = loaded
    # No height / width: the pipeline's default is the checkpoint's native 64 px.
    images = pipe("a tree", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3)
    assert np.isfinite(images).all()


def test_img2img(loaded) -> None:
    name, pipe = loaded
    if name == "sdxl":
        img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    else:
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    images = img2img(
        "a tree",
        image=Image.fromarray(pixels),
        strength=0.5,
        num_inference_steps=2,
        output_type="np",
        generator=torch.manual_seed(0),
    ).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3)
    assert np.isfinite(images).all()
