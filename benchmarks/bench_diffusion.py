"""Diffusion benchmarks: `generate` against a bare diffusers loop, pretraining speed, peak memory.

Run from the project root after `genfusion seeds` (needs data/real):
    .venv/bin/python benchmarks/bench_diffusion.py [--images 16] [--batch 4] [--steps 20] [--device cuda]
Each measurement runs in a fresh process, so its peak RSS is its own. The generate line
gives images per second for `genfusion.diffusion.text_to_image.text_to_image` (manifest, atomic PNG writes,
resume checks included) and for the plain diffusers loop a user would write with the same
model, settings, batch and image count, and the ratio ours / bare (>= 1.0 is the goal).
`--attention` times `generate` with attention capture on (prelabel.method: attention; the
class name appended to the prompt, maps saved per image) against the same bare loop, over the
sampling steps `--attention-steps FIRST LAST` (prelabel.steps; all of them by default).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "an aerial photo of tree crowns"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def pretrain(real: Path, steps: int, resolution: int, batch: int) -> dict:
    """Autoencoder and UNet pretraining steps per second of the builtin tiny model."""
    from genfusion.params import DiffusionParams
    from genfusion.stages.base_model import load_train_tiles, pretrain_tiny

    tiles = load_train_tiles(real)
    rates = {}
    for phase, counts in (("vae", (steps, 0)), ("unet", (0, steps))):
        params = DiffusionParams(
            resolution=resolution,
            pretrain_batch=batch,
            pretrain_vae_steps=counts[0],
            pretrain_steps=counts[1],
        )
        start = time.perf_counter()
        pretrain_tiny(tiles, params)
        rates[phase] = steps / (time.perf_counter() - start)
    return rates | {"rss": peak_rss_mib()}


def bare_loop(pipe, n: int, batch: int, steps: int, resolution: int, guidance: float, out: Path) -> None:
    """What a user would write with diffusers alone: batched calls, one seeded generator per image."""
    import torch

    out.mkdir(parents=True)
    for start in range(0, n, batch):
        indices = range(start, min(start + batch, n))
        images = pipe(
            prompt=[PROMPT] * len(indices),
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(pipe.device).manual_seed(i) for i in indices],
        ).images
        for i, image in zip(indices, images, strict=True):
            image.save(out / f"{i:05d}.png")


def generation(
    n: int,
    batch: int,
    steps: int,
    resolution: int,
    guidance: float,
    repeats: int,
    attention: tuple[float, float] | None,
    device: str = "cpu",
) -> dict:
    """Median seconds of our `generate` and of the bare loop, same process, same loaded model."""
    from genfusion.diffusion.pipelines import build_tiny_pipeline, load_generator, use_scheduler
    from genfusion.diffusion.text_to_image import text_to_image
    from genfusion.params import GenerateParams, PrelabelParams
    from genfusion.stages.base_model import save_builtin

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        save_builtin(build_tiny_pipeline(seed=0), base)
        pipe = load_generator(base, device=device)
        use_scheduler(pipe, "ddim")
        bare_loop(pipe, 1, 1, 2, resolution, guidance, Path(tmp) / "warm-up")
        sampler = GenerateParams(guidance=guidance, steps=steps, batch=batch)
        settings: dict = {}
        if attention:  # the builtin model's attention maps are resolution / 4 on a side
            capture = PrelabelParams(map_size=resolution // 4, steps=attention)
            settings = {"attention": capture, "classes": ["tree"]}
        # With capture on, `generate` without it is timed too, in the same loop: the capture's cost.
        names = ("ours", "bare", "plain") if attention else ("ours", "bare")
        timings: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            # Alternate the order, so warm caches or a noisy neighbour favour none.
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                if name == "bare":
                    bare_loop(pipe, n, batch, steps, resolution, guidance, Path(tmp) / f"bare{r}")
                else:
                    text_to_image(
                        pipe,
                        sampler,
                        Path(tmp) / f"{name}{r}",
                        prompts=[PROMPT],
                        count=n,
                        seed=0,
                        resolution=resolution,
                        subject="bench",
                        fingerprint="bench",
                        **(settings if name == "ours" else {}),
                    )
                timings[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_loop(pipe, n, 1, steps, resolution, guidance, Path(tmp) / "one-by-one")
        one_by_one = time.perf_counter() - start
    return {
        **{name: statistics.median(values) for name, values in timings.items()},
        "one_by_one": one_by_one,
        "rss": peak_rss_mib(),
    }


def in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT / "data" / "real")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=30)
    parser.add_argument("--pretrain-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--attention", action="store_true", help="generate with attention capture on")
    parser.add_argument("--device", default="cpu", help="generation's device (diffusion.device): cpu, cuda")
    parser.add_argument(
        "--attention-steps", type=float, nargs=2, default=[0.0, 1.0], metavar=("FIRST", "LAST")
    )
    args = parser.parse_args()
    if not (args.real / "images" / "train").is_dir():
        parser.error(f"{args.real}/images/train not found: run `genfusion seeds` (or `make repro`) first")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew CPU timings)")

    rates = in_fresh_process(pretrain, args.real, args.pretrain_steps, args.resolution, args.pretrain_batch)
    print(
        f"pretraining at {args.resolution} px, batch {args.pretrain_batch}: UNet {rates['unet']:.2f} steps/s,"
        f" autoencoder {rates['vae']:.2f} steps/s; peak RSS {rates['rss']:.0f} MiB"
    )
    gen = in_fresh_process(
        generation,
        args.images,
        args.batch,
        args.steps,
        args.resolution,
        args.guidance,
        args.repeats,
        tuple(args.attention_steps) if args.attention else None,
        args.device,
    )
    n = args.images
    print(
        f"generate (attention capture {f'on, steps {args.attention_steps}' if args.attention else 'off'})"
        f" {n} images on {args.device} at"
        f" {args.resolution} px, {args.steps} DDIM steps, guidance {args.guidance},"
        f" batch {args.batch}: ours {n / gen['ours']:.2f} img/s, bare diffusers loop {n / gen['bare']:.2f}"
        f" img/s, ratio ours/bare {gen['bare'] / gen['ours']:.2f} (bare one image per call:"
        f" {n / gen['one_by_one']:.2f} img/s); {gen['ours'] / n:.2f} s/image; peak RSS {gen['rss']:.0f} MiB"
    )
    if args.attention:
        print(f"attention capture costs {gen['ours'] / gen['plain']:.2f}x the time of `generate` without it")


if __name__ == "__main__":
    main()
