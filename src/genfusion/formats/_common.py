"""Helpers every annotation reader shares: finding files and images, checked numbers and JSON
fields, and errors that name the file and what is wrong."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genfusion.errors import GenfusionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ANY_IMAGE = f".* ({' '.join(IMAGE_EXTENSIONS)})"  # how error messages say "any image extension"
YAML_SUFFIXES = (".yaml", ".yml")


def _files(folder: Path, suffixes: Sequence[str], recursive: bool = True) -> list[Path]:
    """Files under `folder` whose extension, in any case, is one of `suffixes`; sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files and folders (.ipynb_checkpoints, half-written .tmp files) hold copies, not data.
    return sorted(
        p
        for p in found
        if p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _single_file(folder: Path, suffixes: Sequence[str], what: str) -> Path:
    found = _files(folder, suffixes, recursive=False)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) or "none"
        raise GenfusionError(
            f"{folder}: expected exactly one {what} file in the folder, found {len(found)}: {listing}"
        )
    return found[0]


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _find_image(candidates: Sequence[Path], where: str, also: str = "") -> Path:
    """The first candidate that is a file; else the "label file without its image" error."""
    for path in candidates:
        if path.is_file():
            return path
    looked = [str(p) for p in dict.fromkeys(candidates)] + ([also] if also else [])
    raise GenfusionError(f"{where}: label file without its image: looked for {' or '.join(looked)}")


def _no_label_error(images: Sequence[Path], hint: str) -> GenfusionError:
    """The reverse of "label file without its image": images that nothing annotates."""
    more = f" (nor have {_listing(images[1:])})" if len(images) > 1 else ""
    return GenfusionError(
        f"{images[0]}: image has no label file{more}; {hint} to mark an image with no objects"
    )


def _number(value: Any, where: str) -> float:
    """`value` as a finite float; `where` names the file and field for the error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    # bool is an int to Python, but `true` is never a coordinate.
    if isinstance(value, bool) or not math.isfinite(number):
        raise GenfusionError(f"{where} is not a number: {value!r}")
    return number


def _size(width: Any, height: Any, where: str) -> tuple[int, int] | None:
    """(width, height), or None where the file leaves it out or writes 0 (tools do, for unknown)."""
    if width is None or height is None:
        return None
    size = (round(_number(width, f"{where} width")), round(_number(height, f"{where} height")))
    return size if min(size) > 0 else None


def _get(mapping: Any, key: str, where: str) -> Any:
    """A required JSON / YAML field."""
    if not isinstance(mapping, dict):
        raise GenfusionError(f"{where} is not an object: {str(mapping)[:60]!r}")
    if mapping.get(key) is None:
        raise GenfusionError(f"{where} has no {key!r}")
    return mapping[key]


def _get_list(mapping: Any, key: str, where: str) -> list:
    value = _get(mapping, key, where)
    if not isinstance(value, list):
        raise GenfusionError(f"{where}: {key!r} is not a list")
    return value


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    except UnicodeDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed JSON: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err


def _json_source(source: Path) -> Path:
    return _single_file(source, (".json",), "JSON") if source.is_dir() else source
