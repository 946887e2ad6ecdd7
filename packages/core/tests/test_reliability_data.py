"""Reliability of training data and resumes: size limits read from image and video headers before decoding,
corrupt videos skipped as corrupt images are, errors from DataLoader workers as one line, and resumes that refuse
changed data classes or a changed objective (docs/reliability.md).

conftest's tiny denoiser is registered as a run-time plugin, so the training tests need no backbone.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dtx.cli import main
from dtx.errors import DataError


@pytest.fixture(autouse=True)
def tiny_plugin(tiny_denoiser):
    tiny_denoiser("tiny-data-test", "tiny-mlp")


def recipe(tmp_path: Path, data: dict, **extra) -> Path:
    config = {"model": {"name": "tiny-mlp", "options": {}}, "data": {"batch_size": 4, **data},
              "objective": {"kind": "gaussian", "diffusion_steps": 50}, "optim": {"lr": 1e-3},
              "sample": {"sampler": "ddim", "steps": 2, "n_per_class": 1, "every": 0},
              "max_steps": 2, "log_every": 1, "ckpt_every": 2, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(recipe_path: Path, out: Path, *args: str) -> int:
    return main(["train", str(recipe_path), "--runner", "local", "--out", str(out), *args])


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("dtx: ")]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a run folder but its lock file (which holds the last holder's PID)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dtx-lock"}


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 4) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((4, 4), 40 * k + 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def gif_bytes(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF whose logical screen and frame descriptors claim the given sizes; each frame holds one pixel of data."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    for w, h in frames:
        out += b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return out + b";"


def write_mp4(path: Path, side: int = 16) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, np.stack([np.full((side, side, 3), v, np.uint8) for v in (40, 120, 200)]), fps=8)


def write_gif(path: Path) -> None:
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


# -- finding 6: limits on every side, from headers, for images and every video frame ---------------------------------

def test_images_over_a_side_or_aspect_limit_are_refused_from_their_header(tmp_path):
    from dtx.data.images import ImageFolderDataset, center_crop_arr
    from dtx.file_headers import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, check_frame_size

    image_folder(tmp_path, classes=("a",), per_class=6)
    Image.new("L", (8_000_000, 1)).save(tmp_path / "a" / "long.png")  # 8M pixels: under the pixel limit
    Image.new("L", (4096, 1)).save(tmp_path / "a" / "flat.png")  # every side small, the aspect ratio not
    assert 8_000_000 < MAX_IMAGE_PIXELS and 8_000_000 > MAX_IMAGE_SIDE and 4096 > MAX_ASPECT_RATIO
    with pytest.warns(UserWarning, match="skipped 2 of 8 unreadable images"):
        ds = ImageFolderDataset(tmp_path, image_size=4, channels=1, max_corrupt_fraction=0.5)
    assert sorted(p.name for p in ds.corrupt) == ["flat.png", "long.png"] and len(ds) == 6
    with pytest.raises(DataError, match=r"long.png: 8000000x1 pixels has a side over the 16384 pixel limit"):
        check_frame_size(8_000_000, 1, tmp_path / "a" / "long.png")
    with pytest.raises(DataError, match=r"flat.png: 4096x1 pixels is over the 64:1 aspect ratio limit"):
        check_frame_size(4096, 1, tmp_path / "a" / "flat.png")
    with pytest.raises(DataError, match="empty side"):
        check_frame_size(0, 5, "x.png")
    # the crop's resized copy is bounded too (a 3x1 image cropped to 4800 would be resized to 14400x4800 first)
    with pytest.raises(DataError, match="needs an intermediate over the 67108864 pixel limit"):
        center_crop_arr(Image.new("L", (3, 1)), 4800)


def test_video_frames_over_the_limits_are_refused_from_their_headers(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from dtx.data.videos import VideoFolderDataset
    from dtx.file_headers import gif_size

    write_gif(tmp_path / "good.gif")
    write_mp4(tmp_path / "good.mp4")
    write_mp4(tmp_path / "wide.mp4", side=32)  # over the side limit this test sets below
    (tmp_path / "screen.gif").write_bytes(gif_bytes((9000, 9000), [(1, 1)]))  # 81M-pixel canvas, 1 pixel drawn
    (tmp_path / "frame.gif").write_bytes(gif_bytes((1, 1), [(1, 1), (9000, 9000)]))  # the second frame grows it
    assert gif_size(tmp_path / "screen.gif") == gif_size(tmp_path / "frame.gif") == (9000, 9000)
    assert gif_size(tmp_path / "good.gif") == (16, 16)
    monkeypatch.setattr("dtx.file_headers.MAX_IMAGE_SIDE", 24)
    decoded: list[str] = []
    imiter = iio.imiter
    monkeypatch.setattr(iio, "imiter", lambda path, **kw: decoded.append(Path(path).name) or imiter(path, **kw))
    with pytest.warns(UserWarning, match="skipped 3 of 5 unreadable clips"):
        ds = VideoFolderDataset(tmp_path, image_size=8, frames=1, max_corrupt_fraction=0.8)
    assert sorted(p.name for p in ds.corrupt) == ["frame.gif", "screen.gif", "wide.mp4"] and decoded == []
    assert [p.name for p in ds.clips] == ["good.gif", "good.mp4"] and ds[1]["x"].shape == (1, 3, 8, 8)
    # without the scan (verify="none"), every clip's header is checked before it is decoded
    lazy = VideoFolderDataset(tmp_path, image_size=8, frames=1, max_corrupt_fraction=0.8, verify="none")
    screen = [p.name for p in lazy.clips].index("screen.gif")
    decoded.clear()
    with pytest.warns(UserWarning, match=r"skipping unreadable clip .*screen.gif: DataError: .*9000x9000 pixels "
                                         r"has a side over the 24 pixel limit"):
        item = lazy[screen]
    assert decoded == ["good.gif"] and item["x"].shape == (1, 3, 8, 8)  # the next readable clip stands in


# -- finding 10: corrupt videos are skipped; unreadable data fails early, in one line ------------------------------

def test_corrupt_videos_are_skipped_with_a_short_warning(tmp_path):
    from dtx.data.videos import VideoFolderDataset

    for i in range(9):
        write_gif(tmp_path / f"clip{i}.gif")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.warns(UserWarning, match=r"skipped 1 of 10 unreadable clips .*\(first: .*bad.mp4\)"):
        ds = VideoFolderDataset(tmp_path, image_size=8, frames=2)
    assert len(ds) == 9 and [p.name for p in ds.corrupt] == ["bad.mp4"]
    lazy = VideoFolderDataset(tmp_path, image_size=8, frames=2, verify="none")  # found when decoded
    bad = [p.name for p in lazy.clips].index("bad.mp4")
    with pytest.warns(UserWarning) as caught:
        item = lazy[bad]
    message = str(caught[0].message)
    assert message.startswith(f"skipping unreadable clip {tmp_path / 'bad.mp4'}: ") and len(message) < 400
    assert "ffmpeg version" not in message and "\n" not in message
    assert torch.equal(item["x"], lazy.load(lazy.clips[(bad + 1) % len(lazy)]))  # the next clip stands in


def test_a_folder_of_unreadable_videos_is_one_error_line_before_anything_is_written(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        (videos / f"bad{i}.mp4").write_bytes(b"\0" * 64 * (i + 1))
    out = tmp_path / "run"
    code = train(recipe(tmp_path, {"name": "video-folder", "options": {"root": str(videos), "image_size": 4,
                                                                        "frames": 2, "channels": 1}}), out)
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"dtx: error: 4 of 4 clips in {videos} are unreadable (none is readable); first: ")
    assert len(lines[0]) < 500 and "ffmpeg version" not in err
    assert not out.exists()  # nothing written: no config.yaml, no metrics, not even the folder


def test_errors_in_dataloader_workers_reach_the_user_as_their_one_line(tmp_path, capsys):
    root = image_folder(tmp_path / "images", per_class=2)
    for name in ("a", "b", "c"):
        (root / name / "zz-bad.png").write_bytes(b"not an image")  # 3 of 9: over max_corrupt_fraction
    data = {"name": "image-folder", "num_workers": 2,
            "options": {"root": str(root), "image_size": 4, "channels": 1, "verify": "none"}}
    code = train(recipe(tmp_path, data, max_steps=6), tmp_path / "run")
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    # each worker counts the unreadable images it meets: the first one is already over 10%
    assert lines[0].startswith(f"dtx: error: 1 of 9 images in {root} are unreadable (11% > max_corrupt_fraction 10%)")
    assert "Traceback" not in err and "worker" not in lines[0] and len(lines[0]) < 400


# -- finding 13: a resume must mean what its checkpoint meant --------------------------------------------------------

def test_resume_refuses_renamed_classes_and_a_changed_objective_and_writes_nothing(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    data = {"name": "image-folder", "options": {"root": str(root), "image_size": 4, "channels": 1}}
    path, out = recipe(tmp_path, data), tmp_path / "run"
    assert train(path, out) == 0
    from dtx.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "step_00000002")
    assert state["data_classes"] == ["a", "b", "c"]
    before = digest(out)
    capsys.readouterr()

    (root / "b").rename(root / "z")  # classes a, c, z: labels 1 and 2 would silently swap meaning
    assert train(path, out, "--max-steps", "4") == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"dtx: error: data classes differ from the checkpoint's ({out / 'checkpoints' / 'step_00000002'}):"
                     f" label 1 was 'b', is now 'c'; label 2 was 'c', is now 'z'; use a new --out or the original data"]
    assert digest(out) == before
    (root / "z").rename(root / "b")

    assert train(path, out, "--max-steps", "4", "objective.kind=karras", "sample.sampler=heun") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "objective differs from the checkpoint's" in lines[0]
    assert "objective.kind was 'gaussian', is now 'karras'" in lines[0] and "use a new --out" in lines[0]
    assert digest(out) == before

    assert train(path, out, "--max-steps", "4") == 0  # the unchanged run resumes
    assert (out / "checkpoints" / "step_00000004").is_dir()
