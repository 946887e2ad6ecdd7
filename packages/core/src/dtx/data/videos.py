"""Video folders: clips ``[F, C, S, S]`` in [-1, 1] read from video files or from folders of frame images.

A clip is either a video file (``.mp4``, ``.gif``, ``.webm``, ``.avi``, ``.mov``, ``.mkv``; decoded with imageio,
through imageio-ffmpeg for all but GIF) or a folder of frame images (``.png``, ``.jpg`` ...; GIF is a video here)
taken in order of their file names. Clips sit in one subfolder per class (sorted names give class ids) or directly
under the root (no classes). Each clip yields its first ``frames`` frames taken every ``frame_interval`` frames
(deterministic: frames 0, K, 2K, ...); every frame gets image-folder's ADM ``center_crop_arr`` and the linear map of
[0, 255] to [-1, 1]. A clip shorter than ``(frames - 1) * frame_interval + 1`` frames is an error (``ClipLengthError``):
frame folders are counted when the folder is scanned, video files when they are decoded.

Unreadable clips (a corrupt file or frame, or frames beyond the size limits of ``dtx.file_headers.check_frame_size``, read from
the headers: GIF block headers, the ffmpeg stream header) are skipped with a short warning and counted as image
folders do (``verify``, ``max_corrupt_fraction``; see ``dtx.data.images.SkipsUnreadable``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..file_headers import check_frame_size, check_image_size, gif_size
from .images import (IMAGE_EXTENSIONS, MODES, SkipsUnreadable, center_crop_arr, check_image_file, check_verify,
                     read_caption, reason)
from .buckets import assign, cover_crop, parse_buckets
from .info import DataInfo

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
#: frame images of a frame folder (GIF files count as videos)
FRAME_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e not in VIDEO_EXTENSIONS)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def frame_files(folder: Path) -> list[Path]:
    """The frame images directly inside ``folder``, sorted by file name."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()
                   and _visible(p)), key=lambda p: p.name)


def is_frame_folder(path: Path) -> bool:
    return path.is_dir() and bool(frame_files(path))


def clips_in(folder: Path) -> list[Path]:
    """Video files and frame folders directly inside ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if _visible(p) and (
        (p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS) or is_frame_folder(p))), key=lambda p: p.name)


def scan_video_folder(root: Path, unconditional: bool = False) -> tuple[list[Path], list[int], list[str]]:
    """Clips (video files and frame folders) under ``root``, their class ids and the sorted class names.

    Subfolders of ``root`` that hold frame images are clips; the other subfolders are classes. A root holding
    clips directly has no classes; one holding both clips and class folders is an error unless ``unconditional``.
    """
    if not root.is_dir():
        raise DataError(f"video folder not found: {root}")
    top = clips_in(root)
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and _visible(d) and not is_frame_folder(d)),
                        key=lambda d: d.name)
    per_class = [clips_in(d) for d in class_dirs]
    if unconditional:
        clips = top + [c for found in per_class for c in found]
        return clips, [-1] * len(clips), []
    if top and any(per_class):
        raise DataError(f"{root} holds clips at the top level ({top[0].name}) and in class subfolders "
                        f"({class_dirs[[bool(f) for f in per_class].index(True)].name}); use one layout or set "
                        f"unconditional=True")
    if top:
        return top, [-1] * len(top), []
    clips, labels = [], []
    for label, found in enumerate(per_class):
        clips += found
        labels += [label] * len(found)
    return clips, labels, [d.name for d in class_dirs]


class ClipLengthError(DataError):
    """A clip has fewer frames than ``frames`` and ``frame_interval`` need: a setting to change, not a file to skip."""


def _imageio() -> Any:
    try:
        import imageio.v3 as iio
    except ImportError as exc:  # frame folders work without it
        raise ConfigError("reading video files needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); "
                          "frame folders do not") from exc
    return iio


def video_frame_size(path: Path) -> tuple[int, int]:
    """Width and height of the frames a video file decodes to, from its headers, before any frame reaches this
    process: a GIF's block headers, else the stream header ffmpeg reports (its process is stopped right after)."""
    if path.suffix.lower() == ".gif":
        return gif_size(path)
    _imageio()
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise ConfigError(f"reading {path.suffix} videos needs imageio-ffmpeg (pip install imageio-ffmpeg)") from exc
    frames = imageio_ffmpeg.read_frames(str(path))
    try:
        width, height = next(frames)["size"]
    finally:
        frames.close()
    return int(width), int(height)


def video_frame_count(path: Path) -> int:
    """Frames of a video file: a GIF's frame count from PIL, else ffmpeg's count (it reads the stream through)."""
    if path.suffix.lower() == ".gif":
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise ConfigError(f"reading {path.suffix} videos needs imageio-ffmpeg (pip install imageio-ffmpeg)") from exc
    try:
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except Exception as exc:
        raise DataError(f"cannot count the frames of {path}: {exc}") from exc


class VideoFolderDataset(SkipsUnreadable, Dataset):
    """``{"x": [F, C, S, S] in [-1, 1], "y": class}`` from a folder of videos or frame folders (see the module).

    Options: ``image_size`` (S, ADM centre crop of every frame), ``frames`` (F, the clip length), ``frame_interval``
    (take every K-th frame), ``channels`` (1 or 3), ``unconditional`` (ignore class subfolders) and ``flip`` (mirror
    a whole clip at random, off by default); ``verify`` and ``max_corrupt_fraction`` as for image folders
    ("header": check every clip's frame size, or every used frame image, when scanning; "full": decode every clip).
    """

    is_latent = False
    noun = "clips"
    fatal = (ClipLengthError, ConfigError)  # a missing video reader is no corrupt file

    def __init__(self, root: str | Path, image_size: int = 256, frames: int = 16, frame_interval: int = 1,
                 channels: int = 3, unconditional: bool = False, flip: bool = False, max_corrupt_fraction: float = 0.1,
                 verify: Literal["header", "full", "none"] = "header",
                 buckets: list[list[int]] | None = None, captions: bool = False) -> None:
        """``buckets`` ([F, H, W] shapes): each clip goes to its nearest bucket it is long enough for (its aspect,
        then the most frames; ``dtx.data.buckets``) and is read at that length and size. ``captions``: each clip's
        caption from the text file beside it (``NAME.txt`` for a video file ``NAME.mp4`` or a frame folder ``NAME``)
        as the item's ``text``."""
        if channels not in MODES:
            raise ConfigError(f"video-folder channels must be 1 or 3, got {channels!r}")
        check_verify("video-folder", verify, max_corrupt_fraction)
        for name, value in (("image_size", image_size), ("frames", frames), ("frame_interval", frame_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"video-folder {name} must be a positive integer, got {value!r}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.frames = frames
        self.frame_interval = frame_interval
        self.channels = channels
        self.flip = flip
        self.max_corrupt_fraction = max_corrupt_fraction
        clips, labels, self.classes = scan_video_folder(self.root, unconditional)
        self.num_classes = len(self.classes)
        self.total_files = len(clips)
        if not clips:
            raise DataError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders found in {self.root}")
        for clip in clips if buckets is None else ():  # bucketed clips are checked by their bucket
            if clip.is_dir():
                self._check_length(clip, len(frame_files(clip)))
        self.corrupt: list[Path] = []
        self.headers_checked = False
        if verify != "none":
            clips, labels = self.keep_readable(clips, labels, self.load if verify == "full" else self._check_header)
            self.headers_checked = True
        self.clips, self.labels = clips, labels
        self.captions = [read_caption(c) for c in clips] if captions else None
        self.buckets = parse_buckets(buckets, 3, "buckets") if buckets is not None else None
        self.bucket_of = None
        if self.buckets:
            self.bucket_of = [assign(self._native(clip), self.buckets) for clip in clips]
            short = [c for c, b in zip(clips, self.bucket_of) if b is None]
            if short:
                raise ClipLengthError(f"clip {short[0]} is shorter than every bucket ({len(short)} such clip(s)); "
                                      f"add a shorter bucket or remove them")

    def _native(self, clip: Path) -> tuple[int, int, int]:
        """(clip frames at ``frame_interval``, height, width) from headers."""
        n = len(frame_files(clip)) if clip.is_dir() else video_frame_count(clip)
        width, height = (Image.open(frame_files(clip)[0]).size if clip.is_dir() else video_frame_size(clip))
        return (n - 1) // self.frame_interval + 1, height, width

    def span_of(self, frames: int) -> int:
        """Source frames a clip of ``frames`` frames covers: ``(frames - 1) * frame_interval + 1``."""
        return (frames - 1) * self.frame_interval + 1

    @property
    def span(self) -> int:
        return self.span_of(self.frames)

    @property
    def info(self) -> DataInfo:
        """The first bucket's shape with buckets (the model is built for it), else ``frames`` x ``image_size``^2."""
        f, h, w = self.buckets[0] if self.buckets else (self.frames, self.image_size, self.image_size)
        fields = ("y",) * bool(self.num_classes) + ("text",) * (self.captions is not None)
        return DataInfo(channels=self.channels, height=h, width=w, frames=f, num_classes=self.num_classes,
                        fields=fields)

    def _check_length(self, clip: Path, n: int, frames: int | None = None) -> None:
        frames = self.frames if frames is None else frames
        if n < self.span_of(frames):
            raise ClipLengthError(f"clip {clip} has {n} frame(s); frames={frames} with frame_interval="
                                  f"{self.frame_interval} needs {self.span_of(frames)}")

    def _used_frames(self, folder: Path, frames: int | None = None) -> list[Path]:
        return frame_files(folder)[:self.span_of(self.frames if frames is None else frames):self.frame_interval]

    def _check_header(self, clip: Path) -> None:
        """Raise if a clip's headers show it unreadable: the frame size of a video file, every used frame image."""
        if clip.is_dir():
            for path in self._used_frames(clip):
                check_image_file(path, "header")
        else:
            check_frame_size(*video_frame_size(clip), clip)

    def _video_frames(self, path: Path) -> Iterator[np.ndarray]:
        """The decoded frames of a video file; its frame size is checked from the header first, unless the folder
        scan already did."""
        iio = _imageio()
        try:
            if not self.headers_checked:
                check_frame_size(*video_frame_size(path), path)
            yield from iio.imiter(path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read video {path}: {reason(exc)}") from exc

    def read_frames(self, clip: Path, frames: int | None = None) -> list[Image.Image]:
        """The clip's ``frames`` (default the option) source frames (0, K, 2K, ...) as PIL images, before cropping."""
        frames = self.frames if frames is None else frames
        if clip.is_dir():
            self._check_length(clip, len(frame_files(clip)), frames)
            out = []
            for path in self._used_frames(clip, frames):
                with Image.open(path) as im:
                    check_image_size(im, path)
                    im.load()
                    out.append(im)
            return out
        out, n = [], 0
        decoded = self._video_frames(clip)
        try:
            for arr in decoded:
                if n % self.frame_interval == 0:
                    arr = np.asarray(arr)
                    out.append(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr))
                n += 1
                if n == self.span_of(frames):
                    break
        finally:
            decoded.close()  # stops the decoder early
        self._check_length(clip, n, frames)
        return out

    def load(self, clip: Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Decode, crop and normalise one clip to ``[F, C, S, S]`` in [-1, 1], or to a bucket ``shape`` (F, H, W)
        (no flip)."""
        mode = MODES[self.channels]
        if shape is None:
            s = self.image_size
            arrs = [np.asarray(center_crop_arr(im.convert(mode), s), dtype=np.float32).reshape(s, s, -1)
                    for im in self.read_frames(clip)]
        else:
            f, h, w = shape
            arrs = [np.asarray(cover_crop(im.convert(mode), h, w), dtype=np.float32).reshape(h, w, -1)
                    for im in self.read_frames(clip, f)]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shape = self.buckets[self.bucket_of[i]] if self.buckets else None  # a stand-in for an unreadable clip too
        i, x = self.load_readable(self.clips, i, lambda clip: self.load(clip, shape))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        item: dict[str, Any] = {"x": x}
        if self.num_classes:
            item["y"] = torch.tensor(self.labels[i], dtype=torch.int64)
        if self.captions is not None:
            item["text"] = self.captions[i]
        return item
