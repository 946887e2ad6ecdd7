"""GenTron's embedded data: ``captioned-digits`` and ``captioned-moving-digits`` (dtx_gentron.data).

Checked against the image digits they are made of: the split's 2x digit in the named colour's channels at rows 8..23
of its half, black elsewhere; the held-out (colour, digit, side) rule and how the splits use it; captions that read
back to their scenes in every phrasing; items fixed by (seed, index); clips that keep the whole sprite inside while
moving one way at 1-2 px/frame, and motion-free stills for joint training; the held-out (colour, digit, direction)
rule of moving clips and how the splits use it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from dtx.data.digits import digits_arrays
from dtx.errors import ConfigError
from dtx_gentron.data import (COLOURS, DIRECTIONS, NUM_PHRASINGS, CaptionedDigits, CaptionedMovingDigits, Half,
                              Scene, caption_of, held_out, held_out_motion, parse_caption)


def _all_image_scenes() -> list[Scene]:
    halves = [None] + [Half(d, c) for d in (0, 3, 9) for c in COLOURS]
    return [Scene(left=a, right=b) for a in halves for b in halves if a or b]


def test_image_items_are_the_split_digits_in_colour_in_their_half():
    d = CaptionedDigits("test", size=40)
    sprites, labels = digits_arrays("test", 16)
    assert len(d) == 40
    info = d.info
    assert (info.channels, info.height, info.width, info.frames, info.fields) == (3, 32, 32, None, ("text",))
    for i in range(len(d)):
        item, comp = d[i], d.composition(i)
        x = item["x"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(item["text"], str)
        assert x.min() >= -1 and x.max() <= 1
        assert torch.all(x[:, :8] == -1) and torch.all(x[:, 24:] == -1)  # rows 8..23 only
        for side, (half, image) in enumerate(zip(comp.scene.halves, comp.images)):
            window = x[:, 8:24, 16 * side:16 * side + 16]
            if half is None:
                assert image is None and torch.all(window == -1)
                continue
            assert labels[image] == half.digit
            for channel, on in enumerate(COLOURS[half.colour]):
                expected = sprites[image, 0] if on else torch.full((16, 16), -1.0)
                assert torch.equal(window[channel], expected)


def test_layouts_never_empty_and_follow_empty_prob():
    d = CaptionedDigits("all", size=300, empty_prob=0.5)
    scenes = [d.scene(i) for i in range(len(d))]
    counts = {"both": 0, "left": 0, "right": 0}
    for s in scenes:
        assert s.left or s.right
        counts["both" if s.left and s.right else "left" if s.left else "right"] += 1
    # weights 1/4 : 1/4 : 1/4 of the non-empty layouts -> a third each
    assert all(60 <= c <= 140 for c in counts.values()), counts
    none_empty = CaptionedDigits("all", size=50, empty_prob=0.0)
    assert all(none_empty.scene(i).left and none_empty.scene(i).right for i in range(50))


def test_held_out_rule_and_splits():
    triples = [(c, d, s) for c in COLOURS for d in range(10) for s in (0, 1) if held_out(c, d, s)]
    assert len(triples) == 20
    for d, s in itertools.product(range(10), (0, 1)):  # every digit and side misses exactly one colour
        assert sum(held_out(c, d, s) for c in COLOURS) == 1
    assert held_out("red", 0, "left") and held_out("yellow", 0, "right") and not held_out("red", 0, 1)

    train, test = CaptionedDigits("train", size=400), CaptionedDigits("test")
    assert len(test) == 355 and len(CaptionedDigits("train")) == 4 * 1442 and len(CaptionedDigits("all")) == 4 * 1797
    assert torch.equal(train.sprites, digits_arrays("train", 16)[0])
    assert torch.equal(test.sprites, digits_arrays("test", 16)[0])
    for i in range(len(train)):
        s = train.scene(i)
        assert not any(h and held_out(h.colour, h.digit, side) for side, h in enumerate(s.halves))
    for i in range(len(test)):
        s = test.scene(i)
        assert any(h and held_out(h.colour, h.digit, side) for side, h in enumerate(s.halves))
        assert s.is_held_out
    seen = {(h.colour, h.digit, side) for i in range(len(train)) for side, h in enumerate(train.scene(i).halves) if h}
    assert len(seen) > 80  # the 100 allowed triples are actually used


def test_held_out_motion_rule_and_splits():
    triples = [(c, d, m) for c in COLOURS for d in range(10) for m in DIRECTIONS if held_out_motion(c, d, m)]
    assert len(triples) == 40
    for d, m in itertools.product(range(10), DIRECTIONS):  # every digit and direction misses exactly one colour
        assert sum(held_out_motion(c, d, m) for c in COLOURS) == 1
    for c, d in itertools.product(COLOURS, range(10)):  # a colour and digit miss at most one direction
        assert sum(held_out_motion(c, d, m) for m in DIRECTIONS) <= 1
    assert held_out_motion("green", 0, "left") and held_out_motion("red", 2, "down")
    assert not held_out_motion("red", 0, "left")

    train = CaptionedMovingDigits("train", size=1442, still_fraction=0.25)
    test = CaptionedMovingDigits("test")
    train_scenes = [train.scene(i) for i in range(len(train))]
    moving = [s for s in train_scenes if s.direction]
    assert not any(s.is_held_out for s in train_scenes)
    assert len({(s.free.colour, s.free.digit, s.direction) for s in moving}) > 180  # the 200 allowed triples
    stills = {(s.free.colour, s.free.digit) for s in train_scenes if s.direction is None}
    assert any(held_out_motion(c, d, m) for c, d in stills for m in DIRECTIONS)  # stills take any colour
    # only triples are held out: every pair of (colour, digit, direction) still trains
    assert {(s.free.colour, s.free.digit) for s in moving} == set(itertools.product(COLOURS, range(10)))
    assert {(s.free.digit, s.direction) for s in moving} == set(itertools.product(range(10), DIRECTIONS))
    assert {(s.free.colour, s.direction) for s in moving} == set(itertools.product(COLOURS, DIRECTIONS))
    assert len(test) == 355 and all(test.scene(i).direction and test.scene(i).is_held_out for i in range(len(test)))


def test_captions_round_trip_in_every_phrasing():
    scenes = _all_image_scenes()
    scenes += [Scene(free=Half(d, c), direction=m) for d in (1, 7) for c in COLOURS for m in (None, *DIRECTIONS)]
    for scene in scenes:
        texts = [caption_of(scene, k) for k in range(NUM_PHRASINGS)]
        assert len(set(texts)) == NUM_PHRASINGS
        for text in texts:
            assert parse_caption(text) == scene, text
            assert parse_caption("  " + text.upper() + ". ") == scene
    assert parse_caption("a red 3 on the left and a blue 7 on the right") == Scene(Half(3, "red"), Half(7, "blue"))
    assert parse_caption("a green 5 moving left") == Scene(free=Half(5, "green"), direction="left")
    assert parse_caption("a green 5") == Scene(free=Half(5, "green"))


def test_bad_captions_and_scenes_raise_config_errors():
    for text in ("a purple 3 on the left", "a red 12 on the left", "two red 3s", "a red 3 moving sideways", ""):
        with pytest.raises(ConfigError, match="cannot parse caption"):
            parse_caption(text)
    with pytest.raises(ConfigError):
        Scene()
    with pytest.raises(ConfigError):
        Scene(left=Half(1, "red"), free=Half(2, "blue"))
    with pytest.raises(ConfigError):
        Scene(left=Half(1, "red"), direction="left")
    with pytest.raises(ConfigError):
        Half(10, "red")
    with pytest.raises(ConfigError):
        caption_of(Scene(free=Half(1, "red")), NUM_PHRASINGS)


def test_items_match_their_captions_and_vary_in_phrasing():
    d = CaptionedDigits("train", size=60)
    v = CaptionedMovingDigits("train", size=60, still_fraction=0.5)
    for ds in (d, v):
        assert all(parse_caption(ds[i]["text"]) == ds.scene(i) for i in range(len(ds)))
    assert len({d.composition(i).phrasing for i in range(60)}) == NUM_PHRASINGS


def test_items_are_fixed_by_seed_and_index():
    for make in (lambda seed: CaptionedDigits("train", seed=seed, size=30),
                 lambda seed: CaptionedMovingDigits("train", seed=seed, size=30, still_fraction=0.3)):
        a, b = make(0), make(0)
        backwards = [b[i] for i in reversed(range(30))][::-1]
        for i in range(30):
            first, again = a[i], a[i]
            assert torch.equal(first["x"], again["x"]) and first["text"] == again["text"]
            assert torch.equal(first["x"], backwards[i]["x"]) and first["text"] == backwards[i]["text"]
        assert torch.equal(a[-1]["x"], a[29]["x"])
        other = make(1)
        assert any(other[i]["text"] != a[i]["text"] for i in range(30))
        with pytest.raises(IndexError):
            a[30]


def test_options_are_validated_by_name():
    for frames in (3, 17, 8.0, True):
        with pytest.raises(ConfigError, match="frames"):
            CaptionedMovingDigits(frames=frames)
    with pytest.raises(ConfigError, match="still_fraction"):
        CaptionedMovingDigits(still_fraction=1.5)
    for p in (1.0, -0.1, "x"):
        with pytest.raises(ConfigError, match="empty_prob"):
            CaptionedDigits(empty_prob=p)
    for cls in (CaptionedDigits, CaptionedMovingDigits):
        with pytest.raises(ConfigError, match="size"):
            cls(size=0)
        with pytest.raises(ConfigError, match="seed"):
            cls(seed="0")
        with pytest.raises(ConfigError, match="split"):
            cls(split="val")


def _ink_centroid(video: torch.Tensor) -> torch.Tensor:
    """Per-frame (row, col) centroid of the ink of ``[F, 3, H, W]`` (brightness above black)."""
    w = (video + 1).sum(1)
    rows, cols = torch.arange(w.shape[1], dtype=w.dtype), torch.arange(w.shape[2], dtype=w.dtype)
    mass = w.sum((1, 2))
    return torch.stack([(w.sum(2) * rows).sum(1) / mass, (w.sum(1) * cols).sum(1) / mass], 1)


@pytest.mark.parametrize("frames", [4, 9, 16])
def test_clips_move_one_way_and_keep_the_digit_inside(frames):
    v = CaptionedMovingDigits("test", frames=frames, size=60)
    sprites, labels = digits_arrays("test", 16)
    info = v.info
    assert (info.channels, info.frames, info.fields) == (3, frames, ("text", "motion_free"))
    step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    speeds = set()
    for i in range(len(v)):
        item = v[i]
        x, scene = item["x"], parse_caption(item["text"])
        assert x.shape == (frames, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
        assert item["motion_free"].dtype == torch.bool and not item["motion_free"]
        assert scene.free.digit == labels[i] and scene.direction in DIRECTIONS
        rgb = torch.tensor(COLOURS[scene.free.colour], dtype=torch.float32)
        full = ((sprites[i] + 1).sum() * rgb)
        assert torch.allclose((x + 1).sum((2, 3)), full.expand(frames, 3))  # never cut off by the border
        moves = _ink_centroid(x).diff(dim=0)
        assert torch.allclose(moves, moves[0].expand_as(moves), atol=1e-4)  # constant velocity, no bounce
        speed = moves[0].abs().max().item()
        speeds.add(round(speed))
        assert torch.allclose(moves[0], torch.tensor(step[scene.direction], dtype=torch.float32) * speed, atol=1e-4)
    assert speeds == ({1, 2} if frames <= 9 else {1})


def test_still_items_are_motion_free_pseudo_videos():
    stills = CaptionedMovingDigits("train", frames=6, size=20, still_fraction=1.0)
    for i in range(len(stills)):
        item = stills[i]
        assert bool(item["motion_free"]) and parse_caption(item["text"]).direction is None
        assert torch.equal(item["x"], item["x"][:1].expand_as(item["x"]))
    mixed = CaptionedMovingDigits("train", size=200, still_fraction=0.3)
    flags = [bool(mixed[i]["motion_free"]) for i in range(len(mixed))]
    assert 30 <= sum(flags) <= 90
    assert all(f == (mixed.scene(i).direction is None) for i, f in enumerate(flags))
    batch = next(iter(DataLoader(mixed, batch_size=8)))
    assert batch["x"].shape == (8, 8, 3, 32, 32) and batch["motion_free"].shape == (8,)
    assert isinstance(batch["text"], list) and len(batch["text"]) == 8
