"""The inspect stage, measured: embedding throughput and FiftyOne dataset build time.

Run from the project root after `dvc repro seeds` (needs data/real):
    .venv/bin/python benchmarks/bench_inspect.py [--samples 1000] [--side 64]
Cuts `--samples` crops of `--side` px from the real train tiles and times
- measuring them (decode, colour stats and the descriptor embedding), in images per second;
- `sync_dataset` building a new persistent dataset of them (fields, labels, embeddings), then
  updating it unchanged, against bare FiftyOne adding the same samples with the same fields
  in one `add_samples` call (ratio ours / bare, time);
- FiftyOne Brain on the embeddings (visualization, uniqueness, similarity index).
The database lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--side", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    # Registered before FiftyOne is imported, so it runs after FiftyOne's own exit handlers
    # have stopped the database that lives in this folder.
    atexit.register(shutil.rmtree, root, True)
    os.environ["FIFTYONE_DATABASE_DIR"] = str(root / "db")
    import numpy as np
    from PIL import Image

    from genfusion import distribution
    from genfusion.stages import inspect as inspection

    tiles = sorted(Path("data/real/images/train").glob("*.png"))
    if not tiles:
        raise SystemExit("data/real/images/train is empty: run `dvc repro seeds` first")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    items = []
    for k in range(args.samples):
        with Image.open(tiles[k % len(tiles)]) as tile:
            x, y = rng.integers(0, min(tile.size) - args.side, 2)
            path = folder / f"crop_{k:05d}.png"
            tile.convert("RGB").crop((x, y, x + args.side, y + args.side)).save(path)
        items.append(inspection.Item(path, "generated", "generated/bench", subject="bench", auto=[]))

    start = time.perf_counter()
    inspection.measure(items, distribution.descriptor)
    measure_s = time.perf_counter() - start

    inspection.use_database(root / "db")
    inspection.connect()
    import fiftyone as fo
    import fiftyone.brain as fob

    start = time.perf_counter()
    dataset = inspection.sync_dataset("bench-ours", items)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    inspection.sync_dataset("bench-ours", items)
    update_s = time.perf_counter() - start

    start = time.perf_counter()
    bare = fo.Dataset("bench-bare")
    bare.add_samples(
        [fo.Sample(filepath=str(item.path.resolve()), **inspection.sample_fields(item)) for item in items]
    )
    bare_s = time.perf_counter() - start

    start = time.perf_counter()
    inspection.add_brain(dataset)
    brain_s = time.perf_counter() - start
    embeddings = np.array(dataset.values("embedding"))
    start = time.perf_counter()
    fob.compute_uniqueness(bare, embeddings=embeddings)
    fob.compute_visualization(bare, embeddings=embeddings, method="pca", brain_key="pca", seed=0)
    fob.compute_similarity(bare, embeddings=embeddings, backend="sklearn", brain_key="sim")
    bare_brain_s = time.perf_counter() - start

    n = args.samples
    print(f"samples: {n} crops of {args.side} px, 2 CPU cores, descriptor embedding")
    print(f"measure (decode + stats + embedding): {measure_s:.1f} s, {n / measure_s:.0f} images/s")
    print(
        f"build dataset: ours {build_s:.1f} s, bare add_samples {bare_s:.1f} s; ratio {build_s / bare_s:.2f}"
    )
    print(f"update unchanged: {update_s:.1f} s")
    print(f"brain: ours {brain_s:.1f} s, bare {bare_brain_s:.1f} s; ratio {brain_s / bare_brain_s:.2f}")


if __name__ == "__main__":
    main()
