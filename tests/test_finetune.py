"""DreamBooth fine-tuning on the tiny model: LoRA and full UNet, saved, loaded back, used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genfusion import fsio
from genfusion.diffusion.pipelines import (
    BUILTIN_TINY,
    SOURCE_FILE,
    build_tiny_pipeline,
    load_generator,
    weights_fingerprint,
)
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.params import FinetuneParams, SeedsParams, SelectParams, SubjectParams
from genfusion.stages.finetune import (
    encode,
    finetune_unet,
    load_pixels,
    save_finetuned,
    select_instance_images,
)
from genfusion.stages.seeds import run_seeds

RESOLUTION = 32
PROMPT = "an aerial photo of sks tree crowns"


@pytest.fixture(scope="module")
def real(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "real"
    seeds = SeedsParams(source=neon_seeds, class_map={"Tree": "tree", "Alive": "tree", "Dead": "tree"})
    run_seeds(read_annotations(neon_seeds), seeds, ["tree"], out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained builtin model saved the way the base_model stage saves it."""
    folder = tmp_path_factory.mktemp("base")
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    fsio.write_json(folder / SOURCE_FILE, {"base": BUILTIN_TINY, "fingerprint": weights_fingerprint(folder)})
    return folder


def sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=generator,
        output_type="np",
    ).images[0]


def test_subject_selects_tiles_by_scene_class_and_pattern(real: Path) -> None:
    everything = select_instance_images(real, "all", SubjectParams(instance_prompt=PROMPT), ["tree"])
    assert len(everything) == 20
    by_pattern = SubjectParams(instance_prompt=PROMPT, select=SelectParams(pattern="*_x0_*"))
    assert [p.name for p in select_instance_images(real, "s", by_pattern, ["tree"])] == sorted(
        p.name for p in everything if "_x0_" in p.name
    )
    elsewhere = SubjectParams(instance_prompt=PROMPT, select=SelectParams(scenes=["OSBS_029"]))
    with pytest.raises(GenfusionError, match=r"finetune@s: subjects\.s\.select .* selects none of the 20"):
        select_instance_images(real, "s", elsewhere, ["tree"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_steps_save_load_back_and_change_the_output(real, base, tmp_path, method) -> None:
    pipe = load_generator(base)
    before = sample(pipe)
    paths = select_instance_images(real, "s", SubjectParams(instance_prompt=PROMPT), ["tree"])[:4]
    instance = encode(pipe, load_pixels(paths, RESOLUTION), PROMPT)
    prior = encode(pipe, load_pixels(paths[:2], RESOLUTION), "an aerial photo of tree crowns")
    losses = []
    settings = FinetuneParams(method=method, steps=2, batch=2, lr=1e-2)
    unet = finetune_unet(pipe, instance, prior, settings, lambda step, loss: losses.append((step, loss)))
    assert [s for s, _ in losses] == [0, 1] and all(np.isfinite(loss) for _, loss in losses)
    out = tmp_path / method
    save_finetuned(unet, out, method, {"method": method, "subject": "s"})
    expected = {"lora": "pytorch_lora_weights.safetensors", "full": "unet"}[method]
    assert (out / expected).exists() and (out / "finetune.json").exists()

    tuned = sample(load_generator(base, out))
    assert not np.allclose(tuned, before, atol=1e-4), "the fine-tuned weights must change the output"
    assert np.array_equal(sample(load_generator(base, out)), tuned), "loading twice gives the same model"
    assert np.array_equal(sample(load_generator(base)), before), "the base model on disk is untouched"
