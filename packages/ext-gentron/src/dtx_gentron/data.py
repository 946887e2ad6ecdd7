"""GenTron's embedded text-conditioned demo data: coloured scikit-learn digits with captions (no download).

``captioned-digits`` (text-to-image): a black 32x32 RGB canvas split into a left half (columns 0..15) and a right
half (columns 16..31). Each half holds one digit of ``dtx.data.digits``, nearest-upscaled 2x to 16x16 and pasted at
rows 8..23 so it fills its half, or is empty (probability ``empty_prob`` per half, conditioned on at least one digit:
the layouts both / left only / right only are drawn with weights (1-p)^2 : p(1-p) : p(1-p)). A digit of grey
intensity g = (v + 1) / 2 is drawn in one of six colours ``COLOURS`` (rgb in {0, 1}) as -1 + 2 g rgb per channel.

Compositional generalisation: the (colour, digit, side) triple is *held out* when
``colour_index == (digit + 3 * side) % 6`` (side 0 = left, 1 = right; colour order of ``COLOURS``): 20 of the 120
triples, each digit and side missing exactly one colour. ``split="train"`` takes digit images from the digits train
split and never uses a held-out triple (each half's colour is drawn from the five allowed ones); ``"test"`` takes
them from the digits test split and every item uses at least one held-out triple (one filled half, chosen at random,
gets its held-out colour; the other half's colour is free): the held-out evaluation set. ``"all"``: any image, any
colour. Default size: 4x the split's digit images for train/all (5768 / 7188), 1x for test (355).

``captioned-moving-digits`` (text-to-video): one coloured 16x16 digit on a black 32x32 canvas moving in one constant
direction (left / right / up / down) at 1 or 2 px/frame (2 only while the whole clip stays inside: ``frames <= 9``),
the start drawn so that the sprite is wholly inside the canvas in every frame (no bounce, so the direction can be
measured). Item i shows digit image ``i % N`` of the split (default size N: 1442 / 355 / 1797). With probability
``still_fraction`` an item is a GenTron motion-free pseudo-video (image-video joint training): the digit still at a
random position in every frame, a caption without motion and ``motion_free=True``. The (colour, digit, direction)
triple of a moving clip is *held out* when ``colour_index == (digit + 1 + direction_index) % 6`` (``held_out_motion``;
40 of the 240 triples, one colour per (digit, direction), at most one direction per (colour, digit)): ``"train"``
never moves a digit in a held-out triple, ``"test"`` always does (every pair of the three still occurs in training);
stills take any colour.

Captions use a few fixed phrasings per layout (``caption_of``), all read back by ``parse_caption``; a ``Scene`` is
either two halves (images) or one ``free`` digit with an optional direction (videos; ``None`` = still). Every item is
drawn from a generator seeded by ``(seed, index)``: the same item every time, in any order, in any worker.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dtx.data.digits import digits_arrays
from dtx.data.info import DataInfo
from dtx.errors import ConfigError

CANVAS = 32  # side of the black canvas
SPRITE = 16  # side of the 2x upscaled digit
MAX_POS = CANVAS - SPRITE  # largest top-left coordinate that keeps the sprite inside the canvas
FRAMES_RANGE = (4, 16)  # clip lengths, as Latte's moving-digits
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
    "yellow": (1, 1, 0), "cyan": (0, 1, 1), "magenta": (1, 0, 1),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = ("left", "right", "up", "down")
SIDES = ("left", "right")
TOP = (CANVAS - SPRITE) // 2  # first row of an image digit (rows 8..23)
HALF = CANVAS // 2  # width of one half
SPEEDS = (1, 2)  # px/frame of a moving digit
VELOCITY = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, col) per px of speed


def _generator(seed: int, index: int) -> torch.Generator:
    """The generator of item ``index``: NumPy's SeedSequence hashes (seed, index) into an independent stream."""
    state = np.random.SeedSequence([int(seed) % 2 ** 64, int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def held_out(colour: str, digit: int, side: int | str) -> bool:
    """Whether the (colour, digit, side) triple is kept out of ``captioned-digits``' train split."""
    s = SIDES.index(side) if isinstance(side, str) else int(side)
    return COLOUR_NAMES.index(colour) == (int(digit) + 3 * s) % len(COLOURS)


def held_out_motion(colour: str, digit: int, direction: str) -> bool:
    """Whether the (colour, digit, direction) triple of a moving clip is kept out of ``captioned-moving-digits``'
    train split."""
    return COLOUR_NAMES.index(colour) == (int(digit) + 1 + DIRECTIONS.index(direction)) % len(COLOURS)


@dataclass(frozen=True)
class Half:
    """One coloured digit: its class (0..9) and colour name."""

    digit: int
    colour: str

    def __post_init__(self) -> None:
        if isinstance(self.digit, bool) or not isinstance(self.digit, int) or not 0 <= self.digit <= 9:
            raise ConfigError(f"a scene digit must be an integer 0..9, got {self.digit!r}")
        if self.colour not in COLOURS:
            raise ConfigError(f"a scene colour must be one of {', '.join(COLOURS)}, got {self.colour!r}")

    @property
    def words(self) -> str:
        return f"{self.colour} {self.digit}"


@dataclass(frozen=True)
class Scene:
    """What a caption says: two halves of an image (``left``/``right``, at least one), or one ``free`` digit of a
    video with its ``direction`` (None: still)."""

    left: Half | None = None
    right: Half | None = None
    direction: str | None = None
    free: Half | None = None

    def __post_init__(self) -> None:
        if self.free is None and self.left is None and self.right is None:
            raise ConfigError("a scene needs a digit: a left or right half, or a free digit")
        if self.free is not None and (self.left is not None or self.right is not None):
            raise ConfigError("a scene has either halves (images) or one free digit (videos), not both")
        if self.direction is not None and (self.free is None or self.direction not in DIRECTIONS):
            raise ConfigError(f"a scene direction must be one of {', '.join(DIRECTIONS)} and needs a free digit, got "
                              f"{self.direction!r}")

    @property
    def halves(self) -> tuple[Half | None, Half | None]:
        return self.left, self.right

    @property
    def is_held_out(self) -> bool:
        """Whether a half uses a held-out (colour, digit, side) triple, or a moving digit a held-out (colour, digit,
        direction) triple."""
        if self.free is not None:
            return self.direction is not None and held_out_motion(self.free.colour, self.free.digit, self.direction)
        return any(h is not None and held_out(h.colour, h.digit, s) for s, h in enumerate(self.halves))


# -- captions ----------------------------------------------------------------------------------------------------
# Templates per layout; {l}, {r}, {d} are "<colour> <digit>", {dir} a direction. Parsing compiles the same templates.

TEMPLATES: dict[str, tuple[str, ...]] = {
    "both": ("a {l} on the left and a {r} on the right", "a {r} on the right and a {l} on the left",
             "on the left a {l} and on the right a {r}"),
    "left": ("a {l} on the left", "on the left, a {l}", "a {l} on the left and nothing on the right"),
    "right": ("a {r} on the right", "on the right, a {r}", "a {r} on the right and nothing on the left"),
    "moving": ("a {d} moving {dir}", "a {d} moving {dir}wards", "a {d} that moves {dir}"),
    "still": ("a {d}", "a {d} standing still", "a still {d}"),
}
NUM_PHRASINGS = 3
_DIGIT = "(?P<{0}_colour>" + "|".join(COLOURS) + r") (?P<{0}_digit>[0-9])"
_GROUPS = {"l": _DIGIT.format("l"), "r": _DIGIT.format("r"), "d": _DIGIT.format("d"),
           "dir": "(?P<dir>" + "|".join(DIRECTIONS) + ")"}


def _layout(scene: Scene) -> str:
    if scene.free is not None:
        return "still" if scene.direction is None else "moving"
    return "both" if scene.left and scene.right else "left" if scene.left else "right"


def caption_of(scene: Scene, phrasing: int = 0) -> str:
    """The caption of ``scene`` in phrasing ``0..NUM_PHRASINGS-1``."""
    if isinstance(phrasing, bool) or not isinstance(phrasing, int) or not 0 <= phrasing < NUM_PHRASINGS:
        raise ConfigError(f"caption phrasing must be an integer 0..{NUM_PHRASINGS - 1}, got {phrasing!r}")
    words = {k: h.words for k, h in (("l", scene.left), ("r", scene.right), ("d", scene.free)) if h is not None}
    return TEMPLATES[_layout(scene)][phrasing].format(**words, dir=scene.direction)


@lru_cache(maxsize=1)
def _patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    out = []
    for layout, templates in TEMPLATES.items():
        for template in templates:
            parts = [re.escape(text) + (_GROUPS[field] if field else "")
                     for text, field, _, _ in string.Formatter().parse(template)]
            out.append((layout, re.compile("".join(parts))))
    return tuple(out)


_EXAMPLE = Scene(left=Half(3, "red"), right=Half(7, "blue"))


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (case, extra spaces and a final full stop are ignored)."""
    norm = " ".join(str(text).lower().split()).rstrip(".").strip()
    for layout, pattern in _patterns():
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        g = m.groupdict()
        half = {k: Half(int(g[f"{k}_digit"]), g[f"{k}_colour"]) for k in ("l", "r", "d") if g.get(f"{k}_digit")}
        return Scene(left=half.get("l"), right=half.get("r"), free=half.get("d"), direction=g.get("dir"))
    raise ConfigError(f"cannot parse caption {text!r}: expected e.g. {caption_of(_EXAMPLE)!r} or "
                      f"{caption_of(Scene(free=Half(5, 'green'), direction='left'))!r}")


def paint(sprites: torch.Tensor, colour: str) -> torch.Tensor:
    """Grey digits ``[..., 1, H, W]`` in [-1, 1] as RGB ``[..., 3, H, W]`` in ``colour``: -1 + 2 g rgb."""
    rgb = torch.tensor(COLOURS[colour], dtype=sprites.dtype).view(3, 1, 1)
    return -1.0 + (sprites + 1.0) * rgb


def _check_int(name: str, value: object, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ConfigError(f"{name} must be an integer{bound}, got {value!r}")


def _check_prob(name: str, value: object, closed: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok or (not closed and value == 1):
        raise ConfigError(f"{name} must be a number in [0, {'1]' if closed else '1)'}, got {value!r}")
    return float(value)


def _index(index: int, n: int, what: str) -> int:
    i = int(index)
    i = i + n if i < 0 else i
    if not 0 <= i < n:
        raise IndexError(f"{what} index {index} out of range for {n} items")
    return i


# -- text-to-image -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Composition:
    """How item i of ``captioned-digits`` is drawn: its scene, the digit image of each half and the phrasing."""

    scene: Scene
    images: tuple[int | None, int | None]
    phrasing: int


class CaptionedDigits(Dataset):
    """Two-half coloured digits with captions: ``{"x": [3, 32, 32] in [-1, 1], "text": str}`` (see module doc)."""

    channels = 3
    is_latent = False

    def __init__(self, split: Literal["train", "test", "all"] = "train", seed: int = 0, size: int | None = None,
                 empty_prob: float = 0.25) -> None:
        _check_int("captioned-digits seed", seed)
        if size is not None:
            _check_int("captioned-digits size", size, 1)
        self.empty_prob = _check_prob("captioned-digits empty_prob", empty_prob, closed=False)
        self.sprites, self.labels = digits_arrays(split, SPRITE)  # ConfigError on a bad split
        self.split, self.seed = split, seed
        self.size = size if size is not None else len(self.labels) * (1 if split == "test" else 4)

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=3, height=CANVAS, width=CANVAS, fields=("text",))

    def __len__(self) -> int:
        return self.size

    def composition(self, index: int) -> Composition:
        """The seeded draw of item ``index``: layout, digit images, colours (by the split's rule) and phrasing."""
        gen = _generator(self.seed, _index(index, len(self), "captioned-digits"))
        p = self.empty_prob
        layout = int(torch.multinomial(torch.tensor([(1 - p) ** 2, p * (1 - p), p * (1 - p)]), 1, generator=gen))
        filled = [s for s in (0, 1) if layout == 0 or layout == s + 1]
        images = {s: int(torch.randint(len(self.labels), (1,), generator=gen)) for s in filled}
        forced = filled[int(torch.randint(len(filled), (1,), generator=gen))] if self.split == "test" else None
        halves: dict[int, Half] = {}
        for s in filled:
            digit = int(self.labels[images[s]])
            allowed = [c for c in COLOUR_NAMES if not (self.split == "train" and held_out(c, digit, s))]
            if s == forced:
                allowed = [c for c in COLOUR_NAMES if held_out(c, digit, s)]
            halves[s] = Half(digit, allowed[int(torch.randint(len(allowed), (1,), generator=gen))])
        phrasing = int(torch.randint(NUM_PHRASINGS, (1,), generator=gen))
        return Composition(Scene(left=halves.get(0), right=halves.get(1)), (images.get(0), images.get(1)), phrasing)

    def scene(self, index: int) -> Scene:
        return self.composition(index).scene

    def render(self, comp: Composition) -> torch.Tensor:
        """The ``[3, 32, 32]`` image of a composition."""
        image = torch.full((3, CANVAS, CANVAS), -1.0)
        for s, (half, i) in enumerate(zip(comp.scene.halves, comp.images)):
            if half is not None and i is not None:
                image[:, TOP:TOP + SPRITE, s * HALF:s * HALF + SPRITE] = paint(self.sprites[i], half.colour)
        return image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        comp = self.composition(index)
        return {"x": self.render(comp), "text": caption_of(comp.scene, comp.phrasing)}


# -- text-to-video -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """How item i of ``captioned-moving-digits`` is drawn: scene, digit image, start corner (row, col), velocity
    (px/frame; zero when still) and phrasing."""

    scene: Scene
    image: int
    start: tuple[int, int]
    velocity: tuple[int, int]
    phrasing: int

    @property
    def motion_free(self) -> bool:
        return self.scene.direction is None

    def positions(self, frames: int) -> list[tuple[int, int]]:
        """Top-left corner of the sprite in each frame."""
        (r, c), (vr, vc) = self.start, self.velocity
        return [(r + f * vr, c + f * vc) for f in range(frames)]


class CaptionedMovingDigits(Dataset):
    """One coloured digit moving in one direction, captioned: ``{"x": [F, 3, 32, 32], "text": str,
    "motion_free": bool tensor}`` (see module doc)."""

    channels = 3
    is_latent = False

    def __init__(self, split: Literal["train", "test", "all"] = "train", frames: int = 8, seed: int = 0,
                 size: int | None = None, still_fraction: float = 0.0) -> None:
        lo, hi = FRAMES_RANGE
        if isinstance(frames, bool) or not isinstance(frames, int) or not lo <= frames <= hi:
            raise ConfigError(f"captioned-moving-digits frames must be an integer in {lo}..{hi}, got {frames!r}")
        _check_int("captioned-moving-digits seed", seed)
        if size is not None:
            _check_int("captioned-moving-digits size", size, 1)
        self.still_fraction = _check_prob("captioned-moving-digits still_fraction", still_fraction, closed=True)
        self.sprites, self.labels = digits_arrays(split, SPRITE)
        self.split, self.frames, self.seed = split, frames, seed
        self.size = size if size is not None else len(self.labels)
        self.speeds = [v for v in SPEEDS if v * (frames - 1) <= MAX_POS]

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=3, height=CANVAS, width=CANVAS, frames=self.frames, fields=("text", "motion_free"))

    def __len__(self) -> int:
        return self.size

    def clip(self, index: int) -> Clip:
        """The seeded draw of item ``index``: still or not, direction, colour (by the split's rule), speed, start
        and phrasing."""
        i = _index(index, len(self), "captioned-moving-digits")
        gen = _generator(self.seed, i)

        def pick(n: int) -> int:
            return int(torch.randint(n, (1,), generator=gen))

        image = i % len(self.labels)
        digit = int(self.labels[image])
        still = bool(torch.rand((), generator=gen) < self.still_fraction)
        phrasing = pick(NUM_PHRASINGS)
        start = [pick(MAX_POS + 1), pick(MAX_POS + 1)]
        direction = DIRECTIONS[pick(len(DIRECTIONS))]
        colours = list(COLOUR_NAMES)
        if not still and self.split in ("train", "test"):
            keep = self.split == "test"
            colours = [c for c in COLOUR_NAMES if held_out_motion(c, digit, direction) == keep]
        half = Half(digit, colours[pick(len(colours))])
        if still:
            return Clip(Scene(free=half), image, (start[0], start[1]), (0, 0), phrasing)
        speed = self.speeds[pick(len(self.speeds))]
        axis = 0 if direction in ("up", "down") else 1
        step = VELOCITY[direction][axis] * speed
        travel = abs(step) * (self.frames - 1)
        along = pick(MAX_POS - travel + 1)  # start along the motion so that the last frame is still inside
        start[axis] = along if step > 0 else along + travel
        velocity = tuple(v * speed for v in VELOCITY[direction])
        return Clip(Scene(free=half, direction=direction), image, (start[0], start[1]),
                    (velocity[0], velocity[1]), phrasing)

    def scene(self, index: int) -> Scene:
        return self.clip(index).scene

    def render(self, clip: Clip) -> torch.Tensor:
        """The ``[F, 3, 32, 32]`` video of a clip."""
        assert clip.scene.free is not None
        sprite = paint(self.sprites[clip.image], clip.scene.free.colour)
        video = torch.full((self.frames, 3, CANVAS, CANVAS), -1.0)
        for f, (r, c) in enumerate(clip.positions(self.frames)):
            video[f, :, r:r + SPRITE, c:c + SPRITE] = sprite
        return video

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        clip = self.clip(index)
        return {"x": self.render(clip), "text": caption_of(clip.scene, clip.phrasing),
                "motion_free": torch.tensor(clip.motion_free)}
