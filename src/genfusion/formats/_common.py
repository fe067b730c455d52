"""Helpers every annotation reader shares: finding files and images inside the source folder,
checked numbers and JSON fields, and errors that name the file and what is wrong."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genfusion.errors import GenfusionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ANY_IMAGE = f".* ({' '.join(IMAGE_EXTENSIONS)})"  # how error messages say "any image extension"
YAML_SUFFIXES = (".yaml", ".yml")


def _inside(path: Path, root: Path, where: str = "") -> Path:
    """`path`, once it resolves (links followed) inside `root`, the source folder. DVC versions
    only that folder, so data read from elsewhere could change unseen, and an annotation file
    could make a reader open any file on the machine."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()) and not _in_dvc_cache(resolved, root):
        prefix = f"{where}: " if where else ""
        shown = path if resolved == path.absolute() else f"{path} -> {resolved}"
        raise GenfusionError(
            f"{prefix}{shown} resolves outside the source folder {root}; DVC versions only that"
            " folder, so copy the data into it"
        )
    return path


def _in_dvc_cache(resolved: Path, root: Path) -> bool:
    """Whether `resolved` is a file of the DVC cache of the project holding `root`: with DVC's
    `cache.type: symlink` every file of a `dvc add`-ed folder is a link into it, and those files
    are the folder's versioned content."""
    cache = _dvc_cache(root.resolve())
    return cache is not None and resolved.is_relative_to(cache)


@functools.cache
def _dvc_cache(root: Path) -> Path | None:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(Repo.find_root(str(root))) as repo:
            return Path(repo.cache.local.path).resolve()
    except NotDvcRepoError:
        return None


def _files(folder: Path, suffixes: Sequence[str], root: Path, recursive: bool = True) -> list[Path]:
    """Files under `folder` whose extension, in any case, is one of `suffixes`; sorted. The
    folder, those files and every folder below must lie inside `root` (see `_inside`)."""
    _inside(folder, root)
    found = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files and folders (.ipynb_checkpoints, half-written .tmp files) hold copies, not data.
    visible = [p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    # The walk does not enter linked folders: one leading out would drop its images unseen.
    for subfolder in (p for p in visible if recursive and p.is_dir()):
        _inside(subfolder, root)
    return sorted(_inside(p, root) for p in visible if p.suffix.lower() in suffixes and p.is_file())


def _single_file(folder: Path, suffixes: Sequence[str], what: str) -> Path:
    found = _files(folder, suffixes, folder, recursive=False)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) or "none"
        raise GenfusionError(
            f"{folder}: expected exactly one {what} file in the folder, found {len(found)}: {listing}"
        )
    return found[0]


def _annotation_file(source: Path, suffixes: Sequence[str], what: str) -> Path:
    """The one `what` file of a source folder, or `source` itself when it is that file."""
    return _single_file(source, suffixes, what) if source.is_dir() else _inside(source, source.parent)


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _find_image(candidates: Sequence[Path], where: str, root: Path, also: str = "") -> Path:
    """The first candidate that is a file; else the "label file without its image" error. Each
    must lie inside `root` (see `_inside`) before it is even looked at."""
    for path in candidates:
        if _inside(path, root, where).is_file():
            return path
    looked = [str(p) for p in dict.fromkeys(candidates)] + ([also] if also else [])
    raise GenfusionError(f"{where}: label file without its image: looked for {' or '.join(looked)}")


def _no_label_error(images: Sequence[Path], hint: str) -> GenfusionError:
    """The reverse of "label file without its image": images that nothing annotates."""
    more = f" (nor have {_listing(images[1:])})" if len(images) > 1 else ""
    return GenfusionError(
        f"{images[0]}: image has no label file{more}; {hint} to mark an image with no objects"
    )


def _finite(value: Any) -> float:
    """`value` as a finite float; ValueError otherwise (nan, inf and 1e400 are no coordinates)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    # bool is an int to Python, but `true` is never a coordinate.
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"not a number: {value!r}")
    return number


def _number(value: Any, where: str) -> float:
    """`value` as a finite float; `where` names the file and field for the error."""
    try:
        return _finite(value)
    except ValueError as err:
        raise GenfusionError(f"{where} is {err}") from None


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
