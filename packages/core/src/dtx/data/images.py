"""Image folders in the ImageFolder layout (one subfolder per class, sorted names give class ids), preprocessed as ADM
and DiT do: ``center_crop_arr``, a random horizontal flip, and a linear map of [0, 255] to [-1, 1].

Unreadable images (corrupt, or beyond the size limits of ``dtx.file_headers.check_frame_size``) are found when the folder is
scanned (``verify``) or when an item is decoded; they are skipped with a short warning, and the dataset raises
``DataError`` once their share exceeds ``max_corrupt_fraction`` or none is left (``SkipsUnreadable``, which the video
folder shares).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..file_headers import MAX_IMAGE_PIXELS, check_image_size
from .buckets import assign, cover_crop, parse_buckets
from .info import DataInfo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}
VERIFY = ("header", "full", "none")
T = TypeVar("T")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop: halve with BOX filtering while the short side is at least ``2 * size``, resize with BICUBIC so the
    short side equals ``size``, then cut the centred ``size x size`` square (offsets rounded down). An image whose
    resized copy would exceed ``MAX_IMAGE_PIXELS`` (a far too flat one) is a ``DataError``, raised before resizing."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    if round(image.width * scale) * round(image.height * scale) > MAX_IMAGE_PIXELS:
        raise DataError(f"a {image.width}x{image.height} image cropped to {size}x{size} needs an intermediate over "
                        f"the {MAX_IMAGE_PIXELS} pixel limit")
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def scan_image_folder(root: Path, unconditional: bool = False) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root`` with their class ids and the sorted class names (none when unconditional)."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    if unconditional:
        files = images_in(root)
        return files, [-1] * len(files), []
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = images_in(root / name)
        files += found
        labels += [label] * len(found)
    if not classes and images_in(root):
        raise DataError(f"{root} holds images but no class subfolders; put them in <class>/ folders or set "
                        f"unconditional=True")
    return files, labels, classes


def check_verify(dataset: str, verify: str, max_corrupt_fraction: float) -> None:
    """The options of ``SkipsUnreadable`` datasets, checked with the dataset's name in the message."""
    if verify not in VERIFY:
        raise ConfigError(f"{dataset} verify must be 'header', 'full' or 'none', got {verify!r}")
    if not 0 <= max_corrupt_fraction <= 1:
        raise ConfigError(f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction!r}")


def reason(exc: BaseException) -> str:
    """A short reason for a warning: the exception type and the first line of its message (a decoder's whole
    banner would bury the file name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def read_caption(path: Path) -> str:
    """The caption of an image or clip: the text file beside it with the same name and suffix ``.txt``."""
    text_file = path.with_suffix(".txt") if path.is_file() else path.parent / f"{path.name}.txt"
    try:
        return text_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"captions: no readable caption {text_file} for {path} ({exc})") from None


def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header."""
    with Image.open(path) as im:
        return im.height, im.width


def check_image_file(path: Path, verify: str) -> None:
    """Raise if the image at ``path`` is unreadable: its header (size limits included) and, with ``verify="full"``,
    its pixels."""
    with Image.open(path) as im:
        check_image_size(im, path)
        if verify == "full":
            im.load()
        else:
            im.verify()


class SkipsUnreadable:
    """Unreadable files of a file dataset are skipped with a short warning and counted, whether found when the
    folder is scanned (``keep_readable``) or when an item is decoded (``load_readable``); a ``DataError`` naming the
    folder stops the run once their share exceeds ``max_corrupt_fraction`` or none is left. Errors of the types in
    ``fatal`` are settings to change, not files to skip: they are raised as they are."""

    noun = "files"
    fatal: tuple[type[Exception], ...] = ()
    first_reason = ""  # why the first unreadable file failed, for the error that names it
    root: Path
    max_corrupt_fraction: float
    total_files: int
    corrupt: list[Path]

    def keep_readable(self, files: list[Path], labels: list[int], check: Callable[[Path], object]
                      ) -> tuple[list[Path], list[int]]:
        """The files (and labels) for which ``check`` raises nothing."""
        keep = []
        for path in files:
            try:
                check(path)
                keep.append(True)
            except self.fatal:
                raise
            except Exception as exc:
                keep.append(False)
                self.first_reason = self.first_reason or reason(exc)
        self.corrupt = [p for p, ok in zip(files, keep) if not ok]
        if self.corrupt:
            self.check_corrupt()
            warnings.warn(f"skipped {len(self.corrupt)} of {self.total_files} unreadable {self.noun} in {self.root} "
                          f"(first: {self.corrupt[0]})", stacklevel=3)
        return [p for p, ok in zip(files, keep) if ok], [y for y, ok in zip(labels, keep) if ok]

    def check_corrupt(self) -> None:
        n = len(self.corrupt)
        fraction = n / self.total_files
        if n >= self.total_files or fraction > self.max_corrupt_fraction:
            why = "none is readable" if n >= self.total_files else \
                f"{fraction:.0%} > max_corrupt_fraction {self.max_corrupt_fraction:.0%}"
            raise DataError(f"{n} of {self.total_files} {self.noun} in {self.root} are unreadable ({why}); "
                            f"first: {self.corrupt[0]}" + (f" ({self.first_reason})" if self.first_reason else ""))

    def load_readable(self, files: list[Path], i: int, load: Callable[[Path], T]) -> tuple[int, T]:
        """``(j, load(files[j]))`` for the first readable file from ``i`` on (wrapping around)."""
        for _ in range(len(files)):
            path = files[i]
            try:
                return i, load(path)
            except self.fatal:
                raise
            except Exception as exc:
                if path not in self.corrupt:
                    self.corrupt.append(path)
                    self.first_reason = self.first_reason or reason(exc)
                    warnings.warn(f"skipping unreadable {self.noun[:-1]} {path}: {reason(exc)}", stacklevel=3)
                    self.check_corrupt()
                i = (i + 1) % len(files)
        raise DataError(f"no readable {self.noun[:-1]} left in {self.root}")


class ImageFolderDataset(SkipsUnreadable, Dataset):
    """``{"x": [C, S, S] in [-1, 1], "y": class}`` from an image folder, cropped and flipped as in ADM/DiT.

    The flip draws from torch's default generator, which DataLoader workers seed per worker; ``verify`` is
    "header" (open and check every file when scanning), "full" (decode every file) or "none" (only at load time).
    """

    is_latent = False
    noun = "images"

    def __init__(self, root: str | Path, image_size: int = 256, flip: bool = True, channels: int = 3,
                 unconditional: bool = False, max_corrupt_fraction: float = 0.1,
                 verify: Literal["header", "full", "none"] = "header",
                 buckets: list[list[int]] | None = None, captions: bool = False) -> None:
        """``buckets`` ([H, W] shapes): keep each image's own aspect, resized and cropped to its nearest bucket
        (``dtx.data.buckets``) instead of the ``image_size`` square. ``captions``: each image's caption from the
        text file beside it (``NAME.txt``), as the item's ``text`` (for text-to-image models)."""
        if channels not in MODES:
            raise ConfigError(f"image-folder channels must be 1 or 3, got {channels!r}")
        check_verify("image-folder", verify, max_corrupt_fraction)
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.flip = flip
        self.channels = channels
        self.max_corrupt_fraction = max_corrupt_fraction
        files, labels, self.classes = scan_image_folder(self.root, unconditional)
        self.num_classes = len(self.classes)
        self.total_files = len(files)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        self.corrupt: list[Path] = []
        if verify != "none":
            files, labels = self.keep_readable(files, labels, lambda p: check_image_file(p, verify))
        self.files, self.labels = files, labels
        self.captions = [read_caption(p) for p in files] if captions else None
        self.buckets = parse_buckets(buckets, 2, "buckets") if buckets is not None else None
        self.bucket_of = [assign(image_size_of(p), self.buckets) for p in files] if self.buckets else None

    @property
    def info(self) -> DataInfo:
        """The first bucket's size with buckets (the model is built for it), else the square ``image_size``."""
        h, w = self.buckets[0] if self.buckets else (self.image_size, self.image_size)
        fields = ("y",) * bool(self.num_classes) + ("text",) * (self.captions is not None)
        return DataInfo(channels=self.channels, height=h, width=w, num_classes=self.num_classes, fields=fields)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Decode, crop and normalise one image to ``[C, S, S]`` in [-1, 1], or to ``[C, H, W]`` of a bucket
        ``shape`` (no flip)."""
        with Image.open(path) as im:
            check_image_size(im, path)
            rgb = im.convert(MODES[self.channels])
            arr = center_crop_arr(rgb, self.image_size) if shape is None else cover_crop(rgb, *shape)
        h, w = arr.shape[:2]
        x = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(h, w, -1)
        return x.permute(2, 0, 1) / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shape = self.buckets[self.bucket_of[i]] if self.buckets else None  # a stand-in for an unreadable file too
        i, x = self.load_readable(self.files, i, lambda path: self.load(path, shape))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        item: dict[str, Any] = {"x": x}
        if self.num_classes:
            item["y"] = torch.tensor(self.labels[i], dtype=torch.int64)
        if self.captions is not None:
            item["text"] = self.captions[i]
        return item
