"""Size buckets: an image folder of three aspect ratios and a video folder of clips of two lengths train DiT, HDiT,
Latte and GenTron (T2I and T2V, captions beside the files) in batches of one shape each (every bucket used, batch
sizes from the token budget); a bucket a family cannot take stops the run before anything is written, naming the
shape; bucket assignment by aspect and length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtx.data.buckets import BucketBatches, assign, batch_sizes
from dtx.errors import ConfigError
from dtx.training.config import load_train_config
from dtx.training.context import LocalContext
from dtx.training.data_stream import DataPosition, DataStream
from dtx.training.run_parts import build_run
from dtx.training.trainer import train

pytestmark = pytest.mark.slow

IMAGE_BUCKETS = [[16, 16], [8, 16], [16, 8]]  # square, wide, tall


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate([(20, 20), (10, 21), (22, 11)] * 4):  # 1:1, ~1:2, ~2:1
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _video_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i, frames in enumerate([5, 9] * 6):  # two lengths
        clip = root / f"clip{i:02d}"
        clip.mkdir(parents=True)
        for f in range(frames):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(clip / f"{f:03d}.png")
        (root / f"clip{i:02d}.txt").write_text(f"a clip of {frames} frames")
    return root


def _caption_images(root: Path) -> Path:
    for path in root.rglob("*.png"):
        path.with_suffix(".txt").write_text(f"picture {path.stem} of {path.parent.name}")
    return root


def _config(tmp_path: Path, model: dict, data: dict, batch: int = 4) -> object:
    return load_train_config({"model": model, "data": {**data, "batch_size": batch}, "optim": {"lr": 1e-3},
                              "sample": {"every": 0, "steps": 2, "n_per_class": 1}, "max_steps": 6, "log_every": 1,
                              "ckpt_every": 6, "precision": "fp32", "out": str(tmp_path / "run")})


def _shapes_of_one_epoch(cfg, tmp_path: Path) -> list[tuple[int, ...]]:
    ctx = LocalContext(tmp_path / "probe", device="cpu")
    parts = build_run(cfg, ctx)
    stream = DataStream(parts.data.dataset, cfg, ctx, parts.micro_batch, DataPosition(), 0, 1, parts.bucket_batches)
    stream._open()
    return [tuple(b["x"].shape) for b in stream._it]


def test_bucket_assignment_and_budget():
    buckets = [(16, 16), (8, 16), (16, 8)]
    assert [assign(s, buckets) for s in [(20, 20), (10, 21), (22, 11), (9, 30)]] == [0, 1, 2, 1]
    clips = [(4, 16, 16), (8, 16, 16), (8, 8, 16)]
    assert [assign(s, clips) for s in [(5, 16, 16), (9, 16, 16), (12, 9, 20), (3, 16, 16)]] == [0, 1, 2, None]
    assert batch_sizes([(16, 16), (8, 16), (4, 8, 8)], 64, 2, 7) == [1, 2, 1]
    assert batch_sizes([(16, 16), (8, 16)], 0, 2, 7) == [7, 7]
    # one epoch: every item of a full global batch used once, this rank's slice, one bucket per batch
    bucket_of = [0, 1, 0, 1, 0, 1, 0, 0]
    perm = torch.arange(8)
    ranks = [list(BucketBatches(bucket_of, [1, 1], r, 2, perm)) for r in (0, 1)]
    assert ranks == [[[0], [1], [4]], [[2], [3], [6]]]  # items 5 and 7 wait in part-filled queues: unused
    assert list(BucketBatches(bucket_of, [1, 1], 1, 2, perm, start=2)) == [[6]]  # resumed at batch 2


@pytest.mark.parametrize("family", ["DiT", "HDiT"])
def test_images_of_three_aspect_ratios_train_in_batches_of_one_shape(tmp_path, family):
    model = {"DiT": {"name": "DiT", "options": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
                                                "learn_sigma": False}},
             "HDiT": {"name": "HDiT", "options": {"patch_size": 2, "depths": [1, 1], "widths": [64, 128],
                                                  "d_ffs": [96, 192], "self_attns": ["neighborhood:3", "global"]}}}
    data = {"name": "image-folder", "options": {"root": str(_image_folder(tmp_path / "images"))},
            "buckets": {"shapes": IMAGE_BUCKETS, "max_tokens": 64}}
    cfg = _config(tmp_path, model[family], data)
    shapes = _shapes_of_one_epoch(cfg, tmp_path)
    assert {s[1:] for s in shapes} == {(3, 16, 16), (3, 8, 16), (3, 16, 8)}  # every bucket, one shape per batch
    assert {s[0] for s in shapes if s[2:] == (16, 16)} == {1} and {s[0] for s in shapes if s[2:] != (16, 16)} == {2}
    summary = train(cfg, LocalContext(cfg.out, device="cpu"))
    assert summary["step"] == 6 and summary["loss"] == summary["loss"]


def test_clips_of_two_lengths_train_latte(tmp_path):
    data = {"name": "video-folder", "options": {"root": str(_video_folder(tmp_path / "clips")), "unconditional": True},
            "buckets": {"shapes": [[4, 16, 16], [8, 16, 16]]}}
    model = {"name": "Latte", "options": {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
                                          "learn_sigma": False}}
    cfg = _config(tmp_path, model, data, batch=2)
    shapes = _shapes_of_one_epoch(cfg, tmp_path)
    assert {s for s in shapes} == {(2, 4, 3, 16, 16), (2, 8, 3, 16, 16)}
    summary = train(cfg, LocalContext(cfg.out, device="cpu"))
    assert summary["step"] == 6


@pytest.mark.parametrize("video", [False, True], ids=["t2i", "t2v"])
def test_gentron_trains_on_captioned_buckets(tmp_path, video):
    from dtx_gentron.text import save_tiny_text_encoder

    encoder = save_tiny_text_encoder(tmp_path / "bert", "bert", hidden_size=16)
    model = {"name": "GenTron", "options": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
                                            "context_dim": 16, "text_length": 8, "learn_sigma": False}}
    if video:
        data = {"name": "video-folder", "options": {"root": str(_video_folder(tmp_path / "clips")),
                                                    "unconditional": True, "captions": True},
                "buckets": {"shapes": [[4, 16, 16], [8, 16, 16]]}}
    else:
        data = {"name": "image-folder", "options": {"root": str(_caption_images(_image_folder(tmp_path / "images"))),
                                                    "unconditional": True, "captions": True},
                "buckets": {"shapes": IMAGE_BUCKETS, "max_tokens": 16}}
    cfg = load_train_config({"model": model, "data": {**data, "batch_size": 2}, "optim": {"lr": 1e-3},
                             "conditioning": {"conditioners": {"text": {"name": "text", "dropout": 0.1, "options": {
                                 "encoder": str(encoder), "max_length": 8}}}},
                             "sample": {"every": 0, "steps": 2, "prompts": ["picture 1 of a"]}, "max_steps": 4,
                             "log_every": 1, "ckpt_every": 4, "precision": "fp32", "out": str(tmp_path / "run")})
    shapes = _shapes_of_one_epoch(cfg, tmp_path)
    assert len({s[1:] for s in shapes}) == (2 if video else 3)
    assert train(cfg, LocalContext(cfg.out, device="cpu"))["step"] == 4


def test_a_bucket_the_family_cannot_take_stops_before_anything_is_written(tmp_path):
    data = {"name": "image-folder", "options": {"root": str(_image_folder(tmp_path / "images"))},
            "buckets": {"shapes": [[16, 16], [10, 16]]}}  # 10 rows: not a multiple of HDiT's patch x merge (4)
    model = {"name": "HDiT", "options": {"patch_size": 2, "depths": [1, 1], "widths": [64, 128], "d_ffs": [64, 128],
                                         "self_attns": ["neighborhood:3", "global"]}}
    cfg = _config(tmp_path, model, data)
    with pytest.raises(ConfigError, match="10x16 bucket"):
        train(cfg, LocalContext(cfg.out, device="cpu"))
    assert not Path(cfg.out).exists() or not any(Path(cfg.out).iterdir())
    digits = _config(tmp_path, model, {"name": "digits", "options": {"image_size": 16},
                                       "buckets": {"shapes": [[16, 16]]}})  # digits come in one size
    with pytest.raises(ConfigError, match="data.buckets.*one size"):
        train(digits, LocalContext(tmp_path / "d", device="cpu"))
