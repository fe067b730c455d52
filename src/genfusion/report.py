"""`report` stage: Genfusion Table-1 style summary over variants, models and seeds.

Rows are (variant, model); columns AP@0.5:0.95, AP50 and AP75 as mean +- sample std
over seeds (std is 0 for a single seed), and each mean's difference to the `real`
variant with the same model.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from genfusion import fsio
from genfusion.errors import GenfusionError

METRICS = (("map", "AP@0.5:0.95"), ("map50", "AP50"), ("map75", "AP75"))
BASELINE = "real"


def load_evaluations(eval_dir: Path, variants: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    records = []
    for variant in variants:
        for seed in seeds:
            path = eval_dir / f"{variant}-{seed}.json"
            try:
                records.append(json.loads(path.read_text()))
            except FileNotFoundError:
                raise GenfusionError(f"{path}: missing; run `dvc repro evaluate@{variant}-{seed}`") from None
            except json.JSONDecodeError as exc:
                raise GenfusionError(f"{path}: not valid JSON ({exc})") from None
    return records


def summarise(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{variant: {model: row}} with mean, std and the difference to the baseline variant."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["variant"], record["model"])].append(record)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (variant, model), runs in groups.items():
        row: dict = {
            "seeds": len(runs),
            "train_images": runs[0]["train_images"],
            "synthetic_images": runs[0]["synthetic_images"],
        }
        for key, _ in METRICS:
            values = [r[key] for r in runs]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[variant][model] = row
    for models in summary.values():
        for model, row in models.items():
            base = summary.get(BASELINE, {}).get(model)
            for key, _ in METRICS:
                row[f"{key}_delta"] = row[f"{key}_mean"] - base[f"{key}_mean"] if base else None
    return dict(summary)


def markdown_table(summary: dict[str, dict[str, dict]]) -> str:
    header = ["variant", "model", "seeds", "train images", *(label for _, label in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, models in summary.items():
        for model, row in models.items():
            cells = [variant, model, str(row["seeds"]), str(row["train_images"])]
            for key, _ in METRICS:
                cell = f"{row[f'{key}_mean']:.3f} ± {row[f'{key}_std']:.3f}"
                delta = row[f"{key}_delta"]
                if variant != BASELINE and delta is not None:
                    cell += f" ({delta:+.3f})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(summary: dict[str, dict[str, dict]]) -> str:
    return (
        "# Detector results on the real test split\n\n"
        "Mean ± sample standard deviation over seeds; in brackets, the difference to the"
        f" `{BASELINE}` variant with the same model. Written by `genfusion report`.\n\n"
        + markdown_table(summary)
    )


def main(eval_dir: Path, summary_out: Path, markdown_out: Path, params_path: Path) -> None:
    from genfusion.params import load_params

    params = load_params(params_path)
    summary = summarise(load_evaluations(eval_dir, params.train.variants, params.train.seeds))
    fsio.write_json(summary_out, summary)
    fsio.write_text(markdown_out, render_markdown(summary))
