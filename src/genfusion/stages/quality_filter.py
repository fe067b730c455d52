"""`filter@<set>` stage: the best share of a synthetic set whose labels are known by construction.

The sets are flat image sets (`data/composites`, copy-paste composites; `data/variations`, img2img
variations carrying their source's boxes; `data/inpainted/<subject>`, objects inpainted into a
drawn layout) whose manifest names each image (`file`) and its
labels (`label`). Their labels are right only if the generation went right: a paste that
produced a smear, or a variation that moved the crowns, keeps boxes the pixels no longer show.
Every image gets up to three scores, each higher-is-better:

- `agreement`: the mean, over the image's known objects, of the best IoU with a box of the same
  class that the real detector (trained on the real seeds only, so it knows nothing of the
  generator) finds at `prelabel.conf` / `prelabel.iou`, run at `train.imgsz` on `train.device`.
  An image without known objects scores 1 when the detector finds nothing, else 0. A
  generation the detector cannot reconcile with its known layout is likely broken: the labels
  are the one thing the set promises, and the detector is the only judge of them that never saw
  a synthetic image.
- `realism`: minus the Euclidean distance from the image's embedding to the nearest real train
  tile's, on the inspect stage's offline embedding (`genfusion.distribution.descriptor`: colour,
  layout, texture). It catches what the detector may forgive: colour casts, noise, flat or
  washed-out images, artefacts far from every real tile.
- `clip` (only with `filter.clip`, a local CLIP checkpoint folder): the cosine similarity of the
  image with the text `diffusion.class_prompt` (the prompt the domain is known by), a semantic
  check that the image still shows the domain at all.

Scores are on different scales, so they are combined by rank: each score is ranked ascending
over the set (ties take their mean rank), mapped to [0, 1] ((rank - 1) / (n - 1); 0.5 for a lone
image), and the combined score is the mean of those percentiles. Images are ordered by combined
score, descending, ties by file name, and the first round(keep x n) (Python's round, half to
even), at least one, are kept. Scores are rounded to 6 decimals before ranking, so the written
manifest reproduces the choice exactly.

Writes `<out>/manifest.csv` (file, label as in the set's manifest, relative to the set folder;
agreement, realism, clip (empty when not used), score, rank, kept: true / false) in rank order,
and `<out>/summary.json` (n, kept, keep, and the mean of each score over the kept and the dropped
images); the folder is replaced whole, so an error leaves the previous one, or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import fsio, layout, variants
from genfusion.boxes import Box, iou
from genfusion.errors import GenfusionError
from genfusion.layout import MANIFEST

if TYPE_CHECKING:
    from genfusion.params import FilterParams, Params, PrelabelParams

COLUMNS = ("file", "label", "agreement", "realism", "clip", "score", "rank", "kept")
SCORES = ("agreement", "realism", "clip")
SUMMARY = "summary.json"
DIGITS = 6  # scores are rounded to this many decimals before they are ranked
CLIP_BATCH = 16


@dataclass(frozen=True)
class Scores:
    """One image's scores; `file` and `label` as the set's manifest names them."""

    file: str
    label: str
    agreement: float
    realism: float
    clip: float | None = None

    def value(self, name: str) -> float | None:
        return getattr(self, name)


@dataclass(frozen=True)
class Choice:
    """An image's place in the set: its combined score, rank (1 is best) and whether it is kept."""

    scores: Scores
    score: float
    rank: int
    kept: bool


# --- the pure core ----------------------------------------------------------------------------


def agreement(known: Sequence[Box], found: Sequence[Box]) -> float:
    """Mean over the known objects of the best IoU with a found box of the same class; without
    known objects, 1 when nothing is found, else 0."""
    if not known:
        return 0.0 if found else 1.0
    best = [max((iou(k, f) for f in found if f.label == k.label), default=0.0) for k in known]
    return float(np.mean(best))


def realism(embedding: np.ndarray, real: np.ndarray) -> float:
    """Minus the Euclidean distance from `embedding` (d,) to the nearest row of `real` (m, d)."""
    distances = np.linalg.norm(np.asarray(real, np.float64) - np.asarray(embedding, np.float64), axis=1)
    return -float(distances.min())


def _rounded(value: float) -> float:
    return round(float(value), DIGITS) + 0.0  # + 0.0: no "-0.0" in the manifest


def score_images(
    names: Sequence[tuple[str, str]],
    known: Sequence[Sequence[Box]],
    found: Sequence[Sequence[Box]],
    embeddings: np.ndarray,
    real_embeddings: np.ndarray,
    clip: Sequence[float] | None = None,
) -> list[Scores]:
    """Every image's scores: `names` are (file, label) as the manifest names them, `known` its
    labels, `found` the real detector's boxes, `embeddings` (n, d) its embeddings against the
    real train tiles' `real_embeddings` (m, d), `clip` its CLIP similarities (None: not used)."""
    if len(real_embeddings) == 0:
        raise ValueError("realism needs at least one real embedding")
    clip_values = [None] * len(names) if clip is None else [_rounded(c) for c in clip]
    columns = (known, found, embeddings, clip_values)
    if any(len(column) != len(names) for column in columns):
        raise ValueError("score_images: one known, found, embedding and clip value per image")
    return [
        Scores(
            file,
            label,
            _rounded(agreement(k, f)),
            _rounded(realism(e, real_embeddings)),
            c,
        )
        for (file, label), k, f, e, c in zip(names, known, found, embeddings, clip_values, strict=True)
    ]


def percentiles(values: Sequence[float]) -> np.ndarray:
    """Each value's rank among `values` (ascending, ties averaged) mapped to [0, 1]:
    (rank - 1) / (n - 1); 0.5 for a single value."""
    values = np.asarray(values, np.float64)
    n = len(values)
    if n == 1:
        return np.array([0.5])
    # Counted by binary search in the sorted values: comparing every pair holds an n x n matrix
    # (10 GB at 100,000 images).
    ordered = np.sort(values)
    below = np.searchsorted(ordered, values, side="left")
    equal = np.searchsorted(ordered, values, side="right") - below
    mean_rank = below + (equal + 1) / 2  # 1-based, ties averaged
    return (mean_rank - 1) / (n - 1)


def kept_count(keep: float, n: int) -> int:
    """How many of n images `keep` keeps: round(keep x n), at least 1 (none of none)."""
    return min(n, max(1, round(keep * n))) if n else 0


def choose(scored: Sequence[Scores], keep: float) -> list[Choice]:
    """The images in rank order: combined score (the mean rank percentile of each score present)
    descending, ties by file name; the first `kept_count(keep, n)` kept."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if not scored:
        return []
    used = [name for name in SCORES if scored[0].value(name) is not None]
    if any((s.value(name) is None) != (name not in used) for s in scored for name in SCORES):
        raise ValueError("choose: every image needs the same scores")
    combined = np.mean([percentiles([s.value(name) for s in scored]) for name in used], axis=0)
    rounded = [_rounded(c) for c in combined]
    order = sorted(range(len(scored)), key=lambda i: (-rounded[i], scored[i].file))
    count = kept_count(keep, len(scored))
    return [Choice(scored[i], rounded[i], rank, rank <= count) for rank, i in enumerate(order, start=1)]


def manifest_rows(choices: Sequence[Choice]) -> list[dict[str, str]]:
    def text(value: float | None) -> str:
        return "" if value is None else f"{value:.{DIGITS}f}"

    return [
        {
            "file": c.scores.file,
            "label": c.scores.label,
            **{name: text(c.scores.value(name)) for name in SCORES},
            "score": text(c.score),
            "rank": str(c.rank),
            "kept": "true" if c.kept else "false",
        }
        for c in choices
    ]


def summary(choices: Sequence[Choice], keep: float) -> dict:
    """n, kept, keep, and each score's mean over the kept and the dropped images (null for none)."""

    def means(group: list[Choice]) -> dict[str, float | None]:
        values = {name: [c.scores.value(name) for c in group] for name in SCORES}
        values["score"] = [c.score for c in group]
        return {name: _rounded(np.mean(v)) if v and v[0] is not None else None for name, v in values.items()}

    kept = [c for c in choices if c.kept]
    dropped = [c for c in choices if not c.kept]
    return {
        "n": len(choices),
        "kept": len(kept),
        "keep": keep,
        "clip": bool(choices) and choices[0].scores.clip is not None,
        "mean": {"kept": means(kept), "dropped": means(dropped)},
    }


# --- reading the set and computing the scores -----------------------------------------------


@dataclass(frozen=True)
class Item:
    file: str
    label: str
    image: Path
    labels: Path


def set_items(set_dir: Path, stage: str) -> list[Item]:
    """The images the set's manifest lists, by file name, each with its label file; every
    listed file must exist. `stage` writes the set (named in the advice to run it)."""
    import csv

    set_dir = Path(set_dir)
    manifest = set_dir / MANIFEST
    rerun = f"`dvc repro {stage}`"
    if not manifest.is_file():
        raise GenfusionError(f"{manifest}: missing; run {rerun} first")
    try:
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (csv.Error, UnicodeDecodeError) as exc:
        raise GenfusionError(f"{manifest}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("file", "label") if c not in columns]
    if missing:
        raise GenfusionError(
            f"{manifest}: no {' or '.join(missing)} column; filter takes the sets whose labels are"
            " known by construction (data/composites, data/variations, data/inpainted/<subject>)"
        )
    if not rows:
        raise GenfusionError(f"{manifest}: lists no images; run {rerun}")
    items = [
        Item(row["file"], row["label"], set_dir / row["file"], set_dir / row["label"])
        for row in sorted(rows, key=lambda row: row["file"])
    ]
    for item in items:
        for path in (item.image, item.labels):
            if not path.is_file():
                raise GenfusionError(f"{path}: listed in {manifest} but missing; run {rerun}")
    return items


def read_rgb(path: Path) -> np.ndarray:
    from genfusion.images import open_image, to_rgb

    with open_image(path) as raw:
        return np.array(to_rgb(raw, path)[0])  # a writable copy: torch warns on a read-only one


def load_clip(folder: str):
    """(CLIPModel, CLIPProcessor) from a local folder, or an error naming filter.clip and it."""
    from genfusion.diffusion.pipelines import _quiet_library_progress_bars

    advice = (
        "give a local folder holding a CLIPModel and its CLIPProcessor (tokenizer and image"
        " processor), saved with save_pretrained; or set filter.clip: null"
    )
    if not Path(folder).is_dir():
        raise GenfusionError(f"filter.clip: {folder}: no such folder; {advice}")
    from transformers import CLIPModel, CLIPProcessor

    _quiet_library_progress_bars()
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError...
        raise GenfusionError(
            f"filter.clip: {folder}: cannot load a CLIP model ({type(exc).__name__}: {exc}); {advice}"
        ) from exc
    return model, processor


def clip_similarities(clip, images: Sequence[Path], text: str) -> list[float]:
    """The cosine similarity of each image with `text`, from `clip` = load_clip(folder)."""
    import torch

    from genfusion.progress import progress_bar

    model, processor = clip
    with torch.no_grad():
        tokens = processor.tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        text_embeds = model.get_text_features(**tokens)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        batches = [images[i : i + CLIP_BATCH] for i in range(0, len(images), CLIP_BATCH)]
        found = []
        for batch in progress_bar(batches, f"filter: clip ({len(images)} images)"):
            pixels = processor.image_processor([read_rgb(p) for p in batch], return_tensors="pt")
            image_embeds = model.get_image_features(**pixels)
            # transformers 5 returns the vision outputs with the projected embedding as pooler_output.
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
            found.extend((image_embeds.double() @ text_embeds.double().T)[:, 0].tolist())
    return found


def real_embeddings(real_dir: Path) -> np.ndarray:
    from genfusion.distribution import descriptor

    tiles = layout.image_files(Path(real_dir), "train")
    if not tiles:
        raise GenfusionError(
            f"{layout.images_dir(Path(real_dir), 'train')}: no real train tiles to measure realism"
            " against; run `dvc repro seeds`"
        )
    return np.stack([descriptor(read_rgb(tile)) for tile in tiles])


def read_known(items: Sequence[Item], names: Sequence[str]) -> list[list[Box]]:
    """Each image's known objects, from its label file; a bad line is an error naming it."""
    from genfusion.formats.yolo import read_label_file
    from genfusion.images import read_header

    return [read_label_file(item.labels, names, read_header(item.image).size) for item in items]


def score_items(
    items: Sequence[Item],
    known: Sequence[Sequence[Box]],
    found: Sequence[Sequence[Box]],
    reference: np.ndarray,
    similarities: Sequence[float] | None = None,
) -> list[Scores]:
    """The set's images' scores, from their `known` objects (`read_known`), the real detector's
    boxes `found` on each, their pixels against the real train tiles' embeddings `reference`
    (`real_embeddings`), and their CLIP `similarities` (None: not used)."""
    from genfusion.distribution import descriptor
    from genfusion.progress import progress_bar

    embeddings = np.stack([descriptor(read_rgb(item.image)) for item in progress_bar(items, "filter: embed")])
    in_manifest = [(item.file, item.label) for item in items]
    return score_images(in_manifest, known, found, embeddings, reference, similarities)


def filter_set(
    set_dir: Path,
    stage: str,
    real_dir: Path,
    weights: Path,
    settings: FilterParams,
    names: Sequence[str],
    prelabel_settings: PrelabelParams,
    imgsz: int,
    device: str,
    class_prompt: str,
    out: Path,
) -> dict:
    """Score every image of `set_dir` (written by `stage`), choose, and write `out` (manifest.csv,
    summary.json); returns the summary. Everything is checked before anything is computed or
    written."""
    from genfusion.detection import detect
    from genfusion.manifest import write_manifest

    items = set_items(set_dir, stage)
    weights = Path(weights)
    if not weights.is_file():
        raise GenfusionError(
            f"{weights}: the real detector's weights are missing; train it first"
            " (`dvc repro train@real-<seed>`)"
        )
    reference = real_embeddings(real_dir)
    clip = load_clip(settings.clip) if settings.clip is not None else None

    known = read_known(items, names)
    images = [item.image for item in items]
    found = [labels.boxes for labels in detect(weights, images, names, prelabel_settings, imgsz, device)]
    similarities = clip_similarities(clip, images, class_prompt) if clip is not None else None
    choices = choose(score_items(items, known, found, reference, similarities), settings.keep)
    # The datasets stage finds the images here: the rows' paths are relative to the set folder.
    result = {"set": Path(set_dir).as_posix()} | summary(choices, settings.keep)
    with fsio.replace_dir(Path(out)) as scratch:
        write_manifest(scratch / MANIFEST, COLUMNS, manifest_rows(choices))
        fsio.write_json(scratch / SUMMARY, result)
    return result


def main(params: Params, *, name: str, set_dir: Path, real: Path, weights: Path, out: Path) -> dict:
    """Entry point: the set's name (a key of filter.sets) and paths from dvc.yaml, settings from
    params (filter.*, prelabel.conf / iou, train.imgsz / device, classes, diffusion.class_prompt)."""
    return filter_set(
        set_dir,
        variants.set_stage(name, set_dir),
        real,
        weights,
        params.filter,
        params.classes,
        params.prelabel,
        params.train.imgsz,
        params.train.device,
        params.diffusion.class_prompt,
        out,
    )
