"""``moving-digits``: the Latte demo dataset, one scikit-learn digit bouncing around a black 32x32 canvas.

Each clip shows one digit of ``dtx.data.digits`` (same fixed train/test split, one clip per image, so the split sizes
are those of the image dataset: 1442 / 355 / 1797), nearest-upscaled 2x to a 16x16 sprite. The sprite starts at a
random top-left corner in ``[0, 16]^2`` and moves at a constant velocity ``(vx, vy)`` with each component in
``-3..3`` px/frame and never both zero. When a step would take the sprite out of the canvas, the position is mirrored
at the border and that velocity component reversed (a bounce), so every frame shows the whole digit. Start and
velocity are drawn from a generator seeded by ``(seed, index)``: item ``i`` is the same clip every time, in every
worker, whatever the order of access.

Values are in [-1, 1] (background -1), as in the image digits. ``x`` is ``[F, 1, 32, 32]`` and ``y`` the digit.

Image-video joint training (Latte's ``use_image_num``, Latte paper (Ma et al.) and Vchitect/Latte's latte_img.py):
with ``use_image_num = k > 0`` each item also carries k still frames, each a random frame of another random clip of
the same split (seeded per item), appended to ``x`` along the frame axis (``[F + k, 1, 32, 32]``), and their labels
as ``y_image`` (int64 ``[k]``). ``info`` describes the clip (``frames = F``, without the images).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import Dataset

from dtx.data.digits import NUM_CLASSES, digits_arrays
from dtx.data.info import DataInfo
from dtx.errors import ConfigError

CANVAS = 32  # side of the black canvas
SPRITE = 16  # side of the 2x upscaled digit
MAX_POS = CANVAS - SPRITE  # largest top-left coordinate that keeps the sprite inside the canvas
MAX_SPEED = 3  # px/frame per axis
FRAMES_RANGE = (4, 16)
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the generator's seed space


def _item_seed(seed: int, index: int, stream: int) -> int:
    return (int(seed) * _MIX + int(index) * 0x2545F4914F6CDD1D + stream) % (2 ** 63)


def _bounce(pos: int, vel: int) -> tuple[int, int]:
    """One step of ``pos`` (in ``[0, MAX_POS]``) at ``vel``: mirrored at the border with ``vel`` reversed."""
    nxt = pos + vel
    if nxt < 0:
        return -nxt, -vel
    if nxt > MAX_POS:
        return 2 * MAX_POS - nxt, -vel
    return nxt, vel


class MovingDigits(Dataset):
    """Bouncing scikit-learn digits: ``{"x": [F(+k), 1, 32, 32] in [-1, 1], "y": digit[, "y_image": [k]]}``.

    ``split``: "train", "test" or "all" (the fixed split of ``dtx.data.digits``); ``frames``: clip length (4..16);
    ``seed``: the seed of every item's motion (and of its joint-training images); ``use_image_num``: still frames
    of other clips appended for image-video joint training (0 = none).
    """

    num_classes = NUM_CLASSES
    channels = 1
    is_latent = False

    def __init__(self, split: Literal["train", "test", "all"] = "train", frames: int = 8, seed: int = 0,
                 use_image_num: int = 0) -> None:
        lo, hi = FRAMES_RANGE
        if isinstance(frames, bool) or not isinstance(frames, int) or not lo <= frames <= hi:
            raise ConfigError(f"moving-digits frames must be an integer in {lo}..{hi}, got {frames!r}")
        if isinstance(use_image_num, bool) or not isinstance(use_image_num, int) or use_image_num < 0:
            raise ConfigError(f"moving-digits use_image_num must be an integer >= 0, got {use_image_num!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"moving-digits seed must be an integer, got {seed!r}")
        self.split = split
        self.frames = frames
        self.seed = seed
        self.use_image_num = use_image_num
        self.sprites, self.labels = digits_arrays(split, SPRITE)  # [N, 1, 16, 16], [N]; ConfigError on a bad split
        if use_image_num and len(self.labels) < 2:
            raise ConfigError("moving-digits use_image_num needs at least two clips in the split")

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=1, height=CANVAS, width=CANVAS, frames=self.frames, num_classes=NUM_CLASSES,
                        fields=("y", "y_image") if self.use_image_num else ("y",))

    def __len__(self) -> int:
        return len(self.labels)

    # -- motion ------------------------------------------------------------------------------------------------------

    def motion(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The start corner ``(row, col)`` and velocity ``(v_row, v_col)`` of clip ``index`` (px, px/frame)."""
        gen = torch.Generator().manual_seed(_item_seed(self.seed, self._check(index), 0))
        row, col = (int(v) for v in torch.randint(0, MAX_POS + 1, (2,), generator=gen))
        # 48 of the 49 velocity pairs in -3..3: every pair except (0, 0), equally likely
        pairs = [(a, b) for a in range(-MAX_SPEED, MAX_SPEED + 1) for b in range(-MAX_SPEED, MAX_SPEED + 1)
                 if (a, b) != (0, 0)]
        v_row, v_col = pairs[int(torch.randint(0, len(pairs), (1,), generator=gen))]
        return (row, col), (v_row, v_col)

    def positions(self, index: int, frames: int | None = None) -> list[tuple[int, int]]:
        """Top-left corner ``(row, col)`` of the sprite in each of the first ``frames`` frames of clip ``index``."""
        (row, col), (v_row, v_col) = self.motion(index)
        out = [(row, col)]
        for _ in range((frames or self.frames) - 1):
            row, v_row = _bounce(row, v_row)
            col, v_col = _bounce(col, v_col)
            out.append((row, col))
        return out

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index`` as ``[F, 1, 32, 32]`` in [-1, 1]."""
        sprite = self.sprites[self._check(index)]
        video = torch.full((self.frames, 1, CANVAS, CANVAS), -1.0)
        for f, (row, col) in enumerate(self.positions(index)):
            video[f, :, row:row + SPRITE, col:col + SPRITE] = sprite
        return video

    # -- joint training -------------------------------------------------------------------------------------------

    def image_sources(self, index: int) -> list[tuple[int, int]]:
        """``(clip, frame)`` of each of the ``use_image_num`` still frames of item ``index`` (other clips only)."""
        k = self.use_image_num
        if not k:
            return []
        gen = torch.Generator().manual_seed(_item_seed(self.seed, self._check(index), 1))
        others = torch.randint(0, len(self) - 1, (k,), generator=gen)
        others = others + (others >= index).long()  # skip the item's own clip
        frames = torch.randint(0, self.frames, (k,), generator=gen)
        return [(int(c), int(f)) for c, f in zip(others, frames)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check(index)
        item = {"x": self.clip(index), "y": self.labels[index]}
        sources = self.image_sources(index)
        if sources:
            stills = torch.stack([self._frame(c, f) for c, f in sources])
            item["x"] = torch.cat([item["x"], stills])
            item["y_image"] = self.labels[torch.tensor([c for c, _ in sources])]
        return item

    def _frame(self, index: int, frame: int) -> torch.Tensor:
        row, col = self.positions(index, frame + 1)[frame]
        image = torch.full((1, CANVAS, CANVAS), -1.0)
        image[:, row:row + SPRITE, col:col + SPRITE] = self.sprites[index]
        return image

    def _check(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"moving-digits index {index} out of range for {n} clips")
        return i
