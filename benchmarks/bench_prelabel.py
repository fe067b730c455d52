"""Automatic labels, measured: how many boxes each method gives, and how good attention labels are.

Run from the project root after `dvc repro train@real-0` (needs models/base, data/real and the
real detector):
    .venv/bin/python benchmarks/bench_prelabel.py [--images 24] [--steps 20] [--resolution 64]
1. Generated images: `--images` text-to-image images of the class prompt with attention capture,
   labelled by the attention method (params `prelabel`) and by the real detector: the share of
   images with at least one box and the boxes per image.
2. Attention labels on real images, whose true boxes are known: img2img of the real val and
   test tiles (resized to `--resolution`) at `variations.strength` with attention capture,
   labelled the same way; precision and recall at IoU 0.5 against the tiles' own boxes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def summary(labels) -> dict:
    boxes = [len(found.boxes) for found in labels]
    return {
        "images": len(boxes),
        "share_with_a_box": sum(b > 0 for b in boxes) / len(boxes),
        "boxes_per_image": sum(boxes) / len(boxes),
    }


def main() -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from genfusion.boxes import Box
    from genfusion.detection import detect
    from genfusion.diffusion.attention import capture_attention, class_prompt, class_token_positions
    from genfusion.diffusion.pipelines import load_generator, use_scheduler
    from genfusion.diffusion.text_to_image import text_to_image
    from genfusion.formats.yolo import read_label_file
    from genfusion.params import load_params
    from genfusion.stages.label_quality import counts_to_metrics, match
    from genfusion.stages.prelabel import attention_labels

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--weights", type=Path, default=Path("models/detectors/real-0/weights/best.pt"))
    args = parser.parse_args()
    params = load_params(args.params)
    settings, names = params.prelabel, params.classes
    pipe = load_generator(Path("models/base"))
    report = {"params": settings.model_dump(mode="json"), "resolution": args.resolution, "steps": args.steps}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = text_to_image(
            pipe, params.generate.model_copy(update={"steps": args.steps}), out,
            prompts=[params.diffusion.class_prompt], count=args.images, seed=0, resolution=args.resolution,
            subject="bench", fingerprint="bench", attention=settings, classes=names,
        )  # fmt: skip
        size = (args.resolution, args.resolution)
        images = [out / row["file"] for row in rows]
        attention = []
        for path in images:
            with np.load(out / "attention" / f"{path.stem}.npz") as maps:
                attention.append(attention_labels(dict(maps), size, names, settings))
        report["generated_attention"] = summary(attention)
        if args.weights.is_file():
            found = detect(args.weights, images, names, settings, params.train.imgsz, params.train.device)
            report["generated_detector"] = summary(found)

    # Real tiles through img2img with capture: attention labels against the true boxes.
    real = Path("data/real")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    use_scheduler(img2img, "ddim")
    strength = params.variations.strength
    tp = predictions = truths = 0
    labelled = []
    prompt = class_prompt(params.diffusion.class_prompt, names)
    positions = class_token_positions(pipe.tokenizer, prompt, names, "diffusion.class_prompt")
    tiles = sorted((real / "images" / "val").glob("*.png")) + sorted((real / "images" / "test").glob("*.png"))
    for k, path in enumerate(tiles):
        with Image.open(path) as image:
            width, height = image.size
            source = image.convert("RGB").resize(size)
        scale_x, scale_y = args.resolution / width, args.resolution / height
        truth = [
            Box(b.label, b.x0 * scale_x, b.y0 * scale_y, b.x1 * scale_x, b.y1 * scale_y)
            for b in read_label_file(
                real / "labels" / path.parent.name / f"{path.stem}.txt", names, (width, height)
            )
        ]
        runs = int(args.steps * strength)
        with capture_attention(img2img, settings, [positions], runs) as recorder:
            img2img(
                prompt=prompt, image=source, strength=strength, num_inference_steps=args.steps,
                guidance_scale=params.variations.guidance, generator=torch.Generator().manual_seed(k),
            )  # fmt: skip
        found = attention_labels(recorder.maps()[0], size, names, settings)
        labelled.append(found)
        tp += match(found.boxes, found.scores, truth)
        predictions += len(found.boxes)
        truths += len(truth)
    report["real_tiles_img2img_attention"] = {
        "tiles": len(tiles),
        **summary(labelled),
        **counts_to_metrics(tp, predictions, truths),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
