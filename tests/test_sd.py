"""The one Stable Diffusion loader: builtin tiny model, saved folders, fine-tunes, bad sources."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from genfusion.diffusion.pipelines import (
    SCHEDULERS,
    build_tiny_pipeline,
    check_prompt,
    load_generator,
    load_pipeline,
    model_fingerprint,
    use_scheduler,
    weights_fingerprint,
)
from genfusion.errors import GenfusionError
from genfusion.params import DiffusionParams, SchedulerName
from genfusion.stages.base_model import TileSampler, pretrain_tiny, save_builtin

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
PROMPT = "an aerial photo of tree crowns"


def sample(pipe, seed: int = 0) -> np.ndarray:
    """Two 32 px images, 2 DDIM steps, fixed seeds, as 8-bit pixels."""
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    images = pipe([PROMPT] * 2, height=32, width=32, num_inference_steps=2, generator=generators).images
    return np.stack([np.asarray(image) for image in images])


def saved(pipe, folder: Path) -> Path:
    save_builtin(pipe, folder)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved(build_tiny_pipeline(seed=0), tmp_path_factory.mktemp("base"))


def test_builtin_model_survives_save_and_reload(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline(seed=0)
    before = sample(pipe)
    folder = saved(pipe, tmp_path / "base")
    # The loader a real checkpoint folder goes through, and the stage loader on top of it.
    assert np.array_equal(sample(load_pipeline(str(folder))), before)
    assert np.array_equal(sample(load_generator(folder)), before)
    assert not np.array_equal(sample(build_tiny_pipeline(seed=1)), before)


def test_pretraining_is_deterministic_and_changes_the_model(tmp_path: Path) -> None:
    tiles = [np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8) for i in range(3)]
    params = DiffusionParams(resolution=32, pretrain_steps=2, pretrain_vae_steps=2, pretrain_batch=2)
    first, second = pretrain_tiny(tiles, params), pretrain_tiny(tiles, params)
    prints = [weights_fingerprint(saved(p, tmp_path / str(i))) for i, p in enumerate((first, second))]
    untrained = weights_fingerprint(saved(build_tiny_pipeline(seed=0), tmp_path / "untrained"))
    assert prints[0] == prints[1] != untrained
    assert first.vae.config.scaling_factor != 0.18215  # fitted to the tiles' latents


def test_tile_sampler_gives_model_sized_batches_in_range() -> None:
    tiles = [np.full((50, 30, 3), 255, dtype=np.uint8), np.zeros((20, 20, 3), dtype=np.uint8)]
    batch = TileSampler(tiles, 32, torch.Generator().manual_seed(0)).sample(6)
    assert batch.shape == (6, 3, 32, 32)
    assert batch.min() >= -1 and batch.max() <= 1


def make_lora(base_dir: Path, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = load_pipeline(str(base_dir)).unet
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    # peft starts B at zero (a no-op adapter); a trained one is not.
    with torch.no_grad():
        for name, weight in unet.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.1)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    (folder / "finetune.json").write_text(json.dumps({"method": "lora"}))
    return folder


def make_full(base_dir: Path, folder: Path) -> Path:
    unet = load_pipeline(str(base_dir)).unet
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in unet.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    unet.save_pretrained(folder / "unet")
    (folder / "finetune.json").write_text(json.dumps({"method": "full"}))
    return folder


@pytest.mark.parametrize("make", [make_lora, make_full], ids=["lora", "full"])
def test_finetuned_subject_changes_the_output(base_dir: Path, tmp_path: Path, make) -> None:
    finetuned = make(base_dir, tmp_path / "subject")
    base = sample(load_generator(base_dir))
    tuned = sample(load_generator(base_dir, finetuned))
    assert not np.array_equal(tuned, base)
    assert np.array_equal(sample(load_generator(base_dir, finetuned)), tuned)
    assert model_fingerprint(base_dir, finetuned) != model_fingerprint(base_dir)


def test_fingerprint_follows_content_not_just_size(base_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(base_dir, tmp_path / "copy"))
    assert weights_fingerprint(copy) == weights_fingerprint(base_dir)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(base_dir)


def test_unknown_hub_id_offline_says_what_was_tried_and_what_to_do() -> None:
    with pytest.raises(GenfusionError) as error:
        load_pipeline("someone/not-cached-sd", revision="v2")
    message = str(error.value)
    for part in ("someone/not-cached-sd", "revision v2", "Hugging Face cache (", "hf download someone/"):
        assert part in message
    assert "diffusion.base: models/checkpoints/not-cached-sd" in message


def test_folders_that_are_not_sd_pipelines_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(GenfusionError, match="holds a FluxPipeline; only StableDiffusionPipeline"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(GenfusionError, match="not a diffusers model index"):
        load_pipeline(str(tmp_path))
    with pytest.raises(GenfusionError, match="no such folder, and not a Hugging Face hub id"):
        load_pipeline(str(tmp_path / "no" / "such" / "folder"))


def test_bad_finetune_folder_is_refused(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match="finetune.json: missing"):
        load_generator(base_dir, tmp_path)
    (tmp_path / "finetune.json").write_text(json.dumps({"method": "dreambooth-xl"}))
    with pytest.raises(GenfusionError, match="method must be 'lora' or 'full'"):
        load_generator(base_dir, tmp_path)
    with pytest.raises(GenfusionError, match="source.json: missing; run the base_model stage"):
        load_generator(tmp_path)


def test_prompt_checks(base_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = load_pipeline(str(base_dir)).tokenizer
    with pytest.raises(GenfusionError, match=r"generate.prompts\[1\]: the prompt is empty"):
        check_prompt(tokenizer, "  ", "generate.prompts[1]")
    with caplog.at_level(logging.WARNING, logger="genfusion.diffusion.pipelines"):
        check_prompt(tokenizer, PROMPT, "generate.prompts[0]")
        assert not caplog.records
        check_prompt(tokenizer, PROMPT + " at dawn" * 10 + " THE END", "generate.prompts[0]")
    (record,) = caplog.records
    assert "generate.prompts[0]" in record.getMessage()
    assert "the end" in record.getMessage()  # the words that are cut are named


def test_every_scheduler_name_maps_to_a_diffusers_scheduler(base_dir: Path) -> None:
    assert set(SCHEDULERS) == set(get_args(SchedulerName))
    pipe = load_pipeline(str(base_dir))
    for name in SCHEDULERS:
        use_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == SCHEDULERS[name]
