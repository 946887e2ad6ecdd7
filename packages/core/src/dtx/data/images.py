"""Image folders in the ImageFolder layout (one subfolder per class, sorted names give class ids), preprocessed as ADM
and DiT do: ``center_crop_arr``, a random horizontal flip, and a linear map of [0, 255] to [-1, 1].

Unreadable images are found when the folder is scanned (``verify``) or when an item is decoded; they are skipped with
a warning, and the dataset raises ``DataError`` once their share exceeds ``max_corrupt_fraction``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..io import check_image_size
from .info import DataInfo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop: halve with BOX filtering while the short side is at least ``2 * size``, resize with BICUBIC so the
    short side equals ``size``, then cut the centred ``size x size`` square (offsets rounded down)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
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


def _readable(path: Path, verify: str) -> bool:
    try:
        with Image.open(path) as im:
            check_image_size(im, path)
            if verify == "full":
                im.load()
            else:
                im.verify()
        return True
    except Exception:
        return False


class ImageFolderDataset(Dataset):
    """``{"x": [C, S, S] in [-1, 1], "y": class}`` from an image folder, cropped and flipped as in ADM/DiT.

    The flip draws from torch's default generator, which DataLoader workers seed per worker; ``verify`` is
    "header" (open and check every file when scanning), "full" (decode every file) or "none" (only at load time).
    """

    is_latent = False

    def __init__(self, root: str | Path, image_size: int = 256, flip: bool = True, channels: int = 3,
                 unconditional: bool = False, max_corrupt_fraction: float = 0.1,
                 verify: Literal["header", "full", "none"] = "header") -> None:
        if channels not in MODES:
            raise ConfigError(f"image-folder channels must be 1 or 3, got {channels!r}")
        if verify not in ("header", "full", "none"):
            raise ConfigError(f"image-folder verify must be 'header', 'full' or 'none', got {verify!r}")
        if not 0 <= max_corrupt_fraction <= 1:
            raise ConfigError(f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction!r}")
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
            keep = [_readable(p, verify) for p in files]
            self.corrupt = [p for p, ok in zip(files, keep) if not ok]
            files = [p for p, ok in zip(files, keep) if ok]
            labels = [y for y, ok in zip(labels, keep) if ok]
            if self.corrupt:
                self._check_corrupt()
                warnings.warn(f"skipped {len(self.corrupt)} of {self.total_files} unreadable images in {self.root} "
                              f"(first: {self.corrupt[0]})", stacklevel=2)
        self.files, self.labels = files, labels

    def _check_corrupt(self) -> None:
        fraction = len(self.corrupt) / self.total_files
        if fraction > self.max_corrupt_fraction:
            raise DataError(f"{len(self.corrupt)} of {self.total_files} images in {self.root} are unreadable "
                            f"({fraction:.0%} > max_corrupt_fraction {self.max_corrupt_fraction:.0%}); "
                            f"first: {self.corrupt[0]}")

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=self.channels, height=self.image_size, width=self.image_size,
                        num_classes=self.num_classes, fields=("y",) if self.num_classes else ())

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> torch.Tensor:
        """Decode, crop and normalise one image to ``[C, S, S]`` in [-1, 1] (no flip)."""
        with Image.open(path) as im:
            check_image_size(im, path)
            arr = center_crop_arr(im.convert(MODES[self.channels]), self.image_size)
        x = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(self.image_size, self.image_size, -1)
        return x.permute(2, 0, 1) / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        for _ in range(len(self.files)):
            path = self.files[i]
            try:
                x = self.load(path)
                break
            except Exception as exc:
                if path not in self.corrupt:
                    self.corrupt.append(path)
                    warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=2)
                    self._check_corrupt()
                i = (i + 1) % len(self.files)
        else:
            raise DataError(f"no readable image left in {self.root}")
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        item = {"x": x}
        if self.num_classes:
            item["y"] = torch.tensor(self.labels[i], dtype=torch.int64)
        return item
