"""The resumable image-job runner shared by `class_images`, `generate`, `variations`,
`composite` and `inpaint`.

The output folder is its own resume state: an image is kept when its manifest row matches the
current request (same model fingerprint, prompt, seed and sampler settings), so a rerun renders
only the batches with something missing and a killed run loses at most the batch in flight.
Each PNG is renamed into place when complete; its manifest row is appended after every batch
(every round of batches, one per process, when several share the work), and the manifest is
rewritten whole, in request order, at the end.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import fsio
from genfusion.errors import GenfusionError
from genfusion.launch import gather_to_main, share_label
from genfusion.layout import MANIFEST
from genfusion.manifest import append_manifest, read_manifest, write_manifest
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    from accelerate import PartialState
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageJob:
    """One output image: its file, its manifest row, and what rendering it needs."""

    file: str  # relative to the output folder, e.g. images/canopy_00003.png
    row: dict[str, str]  # the manifest row; the same row means the same image
    seed: int
    prompt: str
    source: Path | None = None  # img2img input image
    companions: dict[str, bytes] = field(default_factory=dict)  # files written beside it (labels)
    extras: tuple[str, ...] = ()  # files `render` makes beside it (attention maps)


def _intact(out_dir: Path, job: ImageJob) -> bool:
    return (
        (out_dir / job.file).is_file()
        and all(
            (out_dir / name).is_file() and (out_dir / name).read_bytes() == data
            for name, data in job.companions.items()
        )
        and all((out_dir / name).is_file() for name in job.extras)
    )


def _remove_strays(out_dir: Path, subdirs: Sequence[str], keep: set[str]) -> None:
    """Delete what a clean run would not have written: images of other requests, temp files."""
    for sub in subdirs:
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (out_dir / sub).iterdir():
            if f"{sub}/{path.name}" not in keep and path.is_file():
                path.unlink()
    for tmp in out_dir.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink()


def _batches(
    jobs: Sequence[ImageJob], size: int, key: Callable[[ImageJob], Hashable]
) -> Iterator[list[ImageJob]]:
    """Consecutive jobs with the same key, at most `size` at a time (a pipeline call needs one size)."""
    for _, group in itertools.groupby(jobs, key):
        group = list(group)
        for start in range(0, len(group), size):
            yield group[start : start + size]


def run_jobs(
    out_dir: Path,
    jobs: Sequence[ImageJob],
    columns: Sequence[str],
    render: Callable[[list[ImageJob]], list[Image.Image] | list[tuple[Image.Image, dict[str, bytes]]]],
    batch: int,
    description: str,
    subdirs: Sequence[str] = ("images",),
    batch_key: Callable[[ImageJob], Hashable] = lambda job: None,
    state: PartialState | None = None,
) -> list[dict[str, str]]:
    """Render the jobs not already in `out_dir` with the same row; return the manifest rows.

    `render` gives an image per job, or (image, {file: bytes}) when it also makes the job's
    `extras`; these and the companions are written before the image, which marks the job done.

    Several processes (`diffusion.processes`, torchrun on one node or several) share the work
    batch by batch; only the main process deletes strays and writes the manifest.
    """
    from accelerate import PartialState

    state = state or PartialState()
    out_dir = Path(out_dir)
    try:
        previous = read_manifest(out_dir / MANIFEST)
    except GenfusionError as exc:
        # The manifest is only resume state here: without it, the images are made again.
        log.warning("%s; its images will be made again", exc)
        previous = {}
    kept = {job.file for job in jobs if previous.get(job.file) == job.row and _intact(out_dir, job)}
    log.info(
        "%s: %d images to make, %d kept from earlier runs", description, len(jobs) - len(kept), len(kept)
    )
    state.wait_for_everyone()
    if state.is_main_process:
        keep = kept | {name for job in jobs if job.file in kept for name in (*job.companions, *job.extras)}
        _remove_strays(out_dir, subdirs, keep)
        write_manifest(out_dir / MANIFEST, columns, [job.row for job in jobs if job.file in kept])
    state.wait_for_everyone()

    # Batches are fixed blocks of the whole request, rendered whole even when some of their
    # images are kept, so a resumed or sharded run renders each image in the same company as an
    # uninterrupted one: batched kernels can round differently with a different batch, and
    # identical bytes need identical batches. Only the missing images are written.
    blocks = [block for block in _batches(jobs, batch, batch_key) if any(j.file not in kept for j in block)]
    # Round r gives process p block r * n + p. After each round the main process appends every
    # process's rows, so a restarted run (torchrun --max-restarts) keeps all that was finished.
    n, me = state.num_processes, state.process_index
    mine = blocks[me::n]
    count = sum(job.file not in kept for block in mine for job in block)
    rounds = range(0, len(blocks), n)
    for first in progress_bar(rounds, f"{description} ({share_label(state, count)})", total=len(rounds)):
        done = []
        if first + me < len(blocks):
            chunk = blocks[first + me]
            for job, made in zip(chunk, render(chunk), strict=True):
                if job.file in kept:
                    continue
                image, extras = made if isinstance(made, tuple) else (made, {})
                for name, data in (job.companions | extras).items():
                    fsio.write_bytes(out_dir / name, data)
                fsio.write_png(out_dir / job.file, image)
                done.append(job.row)
        done = gather_to_main(state, done)
        if state.is_main_process:
            append_manifest(out_dir / MANIFEST, columns, done)
    state.wait_for_everyone()
    rows = [job.row for job in jobs]
    if state.is_main_process:
        write_manifest(out_dir / MANIFEST, columns, rows)
    return rows
