"""Compositional scores of samples of GenTron's demo data, in the spirit of T2I-CompBench: does each generated image
show the digit, colour and position its prompt asks for (``captioned-digits``), and each video the digit in every
frame, its colour and its direction (``captioned-moving-digits``)?

Images ``[N, 3, 32, 32]`` in [-1, 1], per half (columns 0..15 / 16..31):

- *position*: the half holds ink (at least ``INK_PIXELS`` pixels whose brightest channel is above mid grey) exactly
  when the prompt puts a digit there; right when both halves agree;
- *digit*: a 16x16 window spanning the half, placed vertically by ``locate_digits`` on a black 32x32 canvas holding
  only the half as grey (max over channels), is area-downsampled to 8x8 and classified by the shipped digits
  classifier (``dtx.evaluation.digits``);
- *colour*: the mean of the half's ink pixels, each divided by its brightest channel, is nearest the prompt's colour;
- *all*: position right and digit and colour right in every half the prompt fills.

Digit and colour accuracies average over the halves the prompts fill; ``all_held_out`` / ``all_seen`` split *all*
by whether the prompt uses a held-out (colour, digit, side) triple (``dtx_gentron.data.held_out``).

Videos ``[N, F, 3, 32, 32]``: *frame_consistency* (frames whose located digit is the prompt's), *colour* (over the ink
of all frames), *direction* (the displacement of the digit's ink centroid from the first frame to the last, along its
dominant axis, must be at least ``MOVING_PX`` in the prompt's direction; still prompts are skipped), *still* (still
prompts whose digit stays within ``MOVING_PX`` of its first position), *all*, and *all* split by whether the prompt
moves a digit in a held-out (colour, digit, direction) triple (``dtx_gentron.data.held_out_motion``).

``dtx compbench-digits SAMPLES`` scores a sample archive of ``dtx sample`` (``arr_0`` uint8 NHWC / NFHWC and
``prompts``).
"""

from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dtx.errors import ConfigError, ShapeError
from dtx.evaluation.digits import BRIGHT, MOVING_PX, digit_crops, digits_logits, locate_digits

from .data import CANVAS, COLOURS, HALF, Scene, caption_of, parse_caption

INK_PIXELS = 8  # bright pixels that make a half "hold a digit" (two 2x2 blocks of the upscaled 8x8 digits)
_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [6, 3]


def _mean(values: torch.Tensor) -> float | None:
    return values.float().mean().item() if values.numel() else None


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` -> ``[..., H, W]``: the brightest channel (a coloured digit's own grey)."""
    return x.amax(dim=-3)


def _colour_of(rgb: torch.Tensor, grey: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index into ``COLOURS`` of the mean hue of the masked pixels (``rgb [M, 3, P]``, ``grey``/``mask [M, P]``);
    -1 where no pixel is masked."""
    hue = ((rgb + 1) / (grey + 1).clamp_min(1e-6).unsqueeze(1)).clamp(0, 1)  # each pixel / its brightest channel
    weight = mask.float().unsqueeze(1)
    mean = (hue * weight).sum(-1) / weight.sum(-1).clamp_min(1)
    pred = torch.cdist(mean, _RGB).argmin(1)
    return torch.where(mask.any(-1), pred, torch.full_like(pred, -1))


def _classify(grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit classes ``[M]`` and ink centroids ``[M, 2]`` of grey canvases ``[M, 32, 32]``."""
    crops, centroid = digit_crops(grey)
    return digits_logits(crops).argmax(1), centroid


def _classify_half(grey: torch.Tensor, side: int) -> torch.Tensor:
    """Digit classes ``[N]`` of one half ``[N, 32, 16]``: a 16x16 window, across the whole half and placed
    vertically by ``locate_digits`` on a canvas holding only that half, area-downsampled to 8x8."""
    n = len(grey)
    canvas = torch.full((n, CANVAS, CANVAS), -1.0)
    canvas[:, :, side * HALF:(side + 1) * HALF] = grey
    top = locate_digits(canvas)[1][:, 0]
    rows = (top[:, None] + torch.arange(HALF))[:, :, None]
    window = grey[torch.arange(n)[:, None, None], rows, torch.arange(HALF)[None, None, :]]
    return digits_logits(F.avg_pool2d(window.unsqueeze(1), 2)).argmax(1)


def _check(x: torch.Tensor, scenes: Sequence[Scene], layout: str, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().float()
    rank = 4 if what == "images" else 5
    if x.dim() != rank or tuple(x.shape[-3:]) != (3, CANVAS, CANVAS) or x.shape[0] == 0:
        raise ShapeError(f"{what} must be non-empty {layout} in [-1, 1], got {tuple(x.shape)}")
    if len(scenes) != len(x):
        raise ShapeError(f"{len(x)} {what} but {len(scenes)} scenes")
    for scene in scenes:
        if (scene.free is None) != (what == "images"):
            kind = "two-half image" if what == "images" else "single-digit video"
            raise ConfigError(f"prompt {caption_of(scene)!r} does not describe a {kind}")
    return x


@dataclass(frozen=True)
class CompScores:
    """Per-image results of :func:`score_images`; ``[N, 2]`` tensors are per half (left, right)."""

    filled: torch.Tensor  # [N, 2] bool: the prompt puts a digit in the half
    ink: torch.Tensor  # [N, 2] bool: the half holds ink
    digit_pred: torch.Tensor  # [N, 2] int64
    colour_pred: torch.Tensor  # [N, 2] int64 index into COLOURS, -1 without ink
    digit_ok: torch.Tensor  # [N, 2] bool, False where not filled
    colour_ok: torch.Tensor  # [N, 2] bool, False where not filled
    position_ok: torch.Tensor  # [N] bool
    all_ok: torch.Tensor  # [N] bool
    held_out: torch.Tensor  # [N] bool: the prompt uses a held-out triple

    def summary(self) -> dict[str, float | None]:
        """Accuracies by name (None where no prompt counts), for printing."""
        return {"digit": _mean(self.digit_ok[self.filled]), "colour": _mean(self.colour_ok[self.filled]),
                "position": _mean(self.position_ok), "all": _mean(self.all_ok),
                "all_held_out": _mean(self.all_ok[self.held_out]), "all_seen": _mean(self.all_ok[~self.held_out])}


@torch.no_grad()
def score_images(images: torch.Tensor, scenes: Sequence[Scene]) -> CompScores:
    """Digit, colour and position of each half of ``images`` ``[N, 3, 32, 32]`` against their prompts' scenes."""
    x = _check(images, scenes, "[N, 3, 32, 32]", "images")
    n = len(x)
    halves = x.unflatten(-1, (2, HALF)).movedim(-2, 1)  # [N, 2, 3, 32, 16]
    grey = _grey(halves)  # [N, 2, 32, 16]
    bright = grey > BRIGHT
    ink = bright.flatten(2).sum(-1) >= INK_PIXELS
    digit_pred = torch.stack([_classify_half(grey[:, s], s) for s in (0, 1)], 1)
    colour_pred = _colour_of(halves.flatten(-2).flatten(0, 1), grey.flatten(-2).flatten(0, 1),
                             bright.flatten(-2).flatten(0, 1)).view(n, 2)
    filled = torch.tensor([[h is not None for h in s.halves] for s in scenes]).view(n, 2)
    want_digit = torch.tensor([[h.digit if h else -1 for h in s.halves] for s in scenes]).view(n, 2)
    names = list(COLOURS)
    want_colour = torch.tensor([[names.index(h.colour) if h else -2 for h in s.halves] for s in scenes]).view(n, 2)
    digit_ok = filled & (digit_pred == want_digit)
    colour_ok = filled & (colour_pred == want_colour)
    position_ok = (ink == filled).all(1)
    all_ok = position_ok & ((digit_ok & colour_ok) | ~filled).all(1)
    held = torch.tensor([s.is_held_out for s in scenes], dtype=torch.bool)
    return CompScores(filled, ink, digit_pred, colour_pred, digit_ok, colour_ok, position_ok, all_ok, held)


@dataclass(frozen=True)
class VideoScores:
    """Per-clip results of :func:`score_videos`."""

    digit_pred: torch.Tensor  # [N, F] int64
    frame_ok: torch.Tensor  # [N, F] bool
    colour_pred: torch.Tensor  # [N] int64 index into COLOURS, -1 without ink
    colour_ok: torch.Tensor  # [N] bool
    moving: torch.Tensor  # [N] bool: the prompt asks for motion
    direction_pred: tuple[str | None, ...]  # measured direction (None: moves less than MOVING_PX)
    direction_ok: torch.Tensor  # [N] bool, False for still prompts
    still_ok: torch.Tensor  # [N] bool, False for moving prompts
    all_ok: torch.Tensor  # [N] bool
    held_out: torch.Tensor  # [N] bool: the prompt moves a digit in a held-out triple

    def summary(self) -> dict[str, float | None]:
        """Accuracies by name (None where no prompt counts), for printing."""
        return {"frame_consistency": _mean(self.frame_ok), "colour": _mean(self.colour_ok),
                "direction": _mean(self.direction_ok[self.moving]), "still": _mean(self.still_ok[~self.moving]),
                "all": _mean(self.all_ok), "all_held_out": _mean(self.all_ok[self.held_out]),
                "all_seen": _mean(self.all_ok[~self.held_out])}


def _direction(centroids: torch.Tensor) -> list[str | None]:
    """Direction of the displacement of centroids ``[N, F, 2]`` (row, col) from the first frame to the last, along
    its dominant axis (None: less than ``MOVING_PX``)."""
    out: list[str | None] = []
    for vr, vc in (centroids[:, -1] - centroids[:, 0]).tolist():
        axis_row = abs(vr) > abs(vc)
        v = vr if axis_row else vc
        if abs(v) < MOVING_PX:
            out.append(None)
        else:
            out.append(("down" if v > 0 else "up") if axis_row else ("right" if v > 0 else "left"))
    return out


@torch.no_grad()
def score_videos(videos: torch.Tensor, scenes: Sequence[Scene]) -> VideoScores:
    """Per-frame digit, colour and direction of ``videos`` ``[N, F, 3, 32, 32]`` against their prompts' scenes."""
    x = _check(videos, scenes, "[N, F, 3, 32, 32]", "videos")
    n, f = x.shape[:2]
    grey = _grey(x)  # [N, F, 32, 32]
    pred, centroid = _classify(grey.flatten(0, 1))
    pred, centroid = pred.view(n, f), centroid.view(n, f, 2)
    frees = [s.free for s in scenes]
    want_digit = torch.tensor([h.digit for h in frees if h is not None])
    want_colour = torch.tensor([list(COLOURS).index(h.colour) for h in frees if h is not None])
    rgb = x.movedim(2, 1).flatten(2)  # [N, 3, F*H*W]
    colour_pred = _colour_of(rgb, grey.flatten(1), grey.flatten(1) > BRIGHT)
    moving = torch.tensor([s.direction is not None for s in scenes], dtype=torch.bool)
    measured = _direction(centroid)
    direction_ok = torch.tensor([s.direction is not None and s.direction == d for s, d in zip(scenes, measured)])
    spread = (centroid - centroid[:, :1]).norm(dim=-1).amax(1)
    still_ok = ~moving & (spread < MOVING_PX)
    frame_ok = pred == want_digit[:, None]
    colour_ok = colour_pred == want_colour
    all_ok = frame_ok.all(1) & colour_ok & (direction_ok | still_ok)
    held = torch.tensor([s.is_held_out for s in scenes], dtype=torch.bool)
    return VideoScores(pred, frame_ok, colour_pred, colour_ok, moving, tuple(measured), direction_ok, still_ok,
                       all_ok, held)


# -- dtx compbench-digits ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    """A sample archive read for scoring: samples in [-1, 1] (``[N, 3, H, W]`` or ``[N, F, 3, H, W]``) and scenes."""

    path: Path
    x: torch.Tensor
    scenes: tuple[Scene, ...]

    @property
    def is_video(self) -> bool:
        return self.x.dim() == 5


def find_archive(path: str | Path) -> Path:
    """``path`` if it is an ``.npz`` file, else the one ``.npz`` directly inside the folder ``path``."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".npz":
            raise ConfigError(f"{p} is not a .npz sample archive")
        return p
    if not p.is_dir():
        raise ConfigError(f"no such sample archive or folder: {p}")
    found = sorted(p.glob("*.npz"))
    if len(found) != 1:
        names = ", ".join(q.name for q in found) or "none"
        raise ConfigError(f"{p} must hold exactly one .npz sample archive, found {len(found)}: {names}")
    return found[0]


def load_archive(path: str | Path) -> Samples:
    """Read ``arr_0`` (uint8 NHWC / NFHWC, 32x32 RGB) and ``prompts`` and parse every prompt."""
    p = find_archive(path)
    try:
        with np.load(p, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files if k in ("arr_0", "prompts")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"cannot read sample archive {p}: {exc}") from exc
    arr, prompts = arrays.get("arr_0"), arrays.get("prompts")
    if arr is None or prompts is None:
        missing = " and ".join(k for k in ("arr_0", "prompts") if k not in arrays)
        raise ConfigError(f"{p} has no {missing} array (sample with text prompts: `dtx sample --prompt ...`)")
    if arr.dtype != np.uint8 or arr.ndim not in (4, 5) or arr.shape[-3:] != (CANVAS, CANVAS, 3) or not len(arr):
        raise ConfigError(f"{p}: arr_0 must be non-empty uint8 [N, 32, 32, 3] images or [N, F, 32, 32, 3] videos, "
                          f"got {arr.dtype} {arr.shape}")
    if prompts.dtype.kind not in "US" or prompts.shape != (len(arr),):
        raise ConfigError(f"{p}: prompts must be {len(arr)} strings, got {prompts.dtype} {prompts.shape}")
    scenes = []
    for text in prompts.tolist():
        text = text.decode() if isinstance(text, bytes) else text
        try:
            scene = parse_caption(text)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        if (scene.free is not None) != (arr.ndim == 5):
            kind = "videos" if arr.ndim == 5 else "images"
            raise ConfigError(f"{p}: prompt {text!r} does not describe the archive's {kind}")
        scenes.append(scene)
    x = torch.from_numpy(arr).movedim(-1, -3).float() / 127.5 - 1.0
    return Samples(p, x, tuple(scenes))


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples .npz written by `dtx sample` (with prompts), or a folder holding one")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one line per metric")


def run(args: argparse.Namespace) -> int:
    samples = load_archive(args.samples)
    scores = (score_videos if samples.is_video else score_images)(samples.x, samples.scenes)
    result: dict[str, object] = {"path": str(samples.path), "kind": "videos" if samples.is_video else "images",
                                 "num_samples": len(samples.x), **scores.summary()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"samples            {result['path']} ({result['num_samples']} {result['kind']})")
    for name, value in scores.summary().items():
        print(f"{name:<18} {'n/a' if value is None else f'{value:.3f}'}")
    return 0

