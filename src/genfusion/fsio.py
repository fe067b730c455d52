"""Writes that never leave a half-written file or folder behind.

Every output is written under a temporary name in the same folder and renamed into
place, so an interrupted stage leaves the previous output (or nothing), never a
truncated one; what an interrupted run left is removed by the next write of the same output.
Outputs get the modes of any file the process creates (0666 / 0777 less the umask), not the
private ones of temporary files, so that a teammate or a shared DVC cache can read them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_png(path: Path, image: Any) -> None:
    """A PIL image, or a matplotlib figure, as a PNG file."""
    buffer = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buffer, format="png")
    else:
        image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def replace_dir(path: Path) -> Iterator[Path]:
    """Yield an empty scratch folder, `.<name>.tmp` beside `path`, that replaces `path` only if the
    block succeeds. The scratch name is fixed, so that what an interrupted run left (a kill -9
    skips every cleanup) is found and removed without listing the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (scratch, old):
        shutil.rmtree(stale, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
        os.replace(scratch, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, path)
