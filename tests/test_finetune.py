"""DreamBooth fine-tuning on the tiny model: LoRA and full UNet, saved, loaded back, used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    make_accelerator,
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


def accelerator(settings: FinetuneParams):
    """A fresh accelerate state per training, as each stage process has."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return make_accelerator(settings, "cpu")


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
    unet = finetune_unet(
        pipe, instance, prior, settings, lambda step, loss: losses.append((step, loss)), accelerator(settings)
    )
    assert [s for s, _ in losses] == [0, 1] and all(np.isfinite(loss) for _, loss in losses)
    out = tmp_path / method
    save_finetuned(unet, out, method, {"method": method, "subject": "s"}, type(pipe))
    expected = {"lora": "pytorch_lora_weights.safetensors", "full": "unet"}[method]
    assert (out / expected).exists() and (out / "finetune.json").exists()

    tuned = sample(load_generator(base, out))
    assert not np.allclose(tuned, before, atol=1e-4), "the fine-tuned weights must change the output"
    assert np.array_equal(sample(load_generator(base, out)), tuned), "loading twice gives the same model"
    assert np.array_equal(sample(load_generator(base)), before), "the base model on disk is untouched"


def count_optimizer_steps():
    """A list that grows by one at every real optimizer update (accelerate skips the accumulating ones)."""
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    return steps, handle


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_steps_are_optimizer_steps_and_the_loss_is_logged_once_per_step(real, base, grad_accum) -> None:
    pipe = load_generator(base)
    paths = select_instance_images(real, "s", SubjectParams(instance_prompt=PROMPT), ["tree"])[:2]
    instance = encode(pipe, load_pixels(paths, RESOLUTION), PROMPT)
    settings = FinetuneParams(steps=3, batch=1, grad_accum=grad_accum, num_class_images=0)
    losses: list[tuple[int, float]] = []
    updates, handle = count_optimizer_steps()
    try:
        finetune_unet(
            pipe, instance, None, settings, lambda s, loss: losses.append((s, loss)), accelerator(settings)
        )
    finally:
        handle.remove()
    assert len(updates) == 3
    assert [s for s, _ in losses] == [0, 1, 2]


def test_a_single_step_changes_the_weights(real, base) -> None:
    """One optimizer step is one update (it used to be a count of batches: 1 step with
    grad_accum 2 saved the base weights unchanged as a fine-tune)."""
    pipe = load_generator(base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    paths = select_instance_images(real, "s", SubjectParams(instance_prompt=PROMPT), ["tree"])[:2]
    instance = encode(pipe, load_pixels(paths, RESOLUTION), PROMPT)
    settings = FinetuneParams(method="full", steps=1, batch=1, grad_accum=1, lr=1e-2)
    unet = finetune_unet(pipe, instance, None, settings, lambda *_: None, accelerator(settings))
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_fewer_steps_than_grad_accum_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"steps \(1\) counts optimizer steps, each of grad_accum \(2\)"
    ):
        FinetuneParams(steps=1, grad_accum=2)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_mixed_precision_trains_float32_weights_over_bfloat16_frozen_ones(real, base, tmp_path, method):
    """The Genfusion profile's precision (fp16 on a GPU), with bf16 standing in for it on the CPU:
    frozen weights in diffusion.dtype, trained weights in float32 under accelerate's autocast."""
    pipe = load_generator(base, dtype="bfloat16")
    paths = select_instance_images(real, "s", SubjectParams(instance_prompt=PROMPT), ["tree"])[:4]
    instance = encode(pipe, load_pixels(paths, RESOLUTION), PROMPT)
    prior = encode(pipe, load_pixels(paths[:2], RESOLUTION), "an aerial photo of tree crowns")
    settings = FinetuneParams(method=method, steps=2, batch=2, lr=1e-2, mixed_precision="bf16")
    losses: list[float] = []
    trained = accelerator(settings)
    assert trained.mixed_precision == "bf16"
    unet = finetune_unet(pipe, instance, prior, settings, lambda s, loss: losses.append(loss), trained)
    assert len(losses) == 2 and all(np.isfinite(losses))
    dtypes = {name: p.dtype for name, p in unet.named_parameters()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[n] == torch.float32 for n in trainable)
    if method == "lora":
        assert {dtypes[n] for n in dtypes if n not in trainable} == {torch.bfloat16}
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    out = tmp_path / method
    save_finetuned(unet, out, method, {"method": method, "subject": "s"}, type(pipe))
    # Generation in float32 reads the fine-tune too, and is changed by it.
    assert not np.allclose(sample(load_generator(base, out)), sample(load_generator(base)), atol=1e-4)
