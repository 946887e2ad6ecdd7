"""dtx.writers: files read back with PIL / numpy / imageio and compared with arrays built here by hand (np.kron for
nearest upscaling, explicit gap pixels), the ADM quantisation table, atomic writes, and shape checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dtx import writers
from dtx.errors import ConfigError, ShapeError
from dtx.evaluation import report
from dtx.writers import (save_frame_grid, save_gif, save_gif_grid, save_grid, save_mp4, save_npz, save_videos,
                         to_uint8)


def unit(u: np.ndarray) -> torch.Tensor:
    """Samples in [-1, 1] that quantise to exactly ``u``: 127.5 x + 128 = u + 0.5, which truncates to u."""
    return torch.from_numpy((u.astype(np.float64) - 127.5) / 127.5).float()


def pattern(*shape: int, seed: int = 0) -> np.ndarray:
    """A reproducible uint8 array of ``shape`` that uses the whole 0..255 range."""
    u = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    u.flat[0], u.flat[-1] = 0, 255
    return u


def blocks(img: np.ndarray, k: int) -> np.ndarray:
    """[h, w, c] enlarged k times by copying each pixel into a k x k block."""
    return np.kron(img, np.ones((k, k, 1), dtype=np.uint8))


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- quantisation ---------------------------------------------------------------------------------------------------

def test_quantisation_table():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, 0.5, -0.5, -0.996, 0.999, float("nan"), float("inf"),
                      float("-inf")])
    # 127.5 x + 128, clamped to [0, 255], truncated: -1 -> 0.5 -> 0; 0.5 -> 191.75 -> 191; -0.996 -> 1.01 -> 1
    expected = [0, 128, 255, 0, 255, 191, 64, 1, 255, 128, 255, 0]
    got = to_uint8(x.view(1, 1, 1, -1))
    assert got.dtype == np.uint8 and got.shape == (1, 1, 12, 1)
    assert got[0, 0, :, 0].tolist() == expected
    assert report.to_uint8(x).tolist() == expected  # the evaluation report quantises the same way


def test_to_uint8_moves_channels_last_for_images_and_videos():
    u = pattern(2, 3, 4, 5)
    assert np.array_equal(to_uint8(unit(u)), u.transpose(0, 2, 3, 1))
    v = pattern(2, 6, 3, 4, 5, seed=1)
    assert np.array_equal(to_uint8(unit(v), channel_dim=2), v.transpose(0, 1, 3, 4, 2))
    with pytest.raises(ShapeError, match="channels at dim 4"):
        to_uint8(unit(u), channel_dim=4)


# -- PNG grids ------------------------------------------------------------------------------------------------------

def test_grid_2x2_of_8x8_grayscale_matches_hand_built_png(tmp_path):
    u = pattern(4, 1, 8, 8)
    path = save_grid(unit(u), tmp_path / "grid.png", nrow=2, scale=4)
    img = Image.open(path)
    assert path == tmp_path / "grid.png" and img.mode == "L"
    expected = np.zeros((2 * 33 + 1, 2 * 33 + 1), dtype=np.uint8)  # tiles 8 * 4 = 32 px, 1-px black gaps and border
    for i in range(4):
        r, q = divmod(i, 2)
        expected[1 + 33 * r:33 + 33 * r, 1 + 33 * q:33 + 33 * q] = np.kron(u[i, 0], np.ones((4, 4), dtype=np.uint8))
    assert np.array_equal(np.array(img), expected)
    assert files_in(tmp_path) == ["grid.png"]


def test_grid_rgb_non_square_and_partial_last_row(tmp_path):
    u = pattern(3, 3, 8, 16)  # zoom 2 -> 16 x 32 tiles; 3 images at 2 a row -> 2 rows, one empty slot
    img = Image.open(save_grid(unit(u), tmp_path / "g.png", nrow=2, scale=2))
    assert img.mode == "RGB"
    expected = np.zeros((2 * 17 + 1, 2 * 33 + 1, 3), dtype=np.uint8)
    for i in range(3):
        r, q = divmod(i, 2)
        expected[1 + 17 * r:17 + 17 * r, 1 + 33 * q:33 + 33 * q] = blocks(u[i].transpose(1, 2, 0), 2)
    assert np.array_equal(np.array(img), expected)


def test_grid_large_images_are_not_enlarged_and_channels_last_input(tmp_path):
    u = pattern(1, 64, 64, 1)
    img = np.array(Image.open(save_grid(unit(u), tmp_path / "g.png", nrow=8, channel_dim=-1)))
    assert img.shape == (66, 66) and np.array_equal(img[1:65, 1:65], u[0, :, :, 0])
    assert img[0].max() == 0 and img[:, -1].max() == 0


def test_frame_grid_rows_are_videos_and_columns_frames(tmp_path):
    v = pattern(2, 3, 1, 8, 8)  # N=2 videos of F=3 frames
    img = np.array(Image.open(save_frame_grid(unit(v), tmp_path / "frames.png", scale=4)))
    assert img.shape == (2 * 33 + 1, 3 * 33 + 1)
    for n in range(2):
        for f in range(3):
            tile = img[1 + 33 * n:33 + 33 * n, 1 + 33 * f:33 + 33 * f]
            assert np.array_equal(tile, np.kron(v[n, f, 0], np.ones((4, 4), dtype=np.uint8))), (n, f)
    gaps = np.ones(img.shape, dtype=bool)
    for n in range(2):
        for f in range(3):
            gaps[1 + 33 * n:33 + 33 * n, 1 + 33 * f:33 + 33 * f] = False
    assert img[gaps].max() == 0


# -- npz archives ---------------------------------------------------------------------------------------------------

def test_npz_images_with_labels_is_adm_layout(tmp_path):
    u = pattern(3, 1, 8, 8)
    path = save_npz(unit(u), tmp_path / "samples.npz", labels=torch.tensor([7, 0, 3], dtype=torch.int32))
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "labels"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (3, 8, 8, 1)
        assert np.array_equal(z["arr_0"], u.transpose(0, 2, 3, 1))
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [7, 0, 3]
    images, labels = report.load_samples(path)  # what `dtx eval` reads
    assert np.array_equal(images.numpy(), u) and labels.tolist() == [7, 0, 3]


def test_npz_videos_nfhwc_with_extra_prompts_and_any_suffix(tmp_path):
    v = pattern(2, 4, 3, 8, 8)
    prompts = np.array(["a red ball", "a cat"])
    path = save_npz(unit(v), tmp_path / "videos.bin", channel_dim=2, extra={"prompts": prompts})
    assert files_in(tmp_path) == ["videos.bin"]  # no ".npz" appended
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "prompts"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (2, 4, 8, 8, 3)
        assert np.array_equal(z["arr_0"], v.transpose(0, 1, 3, 4, 2))
        assert z["prompts"].dtype.kind == "U" and z["prompts"].tolist() == ["a red ball", "a cat"]


def test_npz_rejects_bad_labels_and_extras(tmp_path):
    x = unit(pattern(2, 1, 8, 8))
    with pytest.raises(ShapeError, match="labels must be integers"):
        save_npz(x, tmp_path / "a.npz", labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match="labels must be integers"):
        save_npz(x, tmp_path / "a.npz", labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="reserved"):
        save_npz(x, tmp_path / "a.npz", extra={"labels": np.zeros(2)})
    with pytest.raises(ConfigError, match="object"):
        save_npz(x, tmp_path / "a.npz", extra={"meta": np.array([{"a": 1}, None], dtype=object)})
    assert files_in(tmp_path) == []


# -- videos ---------------------------------------------------------------------------------------------------------

def test_gif_grayscale_values_frames_and_loop(tmp_path):
    import imageio.v3 as iio

    u = pattern(4, 1, 8, 8)  # 4 distinct frames, 256 grey levels at most: a grayscale palette keeps them exactly
    path = save_gif(unit(u), tmp_path / "v.gif", fps=8)
    frames = iio.imread(path, index=None)
    assert frames.shape == (4, 64, 64, 3)  # 8 px enlarged 8x to 64; imageio reads palette frames as RGB
    for f in range(4):
        expected = np.kron(u[f, 0], np.ones((8, 8), dtype=np.uint8))
        for c in range(3):
            assert np.array_equal(frames[f, ..., c], expected), (f, c)
    info = Image.open(path).info
    assert info["loop"] == 0 and 120 <= info["duration"] <= 130  # 1000 / 8 ms in GIF's 10-ms steps


def test_gif_rgb_few_colours_survive_exactly(tmp_path):
    import imageio.v3 as iio

    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 128, 255]], dtype=np.uint8)
    idx = np.random.default_rng(3).integers(0, 4, size=(3, 32, 32))
    idx[1, 0, 0] = (idx[0, 0, 0] + 1) % 4  # frames differ
    u = colours[idx].transpose(0, 3, 1, 2)  # [F, 3, 32, 32]
    frames = iio.imread(save_gif(unit(u), tmp_path / "c.gif"), index=None)
    assert frames.shape == (3, 64, 64, 3)
    for f in range(3):
        assert np.array_equal(frames[f], blocks(u[f].transpose(1, 2, 0), 2)), f


def test_gif_grid_plays_videos_side_by_side(tmp_path):
    import imageio.v3 as iio

    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 128, 255]], dtype=np.uint8)
    idx = np.random.default_rng(5).integers(0, 4, size=(5, 3, 32, 32))  # 5 videos of 3 frames
    u = colours[idx].transpose(0, 1, 4, 2, 3)  # [N, F, 3, 32, 32]
    frames = iio.imread(save_gif_grid(unit(u), tmp_path / "g.gif", per_row=3, fps=4), index=None)
    assert frames.shape == (3, 2 * 65 + 1, 3 * 65 + 1, 3)  # 2 rows x 3 columns of 64 px tiles, 1 px gaps
    for f in range(3):
        for i in range(5):
            r, q = divmod(i, 3)
            tile = frames[f, 1 + r * 65:1 + r * 65 + 64, 1 + q * 65:1 + q * 65 + 64]
            assert np.array_equal(tile, blocks(u[i, f].transpose(1, 2, 0), 2)), (f, i)
        assert (frames[f, 0] == 128).all() and (frames[f, :, 65] == 128).all()  # grey gaps
        assert (frames[f, 66:, 131:] == 128).all()  # the missing sixth tile stays grey
    with pytest.raises(ShapeError):
        save_gif_grid(unit(u)[0], tmp_path / "bad.gif", per_row=2)


def test_mp4_frames_size_and_error(tmp_path):
    import imageio.v2 as iio

    # a blocky video (8x8 patches of 4 grey levels) as digits are; H.264 is lossy, so compare with a tolerance
    levels = np.array([0, 85, 170, 255], dtype=np.uint8)
    u = levels[np.random.default_rng(4).integers(0, 4, size=(6, 1, 8, 8))]
    path = save_mp4(unit(u), tmp_path / "v.mp4", fps=8)
    frames = np.stack(iio.mimread(path, format="FFMPEG"))
    assert frames.shape == (6, 64, 64, 3)
    expected = np.stack([blocks(u[f].transpose(1, 2, 0), 8) for f in range(6)]).repeat(3, axis=-1)
    mae = np.abs(frames.astype(np.float64) - expected).mean()
    assert mae < 3.0, mae
    with iio.get_reader(path, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 8
    assert files_in(tmp_path) == ["v.mp4"]


def test_mp4_odd_rgb_size_rounds_up_to_macro_blocks(tmp_path):
    import imageio.v2 as iio

    u = pattern(2, 3, 12, 20)
    frames = iio.mimread(save_mp4(unit(u), tmp_path / "odd.mp4"), format="FFMPEG")
    # short side 12 -> zoom ceil(64 / 12) = 6 -> 72 x 120 -> next multiples of 16: 80 x 128
    assert len(frames) == 2 and frames[0].shape == (80, 128, 3)


def test_save_videos_names_and_formats(tmp_path):
    v = unit(pattern(2, 3, 1, 8, 8))
    paths = save_videos(v, tmp_path / "out", stem="clip", fps=4)
    names = ["clip_000.gif", "clip_000.mp4", "clip_001.gif", "clip_001.mp4"]
    assert [p.name for p in paths] == names and files_in(tmp_path / "out") == names
    assert [p.name for p in save_videos(v, tmp_path / "g", formats=("gif",))] == ["sample_000.gif", "sample_001.gif"]
    with pytest.raises(ConfigError, match="'webm'"):
        save_videos(v, tmp_path / "x", formats=("gif", "webm"))
    with pytest.raises(ConfigError, match="fps"):
        save_gif(v[0], tmp_path / "x.gif", fps=0)


# -- atomic writes --------------------------------------------------------------------------------------------------

def _fail_pil(self, fp, *args, **kwargs):
    open(fp, "wb").write(b"torn")
    raise RuntimeError("disk full")


def _fail_savez(f, *args, **kwargs):
    f.write(b"torn")
    raise RuntimeError("disk full")


def _fail_mimwrite(uri, *args, **kwargs):
    open(uri, "wb").write(b"torn")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("kind", ["grid", "frame_grid", "npz", "gif", "mp4"])
def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch, kind):
    import imageio.v2

    monkeypatch.setattr(Image.Image, "save", _fail_pil)
    monkeypatch.setattr(np, "savez", _fail_savez)
    monkeypatch.setattr(imageio.v2, "mimwrite", _fail_mimwrite)
    img, vid = unit(pattern(2, 1, 8, 8)), unit(pattern(2, 3, 1, 8, 8))
    write = {"grid": lambda p: save_grid(img, p, 2), "frame_grid": lambda p: save_frame_grid(vid, p),
             "npz": lambda p: save_npz(img, p), "gif": lambda p: save_gif(vid[0], p),
             "mp4": lambda p: save_mp4(vid[0], p)}[kind]
    new, old = tmp_path / "new" / f"out.{kind}", tmp_path / f"old.{kind}"
    old.write_bytes(b"previous")
    for path in (new, old):
        with pytest.raises(RuntimeError, match="disk full"):
            write(path)
    assert files_in(tmp_path) == ["new", f"old.{kind}"] and files_in(tmp_path / "new") == []
    assert old.read_bytes() == b"previous"


# -- shape checks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, fragment", [
    (lambda p: save_grid(torch.zeros(1, 8, 8), p, 4), "[N, C, H, W]"),
    (lambda p: save_grid(torch.zeros(2, 4, 8, 8), p, 4), "got 4 channels"),
    (lambda p: save_grid(torch.zeros(2, 8, 8, 2), p, 4, channel_dim=-1), "got 2 channels"),
    (lambda p: save_grid(torch.zeros(0, 1, 8, 8), p, 4), "empty"),
    (lambda p: save_grid([[0.0]], p, 4), "torch.Tensor"),
    (lambda p: save_npz(torch.zeros(8, 8), p), "[N, C, H, W] images or [N, F, C, H, W] videos"),
    (lambda p: save_npz(torch.zeros(2, 4, 2, 8, 8), p, channel_dim=2), "got 2 channels"),
    (lambda p: save_frame_grid(torch.zeros(2, 1, 8, 8), p), "[N, F, C, H, W]"),
    (lambda p: save_gif(torch.zeros(1, 3, 1, 8, 8), p), "[F, C, H, W]"),
    (lambda p: save_mp4(torch.zeros(3, 2, 8, 8), p), "got 2 channels"),
    (lambda p: save_videos(torch.zeros(3, 1, 8, 8), p), "[N, F, C, H, W]"),
])
def test_bad_shapes_raise_one_line_shape_error(tmp_path, call, fragment):
    with pytest.raises(ShapeError) as info:
        call(tmp_path / "out")
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert files_in(tmp_path) == []


def test_non_finite_samples_are_written_clamped(tmp_path):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 5.0]).view(1, 1, 2, 2)
    img = np.array(Image.open(save_grid(x, tmp_path / "nan.png", 1, scale=16)))
    assert img[1:33, 1:33].tolist() == np.kron([[128, 255], [0, 255]], np.ones((16, 16), dtype=int)).tolist()


def test_report_uses_the_writers_quantisation():
    assert report.to_uint8 is writers.quantize
