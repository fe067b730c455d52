"""Manifests: the CSV beside an image set with a row per image (its file and how it was made).

They are both provenance (every generated image traceable to model, prompt and seed) and the
resume state of the stages that make images one by one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from genfusion import fsio
from genfusion.errors import GenfusionError


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows by file; a missing manifest has none; an unreadable one is an error naming it."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return {row["file"]: row for row in csv.DictReader(f)}
    except FileNotFoundError:
        return {}
    except (csv.Error, KeyError, UnicodeDecodeError) as exc:
        raise GenfusionError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc


def write_manifest(path: Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fsio.write_text(path, text.getvalue())


def append_manifest(path: Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Rows added at the end of a manifest `write_manifest` wrote: a long run records its
    progress at the cost of a batch, where rewriting the whole file after every batch grows with
    the square of the images. A run killed mid-write leaves a torn last row, which matches no
    request (a field is cut or missing), so its image is made again."""
    with path.open("a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=columns, lineterminator="\n").writerows(rows)
