"""Attention maps captured while generating, for the `prelabel` stage (Dataset Diffusion's method).

Class-prompt appending: the class names are appended to each prompt, so that every class has
its own tokens to attend to. While the pipeline runs, capturing processors on the UNet's
attention modules record, for the conditional half of the batch only:
- cross-attention (`attn2`) of each class's tokens (mean over its tokens, so a class word the
  tokenizer splits into several tokens works), from every selected layer, averaged over the
  selected sampling steps, per map size, then over map sizes at S cells on a side: `cross` (C, S, S);
- self-attention (`attn1`) of the layers whose map is S on a side (`map_size`, or with `auto`
  the largest up to AUTO_MAX_SIDE), averaged the same way: `self` (S*S, S*S), which the
  prelabel stage raises to a power to refine `cross`.

A capturing processor computes its probabilities beside the module's own processor and returns
that processor's output untouched, so images are the same bytes with or without capture.
Nothing is installed unless `prelabel.method` is `attention`: plain generation runs as before.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from genfusion.errors import GenfusionError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from genfusion.params import PrelabelParams

# map_size auto: the largest self-attention map kept, in cells on a side; its (S*S)^2 values are
# stored per image (2 MB in float16 at 32), and SD 1.x at 512 px has maps of 64 (32 MB).
AUTO_MAX_SIDE = 32
# A fixed zip timestamp, so the same maps give the same file bytes (np.savez stamps "now").
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def class_prompt(prompt: str, classes: Sequence[str]) -> str:
    """The prompt with the class names appended (Dataset Diffusion's class-prompt appending)."""
    return f"{prompt}; {' '.join(classes)}"


def class_token_positions(tokenizer, prompt: str, classes: Sequence[str], key: str) -> list[list[int]]:
    """For each class, the positions of its tokens in `prompt`'s encoding (the last occurrence,
    which is the appended one when the class word also appears earlier in the prompt)."""
    ids = tokenizer(prompt, truncation=False).input_ids
    positions = []
    for name in classes:
        word = tokenizer(name, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(word) + 1) if ids[i : i + len(word)] == word]
        if not word or not starts:
            raise GenfusionError(f"{key}: the class name {name!r} is not found in the tokens of {prompt!r}")
        span = list(range(starts[-1], starts[-1] + len(word)))
        if span[-1] >= tokenizer.model_max_length:
            raise GenfusionError(
                f"{key}: with the class names appended the prompt is {len(ids)} tokens, but the text"
                f" encoder reads {tokenizer.model_max_length}; shorten the prompt so that {name!r} fits"
            )
        positions.append(span)
    return positions


def settings_key(params: PrelabelParams) -> str:
    """What the maps depend on, for the generate manifest (a change remakes images and maps)."""
    first, last = params.steps
    return f"blocks={','.join(params.blocks)};map_size={params.map_size};steps={first:g}-{last:g}"


class _Recorder:
    """Sums of the maps of one pipeline call (one batch of `n` images), by map side."""

    def __init__(self, params: PrelabelParams, positions: list[list[list[int]]], total_steps: int) -> None:
        self.size = params.map_size
        self.n = len(positions)
        self.positions = positions
        first, last = params.steps
        # Steps counted from the first (noisiest); [0, 1] is all of them.
        self.wanted = range(int(round(first * total_steps)), max(int(round(last * total_steps)), 1))
        self.step = -1
        self.cross: dict[int, list] = {}  # side -> [sum (n, C, side, side), count]
        self.self: dict[int, list] = {}  # side -> [sum (n, side^2, side^2), count]
        self.sides: set[int] = set()

    @property
    def active(self) -> bool:
        return self.step in self.wanted

    def wants_self(self, side: int) -> bool:
        return side == self.size if self.size != "auto" else side <= AUTO_MAX_SIDE

    @staticmethod
    def _add(sums: dict[int, list], side: int, value: torch.Tensor) -> None:
        if side in sums:
            sums[side][0] += value
            sums[side][1] += 1
        else:
            sums[side] = [value, 1]

    def add_cross(self, probs: torch.Tensor) -> None:
        """probs: (n, H*W, tokens), mean over heads -> per class, mean over its tokens."""
        import torch

        side = _side(probs.shape[1])
        per_class = torch.stack(
            [torch.stack([probs[i, :, pos].mean(-1) for pos in self.positions[i]]) for i in range(self.n)]
        )  # (n, C, H*W)
        self._add(self.cross, side, per_class.reshape(self.n, -1, side, side).float())

    def add_self(self, probs: torch.Tensor) -> None:
        """probs: (n, H*W, H*W), mean over heads."""
        self._add(self.self, _side(probs.shape[1]), probs.float())

    def maps(self) -> list[dict[str, np.ndarray]]:
        """Per image: `cross` averaged over every layer, resized to the side of the self-attention
        kept (map_size, or with `auto` the largest side up to AUTO_MAX_SIDE), and that `self`."""
        import torch.nn.functional as F

        if not self.cross or not self.self:
            raise GenfusionError(
                f"prelabel.map_size: {self.size}, but the selected blocks' attention maps are"
                f" {sorted(self.sides)} on a side (cross-attention found: {bool(self.cross)},"
                f" self-attention of that size found: {bool(self.self)}); set prelabel.map_size"
                " to one of those sizes (or auto) or prelabel.blocks to include such a layer"
            )
        size = max(self.self)
        self_sum, self_count = self.self[size]
        cross = sum(
            F.interpolate(total / count, size=(size, size), mode="bilinear", align_corners=False)
            if side != size
            else total / count
            for side, (total, count) in self.cross.items()
        ) / len(self.cross)
        cross = cross.cpu().numpy()
        self_attention = (self_sum / self_count).cpu().numpy()
        return [
            {"cross": cross[i].astype(np.float16), "self": self_attention[i].astype(np.float16)}
            for i in range(self.n)
        ]


def _side(tokens: int) -> int:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise GenfusionError(
            f"prelabel: attention over {tokens} positions is not a square map; use square images"
        )
    return side


class CaptureProcessor:
    """Runs the module's own processor and records its attention probabilities beside it."""

    def __init__(self, inner, recorder: _Recorder, cross: bool) -> None:
        self.inner = inner
        self.recorder = recorder
        self.cross = cross

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        recorder = self.recorder
        side = _side(hidden_states.shape[1])
        recorder.sides.add(side)
        if recorder.active and (self.cross or recorder.wants_self(side)):
            import torch

            n = recorder.n  # the conditional half is last (diffusers concatenates [uncond, cond])
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            with torch.no_grad():
                query = attn.head_to_batch_dim(attn.to_q(hidden_states[-n:]))
                key = attn.head_to_batch_dim(attn.to_k(context[-n:]))
                probs = attn.get_attention_scores(query, key)
                probs = probs.reshape(n, attn.heads, *probs.shape[1:]).mean(1)
            (recorder.add_cross if self.cross else recorder.add_self)(probs)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _selected(name: str, blocks: Sequence[str]) -> bool:
    part = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(name.split(".")[0])
    return part in blocks


@contextmanager
def capture_attention(
    pipe: StableDiffusionPipeline, params: PrelabelParams, positions: list[list[list[int]]], steps: int
) -> Iterator[_Recorder]:
    """Install capturing processors for one pipeline call over len(positions) images; restore after."""
    unet = pipe.unet
    original = unet.attn_processors
    recorder = _Recorder(params, positions, steps)
    wrapped = {
        name: CaptureProcessor(proc, recorder, cross=name.endswith("attn2.processor"))
        if _selected(name, params.blocks)
        else proc
        for name, proc in original.items()
    }

    def count_step(module, args) -> None:
        recorder.step += 1

    hook = unet.register_forward_pre_hook(count_step)
    unet.set_attn_processor(wrapped)
    try:
        yield recorder
    finally:
        hook.remove()
        unet.set_attn_processor(original)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (np.load reads it) with fixed timestamps: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(
                zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), member.getvalue(), zipfile.ZIP_DEFLATED
            )
    return buffer.getvalue()
