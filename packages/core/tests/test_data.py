"""Datasets: digits vs scikit-learn's arrays, ADM crop/flip on hand-built images, corrupt-file handling, collate,
and latent shards round-tripped through a tiny randomly initialised AutoencoderKL."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from sklearn.datasets import load_digits

from dtx.cli import main
from dtx.data import DataInfo, build_dataset, collate, data_info
from dtx.errors import ConfigError, DataError, ShapeError, UnknownNameError


@pytest.fixture(scope="module")
def sk_digits():
    d = load_digits()
    return d.images, d.target


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dtx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- digits -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_matches_sklearn(sk_digits, size):
    images, target = sk_digits
    ds = build_dataset("digits", image_size=size, split="all")
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1 and ds.image_size == size
    assert ds.is_latent is False
    item = ds[5]
    assert set(item) == {"x", "y"} and item["x"].shape == (1, size, size) and item["x"].dtype == torch.float32
    assert item["y"].dtype == torch.int64 and item["y"].dim() == 0
    assert np.array_equal(ds.labels.numpy(), target)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    f = size // 8
    for n, i, j in [(0, 0, 0), (7, 3, 5), (1796, 7, 7), (500, 2, 6)]:  # each output pixel = its source block value
        for di in range(f):
            for dj in range(f):
                assert ds.images[n, 0, i * f + di, j * f + dj].item() == pytest.approx(images[n, i, j] / 8 - 1)


@pytest.mark.parametrize("size", [16, 32])
def test_digits_upsampling_round_trip(sk_digits, size):
    images, _ = sk_digits
    up = build_dataset("digits", image_size=size, split="all").images
    down = F.avg_pool2d(up, size // 8)[:, 0]
    assert torch.allclose(down, torch.from_numpy(images).float() / 8 - 1, atol=1e-6)


def test_digits_split_is_fixed_and_stratified(sk_digits):
    _, target = sk_digits
    expected_test, seen = [], {}
    for i, c in enumerate(target):  # every fifth occurrence of each class is held out
        seen[c] = seen.get(c, 0) + 1
        if seen[c] % 5 == 0:
            expected_test.append(i)
    train = build_dataset("digits", image_size=8, split="train")
    test = build_dataset("digits", image_size=8, split="test")
    assert len(test) == len(expected_test) == 355 and len(train) == 1797 - 355
    assert np.array_equal(test.labels.numpy(), target[expected_test])
    images = torch.from_numpy(sk_digits[0]).float() / 8 - 1
    assert torch.equal(test.images[:, 0], images[expected_test])
    train_idx = sorted(set(range(1797)) - set(expected_test))
    assert torch.equal(train.images[:, 0], images[train_idx])
    assert np.bincount(test.labels.numpy()).min() >= 34


@pytest.mark.parametrize("options, fragment", [
    ({"image_size": 12}, "image_size"), ({"split": "val"}, "split"), ({"flip": True}, "no option 'flip'"),
])
def test_digits_bad_options(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_dataset("digits", **options)


def test_digits_info():
    ds = build_dataset("digits", image_size=32, split="test")
    assert ds.info == DataInfo(channels=1, height=32, width=32, num_classes=10, fields=("y",))
    assert data_info(ds) == ds.info and ds.info.sample_shape == tuple(ds[0]["x"].shape) == (1, 32, 32)
    assert ds.info.channel_dim == 1 and not ds.info.is_latent and ds.info.latent_scale is None


def test_unknown_dataset_name():
    with pytest.raises(UnknownNameError, match="digits"):
        build_dataset("digit")


# -- collate ------------------------------------------------------------------------------------------------------

def test_collate_stacks_images_video_and_keeps_text():
    batch = [{"x": torch.full((2, 1, 4, 4), float(i)), "y": torch.tensor(i), "text": f"t{i}", "w": 0.5 * i}
             for i in range(3)]
    out = collate(batch)
    assert out["x"].shape == (3, 2, 1, 4, 4) and out["x"][2].eq(2).all()
    assert out["y"].tolist() == [0, 1, 2] and out["y"].dtype == torch.int64
    assert out["text"] == ["t0", "t1", "t2"] and out["w"].tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ShapeError, match="'x'"):
        collate([{"x": torch.zeros(1, 4, 4)}, {"x": torch.zeros(1, 8, 8)}])
    with pytest.raises(DataError, match="different keys"):
        collate([{"x": torch.zeros(1)}, {"x": torch.zeros(1), "y": torch.tensor(1)}])


# -- image folder -------------------------------------------------------------------------------------------------

def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def halves_image():
    """64 wide x 32 high: left half red, right half blue."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:, 2] = 255
    return arr


def test_center_crop_on_halves_image(tmp_path):
    save(tmp_path / "cls" / "a.png", halves_image())
    ds = build_dataset("image-folder", root=tmp_path, image_size=16, flip=False)
    x = ds[0]["x"]
    # 64x32 -> BOX halving to 32x16 (short side 32 >= 2*16) -> no resize (short side 16) -> columns 8..23
    expected = -torch.ones(3, 16, 16)
    expected[0, :, :8] = 1.0
    expected[2, :, 8:] = 1.0
    assert x.shape == (3, 16, 16) and torch.equal(x, expected)


@pytest.mark.parametrize("width, height", [(45, 30), (49, 30), (30, 49)])
def test_center_crop_matches_stepwise_pil(tmp_path, width, height):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    save(tmp_path / "c" / "img.png", arr)
    # short side 30 >= 2*8: halve once (floor) to 15 < 16 and stop; then scale by 8/15 (rounded) and crop 8x8
    halved = (width // 2, height // 2)
    resized = (round(halved[0] * 8 / 15), round(halved[1] * 8 / 15))  # 22 -> 12, 24 -> 13 (12.8), 15 -> 8
    im = Image.fromarray(arr).resize(halved, Image.BOX).resize(resized, Image.BICUBIC)
    left, top = (resized[0] - 8) // 2, (resized[1] - 8) // 2  # 13 - 8 = 5 -> offset 2 (rounded down)
    expected = np.asarray(im)[top:top + 8, left:left + 8]
    x = build_dataset("image-folder", root=tmp_path, image_size=8, flip=False)[0]["x"]
    assert torch.allclose(x, torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)


def test_flip_is_random_half_and_seeded(tmp_path):
    save(tmp_path / "cls" / "a.png", halves_image())
    ds = build_dataset("image-folder", root=tmp_path, image_size=16)
    plain = build_dataset("image-folder", root=tmp_path, image_size=16, flip=False)[0]["x"]

    def draws():
        out = []
        for _ in range(200):
            x = ds[0]["x"]
            assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
            out.append(torch.equal(x, plain.flip(-1)))
        return out

    torch.manual_seed(3)
    first = draws()
    torch.manual_seed(3)
    assert draws() == first
    assert 70 <= sum(first) <= 130


def test_class_ids_follow_sorted_folder_names(tmp_path):
    for name, value in [("zebra", 10), ("ant", 200), ("moth", 90)]:
        save(tmp_path / name / "0.png", np.full((8, 8, 3), value))
    ds = build_dataset("image-folder", root=tmp_path, image_size=8, flip=False)
    assert ds.classes == ["ant", "moth", "zebra"] and ds.num_classes == 3
    by_label = {int(ds[i]["y"]): ds[i]["x"][0, 0, 0].item() for i in range(3)}
    assert by_label == pytest.approx({0: 200 / 127.5 - 1, 1: 90 / 127.5 - 1, 2: 10 / 127.5 - 1})


def test_grey_and_unconditional(tmp_path):
    save(tmp_path / "sub" / "0.png", np.full((8, 8, 3), 51))
    ds = build_dataset("image-folder", root=tmp_path, image_size=8, channels=1, unconditional=True, flip=False)
    item = ds[0]
    assert set(item) == {"x"} and ds.num_classes == 0 and item["x"].shape == (1, 8, 8)
    assert item["x"].eq(51 / 127.5 - 1).all()


def test_image_folder_info(tmp_path):
    for name in ("b", "a"):
        save(tmp_path / name / "0.png", np.zeros((12, 20, 3)))
    ds = build_dataset("image-folder", root=tmp_path, image_size=8)
    assert ds.info == DataInfo(channels=3, height=8, width=8, num_classes=2, fields=("y",))
    assert data_info(ds) == ds.info and ds.info.sample_shape == tuple(ds[0]["x"].shape)
    grey = build_dataset("image-folder", root=tmp_path, image_size=4, channels=1, unconditional=True)
    assert grey.info == DataInfo(channels=1, height=4, width=4) and grey.info.fields == ()
    assert (grey.channels, grey.image_size, grey.num_classes, grey.is_latent) == (1, 4, 0, False)


def make_folder(root, good: int, garbage: int = 0, truncated: int = 0):
    for i in range(good):
        save(root / "c" / f"good{i}.png", np.full((8, 8, 3), i))
    png = (root / "c" / "good0.png").read_bytes()
    for i in range(garbage):
        (root / "c" / f"bad{i}.png").write_bytes(b"not an image")
    for i in range(truncated):
        (root / "c" / f"trunc{i}.png").write_bytes(png[: len(png) // 2])


def test_corrupt_images_are_skipped_with_warning(tmp_path):
    make_folder(tmp_path, good=18, garbage=1, truncated=1)
    with pytest.warns(UserWarning, match="skipped 2 of 20 unreadable"):
        ds = build_dataset("image-folder", root=tmp_path, image_size=8)
    assert len(ds) == 18 and len(ds.corrupt) == 2
    assert all(p.name.startswith("good") for p in ds.files)


def test_corrupt_fraction_over_threshold_fails(tmp_path):
    make_folder(tmp_path, good=7, garbage=2, truncated=1)
    with pytest.raises(DataError, match=r"3 of 10 images .* unreadable \(30% > max_corrupt_fraction 10%\)"):
        build_dataset("image-folder", root=tmp_path, image_size=8)
    with pytest.warns(UserWarning, match="skipped 3 of 10"):
        assert len(build_dataset("image-folder", root=tmp_path, image_size=8, max_corrupt_fraction=0.5)) == 7


def test_corrupt_image_found_at_load_time(tmp_path):
    make_folder(tmp_path, good=9, garbage=1)
    ds = build_dataset("image-folder", root=tmp_path, image_size=8, flip=False, verify="none")
    bad = [p.name for p in ds.files].index("bad0.png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*bad0.png"):
        item = ds[bad]
    assert torch.equal(item["x"], ds.load(ds.files[(bad + 1) % len(ds)]))  # the next image stands in
    make_folder(tmp_path / "worse", good=3, garbage=2)
    ds = build_dataset("image-folder", root=tmp_path / "worse", image_size=8, verify="none")
    with pytest.raises(DataError, match="unreadable"), pytest.warns(UserWarning):
        for i in range(len(ds)):
            ds[i]


def test_missing_empty_and_flat_folders(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        build_dataset("image-folder", root=tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        build_dataset("image-folder", root=tmp_path / "empty")
    save(tmp_path / "flat" / "a.png", np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match="no class subfolders"):
        build_dataset("image-folder", root=tmp_path / "flat")


# -- latents ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from dtx.testing import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    """Five 16x16 RGB images in two classes; at image_size 16 the ADM crop leaves them untouched."""
    root = tmp_path_factory.mktemp("pixels")
    rng = np.random.default_rng(1)
    arrays = {}
    for name in ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]:
        arrays[name] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        save(root / name, arrays[name])
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays.values()])
    return root, x, torch.tensor([0, 0, 0, 1, 1])


def extract(capsys, vae_path, data, out, *extra):
    code = main(["extract-latents", "--vae", str(vae_path), "--data", str(data), "--out", str(out),
                 "--image-size", "16", "--batch-size", "2", "--shard-size", "3", "--device", "cpu",
                 "--no-progress", *extra])
    return code, *capsys.readouterr()


@pytest.mark.slow
def test_extract_latents_round_trip(tiny_vae, pixel_folder, tmp_path, capsys):
    vae, vae_path = tiny_vae
    root, x, y = pixel_folder
    code, out, err = extract(capsys, vae_path, root, tmp_path / "lat", "--flips")
    assert code == 0, err
    assert "wrote 5 latents in 2 shard(s)" in out and "scale_factor 0.5" in out
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode() * 0.5
        expected_flip = vae.encode(x.flip(-1)).latent_dist.mode() * 0.5
    shards = sorted((tmp_path / "lat").glob("*.safetensors"))
    assert [p.name for p in shards] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not list((tmp_path / "lat").glob(".*tmp"))
    got, got_flip, labels = [], [], []
    for p in shards:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
            got.append(f.get_tensor("latents"))
            got_flip.append(f.get_tensor("latents_flipped"))
            labels.append(f.get_tensor("labels"))
    assert json.loads(meta["scale_factor"]) == 0.5 and json.loads(meta["image_size"]) == 16
    assert json.loads(meta["classes"]) == ["cat", "dog"] and meta["posterior"] == "mode"
    assert meta["source"] == str(root.resolve()) and meta["vae"] == str(vae_path.resolve())
    assert torch.cat(got).shape == (5, 4, 8, 8) and labels[0].dtype == torch.int64
    assert torch.allclose(torch.cat(got), expected, atol=1e-5)
    assert torch.allclose(torch.cat(got_flip), expected_flip, atol=1e-5)
    assert torch.equal(torch.cat(labels), y)

    ds = build_dataset("latent-folder", root=tmp_path / "lat", flip=False)
    assert ds.is_latent and ds.latent_scale == 0.5 and ds.num_classes == 2
    assert (len(ds), ds.channels, ds.image_size, ds.pixel_size) == (5, 4, 8, 16) and ds.frames is None
    assert ds.info == DataInfo(channels=4, height=8, width=8, num_classes=2, is_latent=True, latent_scale=0.5,
                               latent_shift=0.0, vae=str(vae_path.resolve()), vae_downsample=2, fields=("y",))
    assert data_info(ds) == ds.info and ds.info.sample_shape == (4, 8, 8)
    batch = collate([ds[i] for i in range(5)])
    assert torch.allclose(batch["x"], expected, atol=1e-5) and torch.equal(batch["y"], y)
    flipping = build_dataset("latent-folder", root=tmp_path / "lat")
    torch.manual_seed(0)
    picks = [torch.allclose(flipping[4]["x"], expected_flip[4], atol=1e-5) for _ in range(40)]
    assert 5 <= sum(picks) <= 35


def test_extract_latents_resume_and_conflicts(tiny_vae, pixel_folder, tmp_path, capsys):
    _, vae_path = tiny_vae
    root, _, _ = pixel_folder
    assert extract(capsys, vae_path, root, tmp_path / "lat")[0] == 0
    first = tmp_path / "lat" / "shard_00000.safetensors"
    second = tmp_path / "lat" / "shard_00001.safetensors"
    stamp = first.stat().st_mtime_ns
    second.unlink()  # an interrupted run: only the first shard was written
    assert extract(capsys, vae_path, root, tmp_path / "lat")[0] == 0
    assert first.stat().st_mtime_ns == stamp and second.exists()
    code, _, err = extract(capsys, vae_path, root, tmp_path / "lat", "--sample-posterior")
    assert_one_line_error(code, err, "different posterior")


@pytest.mark.slow
def test_sample_posterior_is_seeded(tiny_vae, pixel_folder, tmp_path, capsys):
    vae, vae_path = tiny_vae
    root, x, _ = pixel_folder
    for out in ("a", "b"):
        assert extract(capsys, vae_path, root, tmp_path / out, "--sample-posterior", "--seed", "7")[0] == 0
    a = build_dataset("latent-folder", root=tmp_path / "a")
    b = build_dataset("latent-folder", root=tmp_path / "b")
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    for i in range(5):
        assert torch.equal(a[i]["x"], b[i]["x"])
        z = a[i]["x"] / 0.5
        assert not torch.allclose(z, dist.mode()[i], atol=1e-4)
        assert (((z - dist.mean[i]) / dist.std[i]).abs() < 6).all()  # a draw from N(mean, std)


def test_extract_latents_refuses_non_local_vae(pixel_folder, tmp_path, capsys):
    root, _, _ = pixel_folder
    code, _, err = extract(capsys, "stabilityai/sd-vae-ft-ema", root, tmp_path / "o")
    assert_one_line_error(code, err, "not a local folder", "not downloaded")
    (tmp_path / "novae").mkdir()
    code, _, err = extract(capsys, tmp_path / "novae", root, tmp_path / "o")
    assert_one_line_error(code, err, "no config.json")
    code, _, err = extract(capsys, tmp_path / "novae", tmp_path / "missing", tmp_path / "o")
    assert_one_line_error(code, err, "image folder not found", "missing")


def test_latent_folder_errors(tmp_path):
    with pytest.raises(DataError, match="latent folder not found"):
        build_dataset("latent-folder", root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no latent shards"):
        build_dataset("latent-folder", root=tmp_path / "empty")
    from safetensors.torch import save_file

    (tmp_path / "foreign").mkdir()
    save_file({"latents": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "foreign" / "shard_00000.safetensors"))
    with pytest.raises(DataError, match="not a dtx latent shard"):
        build_dataset("latent-folder", root=tmp_path / "foreign")


def test_latent_dataset_pickles_for_workers(tiny_vae, pixel_folder, tmp_path, capsys):
    import pickle

    _, vae_path = tiny_vae
    root, _, _ = pixel_folder
    assert extract(capsys, vae_path, root, tmp_path / "lat")[0] == 0
    ds = build_dataset("latent-folder", root=tmp_path / "lat")
    before = ds[3]["x"]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["x"], before) and os.path.samefile(clone.shards[0], ds.shards[0])
