"""Compositional scores (dtx_gentron.compbench) and ``dtx compbench-digits``.

The scorer must pass the real data it judges (digit >= 97%, colour and position exact) and fail exactly the aspect
that a sample gets wrong: a recoloured digit fails colour only, a blanked half fails position, a clip played
backwards fails direction. The command reads archives written by ``dtx.writers.save_npz``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from dtx.errors import ConfigError, ShapeError
from dtx.writers import save_npz
from dtx_gentron.compbench import configure_parser, run, score_images, score_videos
from dtx_gentron.data import COLOURS, CaptionedDigits, CaptionedMovingDigits, Half, Scene


@pytest.fixture(scope="module")
def test_set():
    d = CaptionedDigits("test")
    return d, torch.stack([d[i]["x"] for i in range(len(d))]), [d.scene(i) for i in range(len(d))]


@pytest.fixture(scope="module")
def clips():
    v = CaptionedMovingDigits("test", frames=8, size=80, still_fraction=0.25)
    return torch.stack([v[i]["x"] for i in range(len(v))]), [v.scene(i) for i in range(len(v))]


def test_real_held_out_images_score_right(test_set):
    _, x, scenes = test_set
    s = score_images(x, scenes).summary()
    assert s["digit"] >= 0.97 and s["colour"] == 1.0 and s["position"] == 1.0 and s["all"] >= 0.95
    assert s["all_held_out"] == s["all"] and s["all_seen"] is None  # every test prompt is held out


def _other_colour(colour: str) -> str:
    names = list(COLOURS)
    return names[(names.index(colour) + 1) % len(names)]


def test_a_recoloured_digit_fails_colour_but_not_digit(test_set):
    d, x, scenes = test_set
    before = score_images(x[:40], scenes[:40])
    recoloured = []
    for i in range(40):
        comp = d.composition(i)
        left, right = (Half(h.digit, _other_colour(h.colour)) if h else None for h in comp.scene.halves)
        recoloured.append(d.render(dataclasses.replace(comp, scene=Scene(left, right))))
    after = score_images(torch.stack(recoloured), scenes[:40])
    assert not after.colour_ok.any() and not after.all_ok.any()
    assert torch.equal(after.digit_ok, before.digit_ok) and after.position_ok.all()


def test_a_blank_or_extra_half_fails_position(test_set):
    _, x, scenes = test_set
    both = [i for i, s in enumerate(scenes) if s.left and s.right][:20]
    blanked = x[both].clone()
    blanked[..., 16:] = -1
    s = score_images(blanked, [scenes[i] for i in both])
    assert not s.position_ok.any() and not s.all_ok.any() and not s.colour_ok[:, 1].any()
    assert s.colour_ok[:, 0].all()
    left_only = [Scene(left=scenes[i].left) for i in both]  # the prompt leaves the right half empty
    s = score_images(x[both], left_only)
    assert not s.position_ok.any()


def test_real_clips_score_direction_and_reversed_clips_fail(clips):
    x, scenes = clips
    assert any(s.direction is None for s in scenes) and any(s.direction for s in scenes)
    s = score_videos(x, scenes).summary()
    assert s["frame_consistency"] >= 0.97 and s["colour"] == 1.0
    assert s["direction"] == 1.0 and s["still"] == 1.0
    backwards = score_videos(x.flip(1), scenes)
    assert backwards.summary()["direction"] == 0.0 and backwards.summary()["still"] == 1.0
    moving = [i for i, sc in enumerate(scenes) if sc.direction][:10]
    as_still = score_videos(x[moving], [Scene(free=scenes[i].free) for i in moving])  # moving but asked to stay
    assert as_still.summary()["still"] == 0.0


def test_direction_is_the_displacement_from_first_to_last_frame(clips):
    x, scenes = clips
    i = next(k for k, sc in enumerate(scenes) if sc.direction == "right")
    there_and_back = torch.cat([x[i, :4], x[i, :4].flip(0)])  # right for 3 frames, then back to the start
    middle_shuffled = torch.cat([x[i, :1], x[i, 1:-1].flip(0), x[i, -1:]])  # same first and last frame
    s = score_videos(torch.stack([there_and_back, middle_shuffled]), [scenes[i]] * 2)
    assert s.direction_pred == (None, "right") and s.direction_ok.tolist() == [False, True]


def test_held_out_test_clips_count_as_held_out(clips):
    x, scenes = clips
    s = score_videos(x, scenes)
    assert torch.equal(s.held_out, s.moving)  # every moving test clip is a held-out triple, stills never are
    assert s.summary()["all_held_out"] == _mean_of(s.all_ok[s.moving])


def _mean_of(t: torch.Tensor) -> float:
    return t.float().mean().item()


def test_scoring_checks_shapes_and_scene_kinds(test_set, clips):
    _, x, scenes = test_set
    with pytest.raises(ShapeError):
        score_images(x[:2, :1], scenes[:2])
    with pytest.raises(ShapeError):
        score_images(x[:2], scenes[:3])
    with pytest.raises(ConfigError, match="does not describe"):
        score_images(x[:1], [Scene(free=Half(1, "red"))])
    with pytest.raises(ConfigError, match="does not describe"):
        score_videos(clips[0][:1], scenes[:1])


def _namespace(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_command_prints_accuracies_of_an_image_archive(tmp_path, test_set, capsys):
    d, x, _ = test_set
    prompts = np.array([d[i]["text"] for i in range(30)])
    path = save_npz(x[:30], tmp_path / "samples" / "sample.npz", extra={"prompts": prompts})
    assert run(_namespace(str(path))) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) >= {"digit", "colour", "position", "all", "all_held_out", "all_seen"}
    assert float(lines["colour"]) == 1.0 and float(lines["position"]) == 1.0 and float(lines["digit"]) >= 0.9
    assert lines["all_seen"] == "n/a"
    assert run(_namespace(str(path.parent), "--json")) == 0  # a folder with one archive
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "images" and result["num_samples"] == 30 and result["colour"] == 1.0


def test_command_scores_a_video_archive(tmp_path, clips, capsys):
    x, scenes = clips
    v = CaptionedMovingDigits("test", frames=8, size=80, still_fraction=0.25)
    prompts = np.array([v[i]["text"] for i in range(12)])
    path = save_npz(x[:12], tmp_path / "v.npz", channel_dim=2, extra={"prompts": prompts})
    assert run(_namespace(str(path), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "videos" and result["direction"] == 1.0 and result["colour"] == 1.0


def test_command_names_bad_input(tmp_path, test_set):
    _, x, _ = test_set
    with pytest.raises(ConfigError, match="missing.npz"):
        run(_namespace(str(tmp_path / "missing.npz")))
    no_prompts = save_npz(x[:2], tmp_path / "a" / "no_prompts.npz")
    with pytest.raises(ConfigError, match="no_prompts.npz.*prompts"):
        run(_namespace(str(no_prompts)))
    bad = save_npz(x[:2], tmp_path / "b" / "bad.npz", extra={"prompts": np.array(["a red 3 on the left", "a cat"])})
    with pytest.raises(ConfigError, match="bad.npz.*'a cat'"):
        run(_namespace(str(bad)))
    small = save_npz(x[:2, :, :16, :16], tmp_path / "c" / "small.npz",
                     extra={"prompts": np.array(["a red 3 on the left"] * 2)})
    with pytest.raises(ConfigError, match="small.npz.*arr_0"):
        run(_namespace(str(small)))
    save_npz(x[:2], tmp_path / "b" / "second.npz", extra={"prompts": np.array(["a red 3 on the left"] * 2)})
    with pytest.raises(ConfigError, match="exactly one"):
        run(_namespace(str(tmp_path / "b")))
    video_prompt = save_npz(x[:1], tmp_path / "d" / "v.npz", extra={"prompts": np.array(["a red 3 moving up"])})
    with pytest.raises(ConfigError, match="v.npz.*images"):
        run(_namespace(str(video_prompt)))
