"""The embedded demo dataset: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

Each original pixel (0..16) counts the set pixels of one 4x4 block of a 32x32 bitmap. Upsampling is nearest
(block replication): it spreads each count evenly over its block, adds no detail that the data does not hold, and
area-downsampling an upsampled image gives back the original exactly, which is what the digits classifier in
``dtx.evaluation`` relies on. Pixels map linearly to [-1, 1] (v / 8 - 1). No flips: they change a digit's identity.

``style: thick`` (the LoRA demo's new style) thickens the strokes: every pixel gets at least 40% of the largest
count in its 3x3 neighbourhood (computed on the 8x8 counts, before upsampling). The mean ink (x + 1) / 2 rises from
0.31 to 0.42 on the test split while the shipped classifier still recognises 97.5% of them.

Fixed split: within each class, in scikit-learn's order, every fifth image (occurrence 4, 9, 14, ...) is ``test``
(355 images, 34-36 per class) and the rest ``train`` (1442); ``all`` is all 1797 in the original order.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError
from .info import DataInfo

SIZES = (8, 16, 32)
SPLITS = ("train", "test", "all")
STYLES = ("none", "thick")
TEST_EVERY = 5
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's digits arrays for ``split`` ("train", "test" or "all"), in original order."""
    if split not in SPLITS:
        raise ConfigError(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
    _, target = _raw()
    if split == "all":
        return np.arange(len(target))
    occurrence = np.zeros(len(target), dtype=np.int64)
    seen = np.zeros(NUM_CLASSES, dtype=np.int64)
    for i, c in enumerate(target):
        occurrence[i] = seen[c]
        seen[c] += 1
    is_test = occurrence % TEST_EVERY == TEST_EVERY - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def thicken(counts: torch.Tensor) -> torch.Tensor:
    """Strokes thickened: each 8x8 count raised to at least 0.4 x the largest count in its 3x3 neighbourhood."""
    return torch.maximum(counts, 0.4 * F.max_pool2d(counts, 3, stride=1, padding=1))


def digits_arrays(split: str = "all", image_size: int = 8, style: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, S, S]`` in [-1, 1] (nearest-upsampled to ``image_size``, in ``style``) and int64 labels."""
    if image_size not in SIZES:
        raise ConfigError(f"digits image_size must be one of {', '.join(map(str, SIZES))}, got {image_size!r}")
    if style not in STYLES:
        raise ConfigError(f"digits style must be one of {', '.join(STYLES)}, got {style!r}")
    images, target = _raw()
    idx = split_indices(split)
    counts = torch.from_numpy(images[idx]).unsqueeze(1)
    x = (thicken(counts) if style == "thick" else counts) / 8.0 - 1.0
    if image_size != 8:
        x = F.interpolate(x, scale_factor=image_size // 8, mode="nearest")
    return x.contiguous(), torch.from_numpy(target[idx])


class DigitsDataset(Dataset):
    """scikit-learn digits as ``{"x": [1, S, S] in [-1, 1], "y": class}``; all images are held in memory (7 MB)."""

    num_classes = NUM_CLASSES
    channels = 1
    is_latent = False

    def __init__(self, image_size: int = 16, split: Literal["train", "test", "all"] = "train",
                 style: Literal["none", "thick"] = "none") -> None:
        self.image_size = image_size
        self.split = split
        self.images, self.labels = digits_arrays(split, image_size, style)

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=1, height=self.image_size, width=self.image_size, num_classes=NUM_CLASSES,
                        fields=("y",))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[i], "y": self.labels[i]}
