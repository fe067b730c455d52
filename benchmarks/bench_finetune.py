"""Fine-tuning speed: the finetune stage's loop against a minimal bare training loop.

Both train LoRA adapters on the same tiny UNet, resolution and images per step, from the
same cached latents: ours through accelerate with a prior-preservation half (as many class
as instance images) and loss logging, the bare loop plain torch on the same number of
images. Each run is a separate process, for its own peak memory.
    .venv/bin/python benchmarks/bench_finetune.py [--steps 30] [--resolution 64] [--batch 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time


def run(kind: str, steps: int, resolution: int, batch: int, queue) -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from genfusion.diffusion.pipelines import build_tiny_pipeline
    from genfusion.params import FinetuneParams
    from genfusion.stages.finetune import LORA_TARGETS, Encoded, finetune_unet

    torch.manual_seed(0)
    pipe = build_tiny_pipeline(seed=0)
    latent = resolution // 8
    with torch.no_grad():
        tokens = pipe.tokenizer(
            "an aerial photo of sks tree crowns",
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        embedding = pipe.text_encoder(tokens)[0]
    data = Encoded(torch.randn(20, 4, latent, latent), torch.full((20, 4, latent, latent), 0.1), embedding)
    settings = FinetuneParams(steps=steps, batch=batch, lr=1e-3)
    start = time.perf_counter()
    if kind == "ours":
        finetune_unet(pipe, data, data, settings, lambda step, loss: None)
        images = 2 * batch * steps
    else:
        unet = pipe.unet
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
        schedule = pipe.scheduler
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            # Instance plus class images, as many as the stage's step with prior preservation.
            index = torch.randint(20, (2 * batch,), generator=generator)
            latents = data.sample(index, generator, 1.0)
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (2 * batch,), generator=generator)
            pred = unet(schedule.add_noise(latents, noise, t), t, embedding.expand(2 * batch, -1, -1)).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        images = 2 * batch * steps
    seconds = time.perf_counter() - start
    queue.put((steps / seconds, images / seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    results = {}
    context = multiprocessing.get_context("spawn")
    for kind in ("bare", "ours"):
        queue = context.Queue()
        process = context.Process(target=run, args=(kind, args.steps, args.resolution, args.batch, queue))
        process.start()
        results[kind] = queue.get()
        process.join()
        steps_s, images_s, peak_mb = results[kind]
        print(f"finetune {kind}: {steps_s:.2f} steps/s, {images_s:.1f} images/s, peak RSS {peak_mb:.0f} MB")
    ratio = results["ours"][0] / results["bare"][0]
    print(f"steps/s ours / bare: {ratio:.3f} ({args.steps} steps, batch {args.batch}, {args.resolution} px)")


if __name__ == "__main__":
    main()
