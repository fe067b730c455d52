"""`inspect` stage: real against synthetic, seen and measured (`genfusion inspect app` shows it).

The stage reads every real tile (by split), every generated image (by subject) and every image
of the sets made from the real tiles (genfusion.variants), with their labels, and
- writes `metrics/distribution.json` (a DVC metric) and `reports/distribution.png`: colour,
  brightness and saturation of each synthetic set against the real train split, boxes per
  image and box sizes, KID on the chosen embedding, and the share of synthetic images that
  are near-copies of a real train image (memorisation) or of a real test image (leakage);
- builds or updates a persistent FiftyOne dataset of the same images (one sample per file:
  new files are added, vanished ones removed, none duplicated) with their fields, labels,
  the trained detectors' predictions on the test split, embeddings, FiftyOne Brain's 2-D map,
  uniqueness and similarity index, and saved views for the App.
The metrics depend on the files only; the FiftyOne database is a side effect, kept in
`inspect.database_dir` (git-ignored).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genfusion import distribution, fsio, layout, variants
from genfusion.boxes import Box
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import read_label_file
from genfusion.integrations.fiftyone import add_brain, connect, detections, follow_project_move, use_database
from genfusion.layout import SPLITS, Sources
from genfusion.params import InspectParams, Params
from genfusion.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One image the stage looks at, with what FiftyOne shows of it."""

    path: Path
    source: str  # real | generated | a made set's tag (genfusion.variants: variation, composite, ...)
    set: str  # real/<split>, generated/<subject>, a made set's folder (variations, inpainted/<subject>)
    split: str | None = None
    subject: str | None = None
    scene: str | None = None
    prompt: str | None = None
    seed: int | None = None
    truth: list[Box] | None = None  # real labels, a variation's carried labels, a composite's own
    auto: list[Box] | None = None  # the prelabel stage's
    people: list[Box] | None = None  # from Label Studio
    stats: distribution.ImageStats | None = None
    embedding: np.ndarray | None = None
    copy_of: dict[str, str] = field(default_factory=dict)  # "train" / "test" -> real image name
    # The filter stage's verdict on an image of a filtered set (data/filtered/<set>/): its
    # combined score and whether it is kept; None for images of sets not filtered.
    filter_score: float | None = None
    filter_kept: bool | None = None
    # The labels a detector trains on: the real or carried ones, or for a generated image those
    # `labels.source` chooses (none when it has none).
    labels: list[Box] = field(default_factory=list)


def read_boxes(label: Path, names: Sequence[str], size: tuple[int, int]) -> list[Box] | None:
    if not label.is_file():
        return None
    return read_label_file(label, names, size)


def rows_by_name(manifest: Path) -> dict[str, dict[str, str]]:
    if not manifest.is_file():
        return {}
    with manifest.open(newline="") as f:
        return {Path(row.get("file") or row.get("image", "")).name: row for row in csv.DictReader(f)}


# What the filter stage writes beside its manifest: the set it ranked, among its figures.
FILTER_SUMMARY = "summary.json"


def filter_verdicts(filtered: Path) -> dict[Path, dict[str, dict[str, str]]]:
    """The quality filter's verdicts on each set it ranked, by the set's folder (its summary
    names it), each image's row by file name."""
    verdicts = {}
    for summary in sorted(filtered.glob(f"*/{FILTER_SUMMARY}")):
        ranked = Path(json.loads(summary.read_text())["set"]).resolve()
        verdicts[ranked] = rows_by_name(summary.parent / layout.MANIFEST)
    return verdicts


def made_sets(sources: Sources) -> list[tuple[str, variants.MadeSet]]:
    """(variant, its set) of each made set the stage was given, in the registry's order."""
    return [(name, variants.made_set(name, "inspect")) for name in variants.MADE if name in sources.sets]


def collect(
    sources: Sources, subjects: Sequence[str], names: Sequence[str], label_source: str
) -> tuple[list[Item], list[str]]:
    """Every image and its labels; and what is missing, said in words."""
    from genfusion.images import read_header

    items, missing = [], []
    scenes = rows_by_name(sources.real / layout.MANIFEST)
    for split in SPLITS:
        for path in layout.image_files(sources.real, split):
            label = layout.label_file(sources.real, path.stem, split)
            truth = read_boxes(label, names, read_header(path).size) or []
            scene = scenes.get(path.name, {}).get("scene")
            items.append(
                Item(path, "real", f"real/{split}", split=split, scene=scene, truth=truth, labels=truth)
            )
    if not items:
        raise GenfusionError(f"{sources.real}: no real images; run `dvc repro seeds`")
    for subject in subjects:
        folder = sources.generated / subject
        images = layout.image_files(folder)
        if not images:
            missing.append(f"generated/{subject}: no images yet (`dvc repro generate@{subject}`)")
            continue
        rows = rows_by_name(folder / layout.MANIFEST)
        for path in images:
            size = read_header(path).size
            row = rows.get(path.name, {})
            auto_file = layout.label_file(sources.prelabels / subject, path.stem)
            people_file = layout.label_file(sources.annotations / subject, path.stem)
            read = {
                auto_file: read_boxes(auto_file, names, size),
                people_file: read_boxes(people_file, names, size),
            }
            chosen = layout.generated_label(sources, subject, path.stem, label_source)
            items.append(
                Item(
                    path,
                    "generated",
                    f"generated/{subject}",
                    subject=subject,
                    prompt=row.get("prompt"),
                    seed=int(row["seed"]) if row.get("seed") else None,
                    auto=read[auto_file],
                    people=read[people_file],
                    labels=read[chosen] if chosen else [],
                )
            )
    # The sets made from the real train tiles, labels carried over or known by construction, in
    # the registry's order: (folder, source tag, set name, stage, manifest column naming the tile
    # each image comes from).
    derived = [
        (folder, made.tag, name, stage, made.origin)
        for variant, made in made_sets(sources)
        for folder, name, stage in variants.set_folders(variant, sources.sets[variant], subjects)
    ]
    verdicts_by_folder = filter_verdicts(sources.filtered) if sources.filtered else {}
    for folder, source, name, stage, origin in derived:
        images = layout.image_files(folder)
        if not images:
            missing.append(f"{name}: no images yet (`dvc repro {stage}`)")
        rows = rows_by_name(folder / layout.MANIFEST)
        verdicts = verdicts_by_folder.get(folder.resolve(), {})
        for path in images:
            verdict = verdicts.get(path.name)
            # The scene of the real tile it was made from.
            scene = scenes.get(Path(rows.get(path.name, {}).get(origin, "")).name, {}).get("scene")
            truth = read_boxes(layout.label_file(folder, path.stem), names, read_header(path).size) or []
            item = Item(path, source, name, scene=scene, truth=truth, labels=truth)
            if verdict:
                item.filter_score, item.filter_kept = float(verdict["score"]), verdict["kept"] == "true"
            items.append(item)
    return items, missing


def measure(items: Sequence[Item], embed) -> None:
    """Fill in each item's colour stats and embedding (decoding every image once)."""
    from PIL import Image

    for item in progress_bar(items, f"inspect: {len(items)} images"):
        with Image.open(item.path) as image:
            rgb = np.asarray(image.convert("RGB"))
        item.stats = distribution.image_stats(rgb)
        item.embedding = embed(rgb)


def box_sizes(items: Sequence[Item]) -> list[float]:
    """Each box's side relative to its image: sqrt(box area / image area)."""
    sizes = []
    for item in items:
        side = np.sqrt(item.stats.histogram[0].sum())  # pixels in the image
        sizes += [np.sqrt(max(b.area, 0.0)) / side for b in item.labels]
    return sizes


def flag_copies(synthetic: Sequence[Item], real: Sequence[Item], kind: str, threshold: float) -> dict:
    """Mark synthetic items whose nearest `real` image is a near-duplicate: the share marked,
    and the highest similarity found (how close the set comes to the threshold)."""
    best, similarity = distribution.nearest([s.stats for s in synthetic], [r.stats for r in real])
    for item, k, value in zip(synthetic, best, similarity, strict=True):
        if value >= threshold:
            item.copy_of[kind] = real[k].path.name
    share = sum(kind in s.copy_of for s in synthetic) / len(synthetic) if synthetic else 0.0
    return {"share": share, "max_similarity": float(similarity.max(initial=0.0))}


def distribution_metrics(items: Sequence[Item], missing: Sequence[str], settings: InspectParams) -> dict:
    """The DVC metric: the real train split, and each synthetic set against it."""
    train = [i for i in items if i.set == "real/train"]
    test = [i for i in items if i.set == "real/test"]
    report: dict = {
        "embedding": settings.embedding,
        "real": {
            "images": {split: sum(i.split == split for i in items) for split in SPLITS},
            "brightness": distribution.summary([i.stats.brightness for i in train]),
            "saturation": distribution.summary([i.stats.saturation for i in train]),
            "boxes_per_image": distribution.summary([len(i.labels) for i in train]),
            "box_size": distribution.summary(box_sizes(train)),
        },
        "sets": {},
        "missing": list(missing),
    }
    reference = np.stack([i.embedding for i in train])
    for name in sorted({i.set for i in items if i.source != "real"}):
        members = [i for i in items if i.set == name]
        counts = [len(i.labels) for i in members]
        report["sets"][name] = {
            "images": len(members),
            "colour_distance": distribution.colour_distance(
                [i.stats for i in train], [i.stats for i in members]
            ),
            "brightness": distribution.summary([i.stats.brightness for i in members]),
            "saturation": distribution.summary([i.stats.saturation for i in members]),
            "boxes_per_image": distribution.summary(counts),
            "boxes_per_image_distance": distribution.values_distance([len(i.labels) for i in train], counts),
            "box_size_distance": distribution.values_distance(box_sizes(train), box_sizes(members)),
            "kid": distribution.kid(reference, np.stack([i.embedding for i in members])),
            # The made sets (img2img variations, objects pasted or painted onto tiles) are made
            # from the train tiles: near-copies of them by design.
            "memorisation": None
            if members[0].source in variants.MADE_TAGS
            else flag_copies(members, train, "train", settings.memorisation_threshold),
            "leakage": flag_copies(members, test, "test", settings.leakage_threshold),
        }
    return report


def distribution_figure(items: Sequence[Item]):
    """Colour histograms, brightness / saturation, boxes per image and box sizes, per set."""
    from matplotlib.figure import Figure

    sets = ["real/train"] + sorted({i.set for i in items if i.source != "real"})
    figure = Figure(figsize=(12, 8), dpi=90)
    axes = figure.subplots(2, 3).ravel()
    for name in sets:
        members = [i for i in items if i.set == name]
        pooled = sum(i.stats.histogram for i in members).astype(np.float64)  # one image at a time
        for c, colour in enumerate(("red", "green", "blue")):
            axes[c].plot(pooled[c] / pooled[c].sum(), label=name)
            axes[c].set_title(f"{colour} channel")
        axes[3].scatter(
            [i.stats.brightness for i in members], [i.stats.saturation for i in members], s=8, label=name
        )
        axes[4].hist([len(i.labels) for i in members], bins=20, histtype="step", density=True, label=name)
        axes[5].hist(box_sizes(members), bins=30, histtype="step", density=True, label=name)
    axes[3].set(title="per image", xlabel="brightness (HSV value)", ylabel="saturation")
    axes[4].set(title="boxes per image", xlabel="boxes")
    axes[5].set(title="box size", xlabel="sqrt(box area / image area)")
    for ax in axes[:3]:
        ax.set(xlabel="pixel value", ylabel="share of pixels")
    axes[0].legend(fontsize=7)
    figure.suptitle("Real train split against each synthetic set")
    figure.tight_layout()
    return figure


# --- embeddings ----------------------------------------------------------------------------


def embedder(settings: InspectParams):
    """image (H, W, 3) uint8 -> embedding vector, as `inspect.embedding` says."""
    if settings.embedding == "descriptor":
        return distribution.descriptor
    return clip_embedder(settings.clip_model)


def clip_embedder(model_id: str):
    """CLIP image features from a local folder or a hub id already in the cache."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_id).eval()
        processor = CLIPImageProcessor.from_pretrained(model_id)
    except OSError as exc:
        raise GenfusionError(
            f"inspect.clip_model: cannot load {model_id!r} ({exc}); give a local folder saved with"
            f" save_pretrained, or download it once: `hf download {model_id} --local-dir models/clip`"
        ) from exc

    def embed(rgb: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            features = model.get_image_features(**processor(images=rgb, return_tensors="pt"))
        # transformers 5 returns the vision outputs with the projected embedding as pooler_output.
        projected = features.pooler_output if hasattr(features, "pooler_output") else features
        vector = projected[0].double().numpy()
        return vector / np.linalg.norm(vector)

    return embed


# --- FiftyOne ------------------------------------------------------------------------------


def field_types() -> dict[str, dict]:
    """The sample fields the stage writes, with their FiftyOne types."""
    import fiftyone as fo

    text, labels = (
        {"ftype": fo.StringField},
        {"ftype": fo.EmbeddedDocumentField, "embedded_doc_type": fo.Detections},
    )
    return {
        "source": text,
        "subject": text,
        "split": text,
        "scene": text,
        "prompt": text,
        "seed": {"ftype": fo.IntField},
        "ground_truth": labels,
        "auto_labels": labels,
        "people_labels": labels,
        "embedding": {"ftype": fo.VectorField},
        "copy_of_train": text,
        "copy_of_test": text,
        "filter_score": {"ftype": fo.FloatField},
        "filter_kept": {"ftype": fo.BooleanField},
    }


def sample_fields(item: Item) -> dict:
    from genfusion.images import read_header

    size = read_header(item.path).size
    return {
        "source": item.source,
        "subject": item.subject,
        "split": item.split,
        "scene": item.scene,
        "prompt": item.prompt,
        "seed": item.seed,
        "ground_truth": detections(item.truth, size),
        "auto_labels": detections(item.auto, size),
        "people_labels": detections(item.people, size),
        "embedding": item.embedding,
        "copy_of_train": item.copy_of.get("train"),
        "copy_of_test": item.copy_of.get("test"),
        "filter_score": item.filter_score,
        "filter_kept": item.filter_kept,
    }


# Samples whose fields are set at once.
FIELD_BATCH = 10_000


def sync_dataset(name: str, items: Sequence[Item]):
    """The persistent dataset holding exactly `items`, one sample per file, fields refreshed (a
    moved project's samples kept, with the tags people gave them in the App)."""
    import fiftyone as fo

    dataset = fo.load_dataset(name) if name in fo.list_datasets() else fo.Dataset(name, persistent=True)
    follow_project_move(dataset, layout.project_root())
    wanted = {str(item.path.resolve()): item for item in items}
    present = dict(zip(dataset.values("filepath"), dataset.values("id"), strict=True)) if len(dataset) else {}
    gone = [sample_id for path, sample_id in present.items() if path not in wanted]
    if gone:
        log.info("inspect: %d images are gone since the last run; removing them from %s", len(gone), name)
        dataset.delete_samples(gone)
    dataset.add_samples([fo.Sample(filepath=path) for path in wanted if path not in present])
    schema = dataset.get_field_schema()
    for key, kind in field_types().items():
        if key not in schema:
            # Declared up front: FiftyOne cannot infer a type from a field that is None everywhere.
            dataset.add_sample_field(key, **kind)
    # Set by sample id, a batch of samples at a time: keyed by file path, FiftyOne looks every
    # path up in one query, which MongoDB refuses past 16 MB (about 200,000 paths), and the
    # fields of every sample at once cost a few KB an image.
    ids = dict(zip(dataset.values("filepath"), dataset.values("id"), strict=True))
    paths = list(wanted)
    for start in range(0, len(paths), FIELD_BATCH):
        values = {ids[path]: sample_fields(wanted[path]) for path in paths[start : start + FIELD_BATCH]}
        for key in field_types():
            dataset.set_values(key, {sample_id: v[key] for sample_id, v in values.items()}, key_field="id")
    dataset.untag_samples(["memorised", "leaked"])
    dataset.exists("copy_of_train").tag_samples("memorised")
    dataset.exists("copy_of_test").tag_samples("leaked")
    return dataset


def add_predictions(dataset, detectors: Path, params: Params) -> list[str]:
    """Each trained detector's boxes on the real test split, scored against the ground truth;
    the prediction fields back."""
    from fiftyone import ViewField as F

    from genfusion.integrations.ultralytics import load_yolo

    test = dataset.match(F("split") == "test")
    paths = test.values("filepath")
    fields = []
    # Hidden folders are trainings under way (`.<run>.partial`), not detectors.
    finished = [
        w for w in sorted(detectors.glob("*/weights/best.pt")) if not w.parent.parent.name.startswith(".")
    ]
    for weights in finished:
        name = "pred_" + weights.parent.parent.name.replace("-", "_")
        model = load_yolo(weights)
        found = {}
        for path in paths:
            result = model.predict(
                path,
                imgsz=params.train.imgsz,
                conf=params.report.conf,
                device=params.train.device,
                verbose=False,
            )[0]
            height, width = result.orig_shape
            names = [params.classes[int(c)] for c in result.boxes.cls.tolist()]
            boxes = [
                Box(n, *map(float, xyxy)) for n, xyxy in zip(names, result.boxes.xyxy.tolist(), strict=True)
            ]
            found[path] = detections(boxes, (width, height), result.boxes.conf.tolist())
        dataset.set_values(name, found, key_field="filepath")
        test.evaluate_detections(name, gt_field="ground_truth", eval_key=f"eval_{name}")
        fields.append(name)
    return fields


def save_views(dataset, prediction_fields: Sequence[str]) -> list[str]:
    from fiftyone import ViewField as F

    views = {
        "real-vs-synthetic": dataset.sort_by("source"),
        "most-unique-synthetic": dataset.match(F("source") != "real").sort_by("uniqueness", reverse=True),
        "suspected-copies": dataset.match_tags(["memorised", "leaked"]),
        # The quality filter's choices, worst first: what it dropped, then what it kept.
        "filter-dropped": dataset.match(F("filter_kept") == False).sort_by("filter_score"),  # noqa: E712
        "filter-kept": dataset.match(F("filter_kept") == True).sort_by("filter_score"),  # noqa: E712
    }
    for name in prediction_fields:
        # Its own detector's false positives over the ground truth, not every detector's boxes.
        others = [field for field in prediction_fields if field != name]
        views[f"false-positives-{name.removeprefix('pred_')}"] = (
            dataset.match(F("split") == "test")
            .filter_labels(name, F(f"eval_{name}") == "fp")
            .exclude_fields([*others, "auto_labels", "people_labels"])
        )
    for view_name, view in views.items():
        dataset.save_view(view_name, view, overwrite=True)
    return list(views)


# --- entry points --------------------------------------------------------------------------


def main(params: Params, *, sources: Sources, metrics: Path, figure: Path) -> dict:
    settings = params.inspect
    items, missing = collect(sources, list(params.subjects), params.classes, params.labels.source)
    for line in missing:
        log.warning("inspect: %s", line)
    measure(items, embedder(settings))
    report = distribution_metrics(items, missing, settings)
    for name, values in report["sets"].items():
        for kind, check in (("train", values["memorisation"]), ("test", values["leakage"])):
            if check and check["share"]:
                share = 100 * check["share"]
                log.warning(
                    "inspect: %s: %.0f%% of its images are near-copies of real %s images", name, share, kind
                )
    use_database(Path(settings.database_dir))
    connect()
    dataset = sync_dataset(settings.dataset, items)
    fields = add_predictions(dataset, sources.detectors, params)
    add_brain(dataset)
    views = save_views(dataset, fields)
    log.info(
        "inspect: FiftyOne dataset %r, %d samples, views: %s",
        settings.dataset,
        len(dataset),
        ", ".join(views),
    )
    fsio.write_png(figure, distribution_figure(items))
    fsio.write_json(metrics, report)
    return report
