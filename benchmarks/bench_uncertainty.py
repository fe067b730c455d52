"""Uncertainty order, measured: are the images whose automatic labels are least sure the ones
where people's labels correct most?

Run from the project root after the default run (`dvc repro`; needs the real detector
models/detectors/real-0/weights/best.pt and the copy-paste composites data/composites/):
    .venv/bin/python benchmarks/bench_uncertainty.py [--sizes 5 10 20 40] [--draws 200] [--seed 0]

The composites' labels are known by construction (each pasted object's box): they stand in for
people's labels. The real detector labels every composite as the prelabel stage's detector
method does (`genfusion.detection.detect` with params prelabel.conf, prelabel.iou, train.imgsz,
train.device); the images are ranked by `genfusion.commands.annotate.uncertainty` of their box
scores (the order `genfusion annotate push` imports them in, ties by file name). For each N it
prints the precision and recall at IoU 0.5 (the label_quality stage's greedy matching, pooled
over the images) of the automatic labels on the N most uncertain images, and the mean and 5-95 %
range of the same over `--draws` random sets of N images (seeded), with the corrections a person
makes per image (false boxes deleted plus missed objects added) and the share of random draws
whose precision is at most the top N's. If the hypothesis holds, the top N have lower precision
and recall, and more corrections per image, than random images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def pooled(rows: list[dict]) -> dict:
    from genfusion.stages.label_quality import counts_to_metrics

    tp = sum(r["tp"] for r in rows)
    predictions = sum(r["predictions"] for r in rows)
    truths = sum(r["truths"] for r in rows)
    metrics = counts_to_metrics(tp, predictions, truths)
    # What a person changes: delete each false box, add each missed object.
    metrics["corrections_per_image"] = ((predictions - tp) + (truths - tp)) / len(rows)
    return metrics


def main() -> None:
    import numpy as np

    from genfusion import layout
    from genfusion.commands.annotate import uncertainty
    from genfusion.detection import detect
    from genfusion.formats.yolo import read_label_file
    from genfusion.images import read_header
    from genfusion.params import load_params
    from genfusion.stages.label_quality import match

    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--weights", type=Path, default=Path("models/detectors/real-0/weights/best.pt"))
    parser.add_argument("--composites", type=Path, default=Path("data/composites"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = load_params(args.params)
    names, settings = params.classes, params.prelabel

    images = layout.image_files(args.composites)
    if not images:
        raise SystemExit(f"{layout.images_dir(args.composites)}: no composites; run `dvc repro` first")
    start = time.perf_counter()
    found = detect(args.weights, images, names, settings, params.train.imgsz, params.train.device)
    seconds = time.perf_counter() - start
    rows = []
    for path, labels in zip(images, found, strict=True):
        size = read_header(path).size
        truth = read_label_file(layout.label_file(args.composites, path.stem), names, size)
        rows.append(
            {
                "file": path.name,
                "uncertainty": uncertainty(labels.scores),
                "tp": match(labels.boxes, labels.scores, truth),
                "predictions": len(labels.boxes),
                "truths": len(truth),
            }
        )
    ranked = sorted(rows, key=lambda r: (-r["uncertainty"], r["file"]))
    spread = np.array([r["uncertainty"] for r in rows])
    everything = pooled(rows)
    print(
        f"{len(rows)} composites of {args.composites}, labelled by {args.weights} (conf {settings.conf},"
        f" iou {settings.iou}, imgsz {params.train.imgsz}, {params.train.device}) in {seconds:.1f} s"
    )
    print(
        f"uncertainty: min {spread.min():.3f}, median {np.median(spread):.3f}, max {spread.max():.3f};"
        f" {sum(r['predictions'] == 0 for r in rows)} images without an automatic box"
    )
    print(
        f"all images: precision {everything['precision']:.3f}, recall {everything['recall']:.3f},"
        f" corrections/image {everything['corrections_per_image']:.2f}"
        f" ({everything['true_positives']} of {everything['predictions']} boxes right,"
        f" {everything['truths']} objects)"
    )
    rng = np.random.default_rng(args.seed)
    print(
        f"\n{'N':>3}  {'top-N precision':>15}  {'random precision, mean [5-95 %]':>32}  {'P(rand<=top)':>12}"
        f"  {'top-N recall':>12}  {'random recall, mean [5-95 %]':>29}"
        f"  {'top-N corr/img':>14}  {'random corr/img, mean [5-95 %]':>31}"
    )
    for n in args.sizes:
        if n > len(rows):
            print(f"{n:>3}  more than the {len(rows)} images: skipped")
            continue
        top = pooled(ranked[:n])
        draws = [
            pooled([rows[k] for k in rng.choice(len(rows), n, replace=False)]) for _ in range(args.draws)
        ]

        def spread_of(key: str, digits: int = 3, values: list[dict] = draws) -> str:
            v = np.array([d[key] for d in values])
            low, high = np.percentile(v, [5, 95])
            return f"{v.mean():.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

        as_bad = np.mean([d["precision"] <= top["precision"] for d in draws])
        print(
            f"{n:>3}  {top['precision']:>15.3f}  {spread_of('precision'):>32}  {as_bad:>12.3f}"
            f"  {top['recall']:>12.3f}  {spread_of('recall'):>29}"
            f"  {top['corrections_per_image']:>14.2f}  {spread_of('corrections_per_image', 2):>31}"
        )
    print(
        f"\n(pooled over the N images, IoU >= 0.5, greedy matching highest score first; random: {args.draws}"
        f" draws without replacement, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
