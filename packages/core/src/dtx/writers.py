"""The one place dtx turns samples in [-1, 1] into files a person or an evaluator reads: PNG grids, ADM ``.npz``
archives, GIF and MP4 videos, and frame grids.

Quantisation follows ADM/DiT exactly: ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8, so -1 -> 0, 0 -> 128 and
1 -> 255; NaN counts as 0 (mid grey) and +-inf as +-1, so a diverged sample is still written rather than refused.
Small images are enlarged with nearest-neighbour by an integer factor (no smoothing): grid tiles to at least 64 px
unless a scale is given, so 8x8 digits are visible at a glance. Every file is written
atomically (:func:`dtx.io.atomic_write`): it appears whole under its name or not at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import ConfigError, ShapeError
from .io import atomic_write

__all__ = [
    "GRID_TILE_MIN", "VIDEO_SIDE_MIN", "MACRO_BLOCK", "quantize", "to_uint8", "grid_scale", "save_grid", "save_npz",
    "save_gif", "save_gif_grid", "save_mp4", "save_frame_grid", "save_videos",
]

GRID_TILE_MIN = 64  # PNG grid tiles are enlarged (nearest, integer factor) to at least this many px on their long side
VIDEO_SIDE_MIN = 64  # GIF frames (long side) and MP4 frames (both sides) are enlarged to at least this
MACRO_BLOCK = 16  # H.264 codes 16x16 macro blocks: MP4 frame sides are rounded up to a multiple of this
VIDEO_FORMATS = ("gif", "mp4")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] to uint8 in the same layout, as ADM/DiT archives store samples: ``clamp(127.5 x + 128, 0, 255)``."""
    x = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(x: torch.Tensor, channel_dim: int = 1) -> np.ndarray:
    """Batch-first samples in [-1, 1] to uint8 with channels last ([N, C, H, W] -> NHWC, [N, F, C, H, W] with
    ``channel_dim=2`` -> NFHWC), the layout image files and ADM archives use."""
    x = _as_tensor(x, "samples")
    if x.ndim < 2 or not -x.ndim <= channel_dim < x.ndim:
        raise ShapeError(f"samples must be batch-first with channels at dim {channel_dim}, got shape "
                         f"{tuple(x.shape)}")
    return quantize(x).movedim(channel_dim, -1).cpu().numpy()


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """``x`` as a tensor (numpy arrays are accepted too), so every writer checks one kind of input."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _checked(x: Any, what: str, names: Sequence[str], channel_dim: int) -> torch.Tensor:
    """``x`` if it has one axis per name plus a channel axis at ``channel_dim`` holding 1 or 3 channels, else a
    one-line ShapeError that names the expected layout and what was found."""
    x = _as_tensor(x, what)
    rank = len(names) + 1
    layout = list(names)
    layout.insert(channel_dim % rank if -rank <= channel_dim < rank else rank - 1, "C")
    expected = "[" + ", ".join(layout) + "]"
    if x.ndim != rank or not -rank <= channel_dim < rank:
        raise ShapeError(f"{what} must be {expected} (rank {rank}, channels at dim {channel_dim}), got shape "
                         f"{tuple(x.shape)}")
    c = x.shape[channel_dim]
    if c not in (1, 3):
        raise ShapeError(f"{what} must have 1 (grayscale) or 3 (RGB) channels, got {c} channels in shape "
                         f"{tuple(x.shape)} (layout {expected})")
    if x.numel() == 0:
        raise ShapeError(f"{what} is empty: shape {tuple(x.shape)} (layout {expected})")
    return x


def _resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """``arr`` ([..., h, w, c]) resized to ``height`` x ``width`` by nearest neighbour; an integer factor k copies
    each pixel into a k x k block exactly."""
    h, w = arr.shape[-3:-1]
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return arr[..., rows[:, None], cols[None, :], :]


def _zoom_long_side(arr: np.ndarray, minimum: int) -> np.ndarray:
    """``arr`` ([..., h, w, c]) enlarged by the smallest integer factor that makes its long side >= ``minimum``."""
    h, w = arr.shape[-3:-1]
    k = max(1, math.ceil(minimum / max(h, w)))
    return _resize_nearest(arr, h * k, w * k)


def _tile(tiles: np.ndarray, per_row: int, fill: int = 0) -> np.ndarray:
    """Tiles [N, h, w, c] laid out ``per_row`` to a row, with a 1-pixel gap of value ``fill`` (black) between and
    around them."""
    n, h, w, c = tiles.shape
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    grid = np.full((rows * (h + 1) + 1, per_row * (w + 1) + 1, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, per_row)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = tiles[i]
    return grid


def _pil_image(arr: np.ndarray) -> Any:
    """An [h, w, 1] or [h, w, 3] uint8 array as a PIL image: grayscale ("L") or RGB."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))


def grid_scale(scale: int | None, height: int, width: int) -> int:
    """The integer factor a grid tile of ``height`` x ``width`` is enlarged by: ``scale`` when given (1 keeps the
    samples' own size), else the smallest that makes the long side at least GRID_TILE_MIN."""
    if scale is None:
        return max(1, math.ceil(GRID_TILE_MIN / max(height, width)))
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 64:
        raise ConfigError(f"grid scale must be an integer in 1..64, got {scale!r}")
    return scale


def _write_png_grid(tiles: np.ndarray, path: str | Path, per_row: int, scale: int | None) -> Path:
    """Enlarge uint8 tiles [N, h, w, c] by ``grid_scale``, tile them and write the grid atomically."""
    h, w = tiles.shape[-3:-1]
    k = grid_scale(scale, h, w)
    image = _pil_image(_tile(_resize_nearest(tiles, h * k, w * k), per_row))
    fmt = "PNG" if Path(path).suffix.lower() in ("", ".png") else None  # another suffix (.jpg) picks its format
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, channel_dim: int = 1,
              scale: int | None = None) -> Path:
    """PNG grid of ``images`` ([N, C, H, W] in [-1, 1], C = 1 or 3), ``nrow`` to a row, for a person to look at;
    each image enlarged by ``scale`` (default: to at least GRID_TILE_MIN px, see ``grid_scale``)."""
    images = _checked(images, "images", ("N", "H", "W"), channel_dim)
    return _write_png_grid(to_uint8(images, channel_dim), path, nrow, scale)


def save_frame_grid(videos: torch.Tensor, path: str | Path, channel_dim: int = 2, scale: int | None = None) -> Path:
    """PNG with one row per video ([N, F, C, H, W] in [-1, 1]) and one column per frame, to see motion at a glance;
    frames enlarged as in ``save_grid``."""
    videos = _checked(videos, "videos", ("N", "F", "H", "W"), channel_dim)
    arr = to_uint8(videos, channel_dim)
    n, f = arr.shape[:2]
    return _write_png_grid(arr.reshape(n * f, *arr.shape[2:]), path, f, scale)


def _labels_array(labels: Any, n: int) -> np.ndarray:
    """Class labels as int64 [N] for the archive, or a ShapeError if they are not N integers."""
    t = torch.as_tensor(labels)
    if t.ndim != 1 or len(t) != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ShapeError(f"labels must be integers [N={n}], got {t.dtype} {tuple(t.shape)}")
    return t.cpu().to(torch.int64).numpy()


def _extra_arrays(extra: dict[str, Any]) -> dict[str, np.ndarray]:
    """Extra archive entries as numpy arrays; refuses names the archive uses and object arrays (need pickle)."""
    out = {}
    for name, value in extra.items():
        if name in ("arr_0", "labels"):
            raise ConfigError(f"extra array name {name!r} is reserved for the images/labels of the archive")
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype == object:
            raise ConfigError(f"extra array {name!r} has dtype object, which needs pickle to load; pass numbers or "
                              f"strings (a numpy unicode array)")
        out[name] = arr
    return out


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None, channel_dim: int = 1,
             extra: dict[str, np.ndarray] | None = None) -> Path:
    """ADM/DiT sample archive for evaluators: ``arr_0`` uint8 NHWC ([N, C, H, W] images) or NFHWC ([N, F, C, H, W]
    videos, ``channel_dim=2``), ``labels`` int64 [N] when given, and ``extra`` arrays stored as they are."""
    x = _as_tensor(images, "images")
    if x.ndim not in (4, 5):
        raise ShapeError(f"images must be [N, C, H, W] images or [N, F, C, H, W] videos, got shape "
                         f"{tuple(x.shape)}")
    x = _checked(x, "images" if x.ndim == 4 else "videos", ("N", "H", "W") if x.ndim == 4 else ("N", "F", "H", "W"),
                 channel_dim)
    arrays = {"arr_0": to_uint8(x, channel_dim)}
    if labels is not None:
        arrays["labels"] = _labels_array(labels, len(x))
    arrays.update(_extra_arrays(extra or {}))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name without it
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _video_frames(video: torch.Tensor) -> np.ndarray:
    """One video [F, C, H, W] in [-1, 1] (C = 1 or 3) as uint8 frames [F, H, W, C]."""
    return to_uint8(_checked(video, "video", ("F", "H", "W"), 1), 1)


def _check_fps(fps: float) -> float:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def save_gif(video: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """Looping GIF of one video [F, C, H, W] in [-1, 1], frames enlarged (nearest) to >= VIDEO_SIDE_MIN px.

    Grayscale frames keep their exact values; RGB frames go through a 256-colour palette (exact for few colours).
    Pillow merges consecutive identical frames into one longer frame, so playback is the same but such a GIF
    holds fewer than F frames."""
    return _write_gif(_zoom_long_side(_video_frames(video), VIDEO_SIDE_MIN), path, fps)


def _write_gif(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """uint8 frames [F, h, w, c] as a looping GIF at ``fps``, written atomically."""
    duration = 1000.0 / _check_fps(fps)
    images = [_pil_image(a) for a in frames]
    return atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                        append_images=images[1:], duration=duration, loop=0))


def save_gif_grid(videos: torch.Tensor, path: str | Path, per_row: int, fps: float = 8.0) -> Path:
    """One looping GIF of videos [N, F, C, H, W] in [-1, 1] played side by side, ``per_row`` to a row with grey
    1-pixel gaps, each enlarged as ``save_gif`` does (to compare videos drawn from the same seeds)."""
    arr = to_uint8(_checked(videos, "videos", ("N", "F", "H", "W"), 2), 2)  # [N, F, H, W, C]
    arr = _zoom_long_side(arr, VIDEO_SIDE_MIN)  # each video as large as save_gif draws it
    frames = np.stack([_tile(arr[:, f], per_row, fill=128) for f in range(arr.shape[1])])  # [F, H', W', C]
    return _write_gif(frames, path, fps)


def _mp4_frames(arr: np.ndarray) -> np.ndarray:
    """uint8 frames [F, h, w, c] as RGB frames whose sides are >= VIDEO_SIDE_MIN and multiples of MACRO_BLOCK: an
    integer nearest zoom for the short side, then a nearest resize up to the next multiple of MACRO_BLOCK."""
    h, w = arr.shape[1:3]
    k = max(1, math.ceil(VIDEO_SIDE_MIN / min(h, w)))
    height, width = (MACRO_BLOCK * math.ceil(s * k / MACRO_BLOCK) for s in (h, w))
    arr = _resize_nearest(arr, height, width)
    return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """H.264 (yuv420p) MP4 of one video [F, C, H, W] in [-1, 1], via imageio's ffmpeg backend (its own binary),
    frames enlarged (nearest) so both sides are >= VIDEO_SIDE_MIN and multiples of 16; grayscale becomes RGB."""
    import imageio.v2 as imageio

    fps = _check_fps(fps)
    frames = _mp4_frames(_video_frames(video))

    def write(tmp: Path) -> None:
        imageio.mimwrite(tmp, list(frames), format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                         quality=8, macro_block_size=MACRO_BLOCK, ffmpeg_log_level="error",
                         output_params=["-f", "mp4"])

    return atomic_write(path, write)


def save_videos(videos: torch.Tensor, folder: str | Path, stem: str = "sample", fps: float = 8.0,
                formats: Sequence[str] = VIDEO_FORMATS) -> list[Path]:
    """One file per video and format, ``{stem}_{i:03d}.gif`` / ``.mp4``, from videos [N, F, C, H, W] in [-1, 1]."""
    videos = _checked(videos, "videos", ("N", "F", "H", "W"), 2)
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in VIDEO_FORMATS]
    if unknown:
        raise ConfigError(f"unknown video format(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(VIDEO_FORMATS)}")
    _check_fps(fps)
    writers = {"gif": save_gif, "mp4": save_mp4}
    folder = Path(folder)
    return [writers[fmt](video, folder / f"{stem}_{i:03d}.{fmt}", fps)
            for i, video in enumerate(videos) for fmt in formats]
