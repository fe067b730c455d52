"""`generate@subject` stage: text-to-image with one subject's generator.

The subject's prompts are the `generate.prompts` templates filled with its fine-tune's instance
and class prompts; `genfusion.diffusion.text_to_image` makes the images, resumably, each
traceable to model, prompt and seed in `manifest.csv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import layout
from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    from genfusion.params import Params


def count_real_train(real: Path) -> int:
    return len(layout.image_files(real, "train"))


def main(params: Params, *, subject: str, base: Path, finetuned: Path | None, real: Path, out: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (generate.*, diffusion.*)."""
    from genfusion.diffusion.pipelines import (
        model_fingerprint,
        open_generator,
        read_finetune,
        render_prompt,
    )
    from genfusion.diffusion.text_to_image import text_to_image
    from genfusion.launch import process_state

    diffusion, request = params.diffusion, params.generate
    n = request.n
    if n == "match_real":
        n = count_real_train(real)
        if n == 0:
            raise GenfusionError(
                f"generate.n: match_real, but {real}/images/train holds no tiles; run the seeds stage first"
            )
    # {instance_prompt} is the fine-tune's prompt (with its identifier token); without a
    # fine-tune it is the class prompt the base model was trained on, so one template serves both.
    values = {
        "subject": subject,
        "class_prompt": diffusion.class_prompt,
        "instance_prompt": diffusion.class_prompt,
    }
    if finetuned is not None:
        recorded = read_finetune(finetuned)
        values |= {key: recorded[key] for key in ("instance_prompt", "class_prompt") if key in recorded}
    prompts = [render_prompt(t, f"generate.prompts[{k}]", **values) for k, t in enumerate(request.prompts)]
    state = process_state(params.diffusion.device)
    text_to_image(
        open_generator(diffusion, base, finetuned, state),
        request,
        out,
        prompts=prompts,
        count=n,
        seed=request.seed,
        resolution=diffusion.resolution,
        subject=subject,
        fingerprint=model_fingerprint(base, finetuned),
        state=state,
        attention=params.prelabel if params.prelabel.method == "attention" else None,
        classes=params.classes,
    )
