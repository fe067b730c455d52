"""`class_images@subject` stage: the base model's images of the subject's class prompt, made once.

They are DreamBooth's prior-preservation set; as their own DVC output they are reused by every
fine-tuning run until the base model, the class prompt or their number changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genfusion.params import Params


def main(params: Params, *, subject: str, base: Path, out: Path) -> None:
    """Entry point: `finetune.num_class_images` images with seeds from `finetune.seed`, sampled with
    the `generate` settings."""
    from genfusion.diffusion.pipelines import model_fingerprint, open_generator
    from genfusion.diffusion.text_to_image import text_to_image
    from genfusion.launch import process_state

    spec, settings = params.subject(subject), params.finetune_for(subject)
    state = process_state(params.diffusion.device)
    text_to_image(
        open_generator(params.diffusion, base, None, state),
        params.generate,
        out,
        prompts=[spec.class_prompt],
        count=settings.num_class_images,
        seed=settings.seed,
        resolution=params.diffusion.resolution,
        subject=f"{subject}-class",
        fingerprint=model_fingerprint(base, None),
        state=state,
    )
