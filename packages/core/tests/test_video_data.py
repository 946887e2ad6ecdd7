"""Video data: per-frame VAE coding of [B, F, C, H, W] clips, the video-folder dataset on hand-made GIF, MP4 and
frame-folder clips, and ``extract-latents --frames`` shards read back by latent-folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dtx.cli import main
from dtx.data import DataInfo, build_dataset, collate, data_info
from dtx.data.vae import decode, encode, info_after_vae, load_vae, vae_downsample, vae_factors
from dtx.data.videos import VideoFolderDataset
from dtx.errors import ConfigError, DataError, ShapeError


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from dtx.testing import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


# -- VAE coding ---------------------------------------------------------------------------------------------------

def test_video_encode_decode_match_per_frame(tiny_vae):
    vae, _ = tiny_vae
    torch.manual_seed(1)
    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    z = encode(vae, x)
    assert z.shape == (2, 3, 4, 8, 8) and z.dtype == torch.float32
    out = decode(vae, z)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.abs().max() <= 1
    with torch.no_grad():
        for b in range(2):
            for f in range(3):
                expected = vae.encode(x[b, f][None]).latent_dist.mode()[0] * 0.5
                assert torch.allclose(z[b, f], expected, atol=1e-5)
                assert torch.allclose(z[b, f], encode(vae, x[b, f][None])[0], atol=1e-5)
                pixels = vae.decode(z[b, f][None] / 0.5).sample[0].clamp(-1, 1)
                assert torch.allclose(out[b, f], pixels, atol=1e-5)
                assert torch.allclose(out[b, f], decode(vae, z[b, f][None])[0], atol=1e-5)


def test_video_coding_runs_in_chunks_of_32_frames(tiny_vae, monkeypatch):
    vae, _ = tiny_vae
    sizes = []
    real_encode, real_decode = vae.encode, vae.decode
    monkeypatch.setattr(vae, "encode", lambda x: sizes.append(("e", len(x))) or real_encode(x))
    monkeypatch.setattr(vae, "decode", lambda z: sizes.append(("d", len(z))) or real_decode(z))
    z = encode(vae, torch.zeros(2, 20, 3, 8, 8))
    decode(vae, z)
    assert sizes == [("e", 32), ("e", 8), ("d", 32), ("d", 8)] and z.shape == (2, 20, 4, 4, 4)
    sizes.clear()
    encode(vae, torch.zeros(40, 3, 8, 8))  # images keep one call per batch, as before
    assert sizes == [("e", 40)]
    with pytest.raises(ShapeError, match=r"\[B, F, C, H, W\]"):
        encode(vae, torch.zeros(3, 8, 8))


class StubVAE:
    """Encoder = first two channels as the posterior mode; decoder = identity."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=2.0, shift_factor=0.5, block_out_channels=(4, 4, 4, 4),
                             latent_channels=2, in_channels=3)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x[:, :2]))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_scale_and_shift_formulas():
    stub = StubVAE()
    x = torch.linspace(-1, 1, 2 * 2 * 3 * 2 * 2).reshape(2, 2, 3, 2, 2)
    z = encode(stub, x)
    assert torch.allclose(z, (x[:, :, :2] - 0.5) * 2.0)
    assert torch.allclose(decode(stub, torch.tensor([[[[-10.0, 0.0, 1.0, 10.0]]]])),
                          torch.tensor([[[[-1.0, 0.5, 1.0, 1.0]]]]))
    assert vae_factors(stub) == (2.0, 0.5) and vae_downsample(stub) == 8


def test_vae_downsample_and_info_after_vae(tiny_vae):
    vae, path = tiny_vae
    loaded = load_vae(path)
    assert vae_downsample(loaded) == 2 and vae_factors(loaded) == (0.5, 0.0)
    pixels = DataInfo(channels=3, height=16, width=16, frames=5, num_classes=2, fields=("y",))
    info = info_after_vae(pixels, loaded, str(path))
    assert info == DataInfo(channels=4, height=8, width=8, frames=5, num_classes=2, is_latent=True,
                            latent_scale=0.5, latent_shift=0.0, vae=str(path), vae_downsample=2, fields=("y",))
    assert info.sample_shape == (5, 4, 8, 8)
    with pytest.raises(ConfigError, match="already VAE latents"):
        info_after_vae(info, loaded, str(path))
    with pytest.raises(ConfigError, match="1 channel"):
        info_after_vae(DataInfo(channels=1, height=16, width=16), loaded, str(path))
    from dtx.data import extract

    assert extract.load_vae is load_vae and extract.encode is encode and extract.vae_factors is vae_factors


# -- video folder -------------------------------------------------------------------------------------------------

def gif_frames():
    """Six 16x16 black frames; frame k has its 2k leftmost columns white (a two-colour palette: lossless)."""
    frames = np.zeros((6, 16, 16), np.uint8)
    for k in range(6):
        frames[k, :, :2 * k] = 255
    return frames


def write_gif(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


MP4_LEVELS = [20, 60, 100, 140, 180, 220]  # constant grey frames


def write_mp4(path):
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([np.full((16, 16, 3), v, np.uint8) for v in MP4_LEVELS])
    iio.imwrite(path, frames, fps=8)


FRAME_LEVELS = [5, 50, 95, 140, 185, 230, 250]  # frame-folder frames, solid colours (R = level, G = 255 - level)


def write_frame_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for k, v in reversed(list(enumerate(FRAME_LEVELS))):  # written out of order: the name decides
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[..., 0], arr[..., 1] = v, 255 - v
        Image.fromarray(arr).save(folder / f"frame_{k:03d}.png")


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_gif(root / "cats" / "a.gif", gif_frames())
    write_mp4(root / "cats" / "b.mp4")
    write_frame_folder(root / "dogs" / "c")
    return root


def px(v):
    return v / 127.5 - 1


def test_video_folder_items(video_root):
    ds = VideoFolderDataset(video_root, image_size=16, frames=3, frame_interval=2)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2 and len(ds) == 3
    assert [c.name for c in ds.clips] == ["a.gif", "b.mp4", "c"] and ds.labels == [0, 0, 1]
    items = [ds[i] for i in range(3)]
    for item, y in zip(items, [0, 0, 1]):
        assert set(item) == {"x", "y"} and item["x"].shape == (3, 3, 16, 16) and item["x"].dtype == torch.float32
        assert item["y"].dtype == torch.int64 and int(item["y"]) == y
    gif = items[0]["x"]
    for i, k in enumerate([0, 2, 4]):  # frames 0, 2, 4: 0, 4 and 8 white columns, exactly
        expected = -torch.ones(3, 16, 16)
        expected[:, :, :2 * k] = 1.0
        assert torch.equal(gif[i], expected), k
    for i, k in enumerate([0, 2, 4]):  # H.264 is lossy: a few grey levels off
        assert (items[1]["x"][i] - px(MP4_LEVELS[k])).abs().max() < 0.05
    for i, k in enumerate([0, 2, 4]):
        v = FRAME_LEVELS[k]
        assert torch.allclose(items[2]["x"][i, 0], torch.full((16, 16), px(v)))
        assert torch.allclose(items[2]["x"][i, 1], torch.full((16, 16), px(255 - v)))
        assert items[2]["x"][i, 2].eq(-1).all()
    batch = collate(items)
    assert batch["x"].shape == (3, 3, 3, 16, 16)
    assert ds.info == DataInfo(channels=3, height=16, width=16, frames=3, num_classes=2, fields=("y",))
    assert data_info(ds) is not None and data_info(ds).sample_shape == (3, 3, 16, 16)


def test_video_folder_crop_grey_and_flat(tmp_path):
    write_gif(tmp_path / "a.gif", np.repeat(np.repeat(gif_frames(), 2, axis=1), 2, axis=2))  # 32x32, flat layout
    write_frame_folder(tmp_path / "clip")
    ds = VideoFolderDataset(tmp_path, image_size=8, frames=2, channels=1)
    assert ds.num_classes == 0 and len(ds) == 2 and ds.info.fields == () and ds.info.frames == 2
    item = ds[0]
    assert set(item) == {"x"} and item["x"].shape == (2, 1, 8, 8)
    # 32x32 -> BOX halving twice to 8x8 (each 4x4 block is uniform): frame 1 has its first column white
    expected = -torch.ones(8, 8)
    expected[:, 0] = 1.0
    assert item["x"][0].eq(-1).all() and torch.equal(item["x"][1, 0], expected)
    grey = ds[1]["x"]  # L = (299 R + 587 G + 114 B) / 1000 of the solid frames 0 and 1
    for i, v in enumerate(FRAME_LEVELS[:2]):
        level = (v * 299 + (255 - v) * 587 + 500) // 1000
        assert (grey[i] - px(level)).abs().max() < 1.5 / 127.5
    flipping = VideoFolderDataset(tmp_path, image_size=8, frames=2, flip=True)
    torch.manual_seed(0)
    plain = VideoFolderDataset(tmp_path, image_size=8, frames=2)[0]["x"]
    picks = [torch.equal(flipping[0]["x"], plain.flip(-1)) for _ in range(20)]
    assert 0 < sum(picks) < 20


def test_video_folder_errors(video_root, tmp_path):
    with pytest.raises(DataError, match="video folder not found"):
        VideoFolderDataset(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no videos"):
        VideoFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match=r"clip .*c has 7 frame\(s\); frames=4 with frame_interval=3 needs 10"):
        VideoFolderDataset(video_root, image_size=16, frames=4, frame_interval=3)  # frame folders: at scan time
    ds = VideoFolderDataset(video_root, image_size=16, frames=7)
    with pytest.raises(DataError, match=r"a.gif has 6 frame\(s\)"):
        ds[0]  # video files: when decoded
    assert ds[2]["x"].shape == (7, 3, 16, 16)
    write_gif(tmp_path / "mixed" / "top.gif", gif_frames())
    write_frame_folder(tmp_path / "mixed" / "cls" / "clip")
    with pytest.raises(DataError, match="top level"):
        VideoFolderDataset(tmp_path / "mixed", image_size=16, frames=2)
    assert len(VideoFolderDataset(tmp_path / "mixed", image_size=16, frames=2, unconditional=True)) == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match=r"1 of 1 clips in .*broken are unreadable \(none is readable\); first: .*x"):
        VideoFolderDataset(tmp_path / "broken", image_size=16, frames=2)  # found when scanned (skipped if others load)
    for options, name in [({"frames": 0}, "frames"), ({"frame_interval": 1.5}, "frame_interval"),
                          ({"channels": 4}, "channels")]:
        with pytest.raises(ConfigError, match=name):
            VideoFolderDataset(video_root, **options)


# -- extract-latents --frames ---------------------------------------------------------------------------------------

def extract(capsys, vae_path, data, out, *extra):
    code = main(["extract-latents", "--vae", str(vae_path), "--data", str(data), "--out", str(out),
                 "--image-size", "16", "--batch-size", "2", "--shard-size", "2", "--device", "cpu",
                 "--no-progress", *extra])
    return code, *capsys.readouterr()


def test_extract_video_latents_round_trip(tiny_vae, video_root, tmp_path, capsys):
    vae, vae_path = tiny_vae
    code, out, err = extract(capsys, vae_path, video_root, tmp_path / "lat", "--frames", "3", "--frame-interval", "2",
                             "--flips")
    assert code == 0, err
    assert "wrote 3 3-frame clip latents in 2 shard(s)" in out
    pixels = VideoFolderDataset(video_root, image_size=16, frames=3, frame_interval=2)
    with torch.no_grad():  # each clip's frames as one batch of images through the VAE
        expected = torch.stack([vae.encode(pixels[i]["x"]).latent_dist.mode() * 0.5 for i in range(3)])
        expected_flip = torch.stack([vae.encode(pixels[i]["x"].flip(-1)).latent_dist.mode() * 0.5 for i in range(3)])
    shards = sorted((tmp_path / "lat").glob("*.safetensors"))
    got, labels = [], []
    for p in shards:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
            got.append(f.get_tensor("latents"))
            labels.append(f.get_tensor("labels"))
    assert json.loads(meta["frames"]) == 3 and json.loads(meta["frame_interval"]) == 2
    assert torch.cat(got).shape == (3, 3, 4, 8, 8) and torch.allclose(torch.cat(got), expected, atol=1e-5)
    assert torch.cat(labels).tolist() == [0, 0, 1]

    ds = build_dataset("latent-folder", root=tmp_path / "lat", flip=False)
    assert ds.frames == 3 and (len(ds), ds.channels, ds.image_size, ds.pixel_size) == (3, 4, 8, 16)
    assert ds.info == DataInfo(channels=4, height=8, width=8, frames=3, num_classes=2, is_latent=True,
                               latent_scale=0.5, latent_shift=0.0, vae=str(vae_path.resolve()), vae_downsample=2,
                               fields=("y",))
    batch = collate([ds[i] for i in range(3)])
    assert batch["x"].shape == (3, 3, 4, 8, 8) and torch.allclose(batch["x"], expected, atol=1e-5)
    assert batch["y"].tolist() == [0, 0, 1]
    flipping = build_dataset("latent-folder", root=tmp_path / "lat")
    assert any(torch.allclose(flipping[2]["x"], expected_flip[2], atol=1e-5) for _ in range(30))

    code, _, err = extract(capsys, vae_path, video_root, tmp_path / "lat", "--frames", "2", "--flips")
    assert code == 2 and "different frames, frame_interval" in err
    code, _, err = extract(capsys, vae_path, video_root, tmp_path / "other", "--frame-interval", "2")
    assert code == 2 and "--frame-interval needs --frames" in err
