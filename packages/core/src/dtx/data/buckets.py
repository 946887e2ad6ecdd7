"""Size buckets: items of different sizes trained in batches of one shape (PixArt's aspect-ratio buckets for images,
resolution x length buckets for clips), each bucket's batch size set by a token budget.

A dataset that takes ``buckets`` (``image-folder``, ``video-folder``) assigns every item to one bucket from its own
size (``assign``) and loads it resized and centre-cropped to that bucket's shape; ``BucketBatches`` groups one
epoch's seeded permutation by bucket into global batches, of which each data rank takes its slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..file_headers import MAX_IMAGE_PIXELS

Shape = tuple[int, ...]  # (H, W) of an image bucket, (F, H, W) of a clip bucket


def parse_buckets(shapes: Sequence[Sequence[int]], rank: int, key: str = "data.buckets.shapes") -> list[Shape]:
    """Bucket shapes as tuples of ``rank`` positive integers ((H, W) for images, (F, H, W) for clips), distinct."""
    out: list[Shape] = []
    for shape in shapes:
        if len(shape) != rank or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
            what = "[height, width]" if rank == 2 else "[frames, height, width]"
            raise ConfigError(f"bad value for config key {key!r}: every bucket must be {what} of positive integers, "
                              f"got {list(shape)}")
        out.append(tuple(int(v) for v in shape))
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"bad value for config key {key!r}: give one or more distinct shapes, got {shapes}")
    return out


def assign(native: Shape, buckets: Sequence[Shape]) -> int | None:
    """The bucket for an item of ``native`` size (H, W), or (frames available, H, W) for a clip: among the buckets
    the item can fill (clips: no longer than it), the nearest in aspect ratio (on a log scale), then the longest
    clip, then the largest area; None when no bucket fits."""
    fits = [i for i, b in enumerate(buckets) if len(b) == 2 or b[0] <= native[0]]
    if not fits:
        return None
    aspect = math.log(native[-1] / native[-2])

    def rank(i: int) -> tuple[float, int, int]:
        b = buckets[i]
        return abs(math.log(b[-1] / b[-2]) - aspect), -(b[0] if len(b) == 3 else 0), -b[-1] * b[-2]

    return min(fits, key=rank)


def cover_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize (BICUBIC) so the image covers ``height x width``, then cut the centred window (DiT's centre crop for
    any aspect ratio)."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"a {image.width}x{image.height} image cropped to {height}x{width} needs an intermediate over "
                        f"the {MAX_IMAGE_PIXELS} pixel limit")
    arr = np.asarray(image.resize(size, resample=Image.BICUBIC))
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top:top + height, left:left + width]


def batch_sizes(buckets: Sequence[Shape], max_tokens: int, patch: int, fallback: int) -> list[int]:
    """Samples per micro-batch of each bucket: ``max_tokens`` // the tokens of one sample (frames x (H / patch) x
    (W / patch)), at least 1; ``max_tokens`` 0: ``fallback`` for every bucket."""
    if max_tokens <= 0:
        return [fallback] * len(buckets)
    return [max(1, max_tokens // (math.prod(b[:-2]) * (b[-2] // patch) * (b[-1] // patch))) for b in buckets]


class BucketBatches:
    """Batch sampler for one epoch: a seeded permutation walked in order, each item queued in its bucket; a queue that
    holds a global batch (its micro-batch x ``world``) emits it, this rank taking its slice; from batch ``start`` on
    (the resume position). Items left in a part-filled queue at the end of the epoch are not used in it (each epoch's
    permutation differs)."""

    def __init__(self, bucket_of: Sequence[int], micro: Sequence[int], rank: int, world: int, perm: torch.Tensor,
                 start: int = 0) -> None:
        self.rank, self.world, self.micro, self.start = rank, world, list(micro), start
        self.batches = self._plan([int(i) for i in perm], bucket_of)

    def _plan(self, order: list[int], bucket_of: Sequence[int]) -> list[list[int]]:
        queues: dict[int, list[int]] = {}
        batches = []
        for i in order:
            b = bucket_of[i]
            queue = queues.setdefault(b, [])
            queue.append(i)
            if len(queue) == self.micro[b] * self.world:
                batches.append(queue[self.rank * self.micro[b]:(self.rank + 1) * self.micro[b]])
                queues[b] = []
        return batches

    @property
    def count(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return max(0, self.count - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches[self.start:]
