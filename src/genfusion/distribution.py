"""How far a set of synthetic images is from the real ones: pure numpy on decoded images.

- Colour: per-channel distance between the pixel-value distributions (the earth mover's
  distance between 256-bin histograms, in grey levels), and brightness / saturation
  statistics (HSV value and saturation, 0-1).
- Labels: boxes per image and box sizes (square root of the box area over the image's),
  compared by the same distance.
- Embeddings: KID (kernel inception distance with the usual cubic polynomial kernel, here on
  whatever embedding is chosen; 0 for one distribution, up to its sampling noise; a set over
  1,000 images by the mean over random subsets, as the KID paper does).
- Copies: a synthetic image whose 32 x 32 grey thumbnail correlates with a real image's at or
  above a threshold is a near-duplicate of it. Layout, not colour, makes a copy: two tiles of
  the same forest share colours but not the position of every crown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THUMB = 32  # side of the thumbnails that near-duplicates are judged by
# KID of a set larger than this is the mean over KID_SUBSETS random subsets of this size (the
# estimator of the KID paper, with torchmetrics' defaults): its kernel matrices stay this size
# whatever the set's, where the whole set's grow with its square (80 GB at 100,000 images).
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100
# Near-duplicates are looked for this many queries at a time, so that the similarity matrix of a
# large set against the real images never exists whole.
NEAREST_BLOCK = 4096


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two histograms over the same equally spaced bins, in bins."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    return float(np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).sum())


def values_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Earth mover's distance between two samples of numbers (0 when either is empty)."""
    if not len(a) or not len(b):
        return 0.0
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b)[:-1] * np.diff(grid)))


@dataclass(frozen=True)
class ImageStats:
    """What the colour figures need of one image."""

    histogram: np.ndarray  # (3, 256) pixel counts per RGB channel
    brightness: float  # mean HSV value, 0-1
    saturation: float  # mean HSV saturation, 0-1
    thumbnail: np.ndarray  # (THUMB * THUMB,) grey, mean 0, unit length: for near-duplicates


def image_stats(rgb: np.ndarray) -> ImageStats:
    """Stats of an (H, W, 3) uint8 image."""
    from PIL import Image

    histogram = np.stack([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)])
    pixels = rgb.astype(np.float64) / 255
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    grey = Image.fromarray(rgb).convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    thumb = np.asarray(grey, dtype=np.float64).ravel()
    thumb -= thumb.mean()
    norm = np.linalg.norm(thumb)
    return ImageStats(
        histogram, float(high.mean()), float(saturation.mean()), thumb / norm if norm else thumb
    )


def colour_distance(real: Sequence[ImageStats], other: Sequence[ImageStats]) -> dict[str, float]:
    """Per-channel earth mover's distance between the two sets' pooled pixel values, in grey levels."""
    # Summed one image at a time: stacking every histogram first costs 6 KB an image.
    pooled_real = sum(s.histogram for s in real)
    pooled_other = sum(s.histogram for s in other)
    return {name: histogram_distance(pooled_real[c], pooled_other[c]) for c, name in enumerate("rgb")}


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))} if len(values) else {}


def nearest(queries: Sequence[ImageStats], references: Sequence[ImageStats]) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of the reference whose thumbnail correlates best, and that correlation."""
    if not len(queries) or not len(references):
        return np.zeros(len(queries), dtype=int), np.zeros(len(queries))
    thumbnails = np.stack([r.thumbnail for r in references]).T
    best, value = [], []
    for start in range(0, len(queries), NEAREST_BLOCK):
        block = queries[start : start + NEAREST_BLOCK]
        similarity = np.stack([q.thumbnail for q in block]) @ thumbnails
        best.append(similarity.argmax(axis=1))
        value.append(similarity[np.arange(len(block)), best[-1]])
    return np.concatenate(best), np.concatenate(value)


def kid(
    real: np.ndarray, other: np.ndarray, subset_size: int = KID_SUBSET_SIZE, subsets: int = KID_SUBSETS
) -> float:
    """Kernel inception distance (unbiased squared MMD, kernel (x.y / d + 1)^3) between two
    sets of embeddings (n, d); NaN when a set has fewer than two. Sets of at most `subset_size`
    are compared whole; larger ones by the mean over `subsets` subsets of that size, drawn with
    a fixed seed."""
    if len(real) < 2 or len(other) < 2:
        return float("nan")
    if len(real) <= subset_size and len(other) <= subset_size:
        return _mmd(real, other)
    rng = np.random.default_rng(0)

    def draw(embeddings: np.ndarray) -> np.ndarray:
        n = len(embeddings)
        return embeddings[np.sort(rng.choice(n, min(n, subset_size), replace=False))]

    return float(np.mean([_mmd(draw(real), draw(other)) for _ in range(subsets)]))


def _mmd(real: np.ndarray, other: np.ndarray) -> float:
    d = real.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1) ** 3

    k_rr, k_oo, k_ro = kernel(real, real), kernel(other, other), kernel(real, other)
    n, m = len(real), len(other)
    within = (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)) + (k_oo.sum() - np.trace(k_oo)) / (m * (m - 1))
    return float(within - 2 * k_ro.mean())


def descriptor(rgb: np.ndarray) -> np.ndarray:
    """The offline default embedding of an (H, W, 3) uint8 image, 208 numbers: a joint HSV
    colour histogram (8 x 4 x 4), an 8 x 8 grey layout thumbnail and a 16-bin histogram of
    gradient orientations weighted by magnitude (texture), each block scaled to unit length."""
    from PIL import Image

    image = Image.fromarray(rgb)
    hsv = np.asarray(image.convert("HSV"), dtype=np.int64)
    bins = (hsv[..., 0] * 8 // 256) * 16 + (hsv[..., 1] * 4 // 256) * 4 + hsv[..., 2] * 4 // 256
    colour = np.bincount(bins.ravel(), minlength=128).astype(np.float64)
    layout = np.asarray(
        image.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float64
    ).ravel()
    layout -= layout.mean()
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    dy, dx = np.gradient(grey)
    angle = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
    texture = np.bincount(
        np.minimum((angle * 16).astype(int), 15).ravel(), weights=np.hypot(dx, dy).ravel(), minlength=16
    )
    blocks = [colour, layout, texture]
    return np.concatenate([b / n if (n := np.linalg.norm(b)) else b for b in blocks])
