"""Evaluation: Fréchet distance vs closed forms, the shipped digits classifier on real and noise images, FID plumbing
with a stand-in torchmetrics, ``dtx eval`` on archives built from real digits, and the per-frame scoring of videos of
one moving digit (``frame_consistency``, ``dtx eval`` on NFHWC archives)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dtx.cli import main
from dtx.errors import DataError, ShapeError
from dtx.evaluation import fid
from dtx.evaluation.digits import (WEIGHTS, DigitsClassifier, digits_accuracy, digits_features, frame_consistency,
                                   locate_digits, train_digits_classifier)
from dtx.evaluation.frechet import frechet_distance, frechet_distance_from_stats


@pytest.fixture(scope="module")
def test_digits():
    """The held-out split, rebuilt here from scikit-learn: every fifth occurrence of each class, as [N, 1, 8, 8]."""
    d = load_digits()
    seen: dict[int, int] = {}
    idx = []
    for i, c in enumerate(d.target):
        seen[c] = seen.get(c, 0) + 1
        if seen[c] % 5 == 0:
            idx.append(i)
    x = torch.from_numpy(d.images[idx]).float().unsqueeze(1) / 8 - 1
    return x, torch.from_numpy(d.target[idx])


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dtx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- Fréchet distance ---------------------------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)  # = 7.25 + 4 + 1 + 0
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_a, np.diag(var_a)) == pytest.approx(0, abs=1e-10)


def test_frechet_general_covariances_vs_eigenvalues():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    sa, sb = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    # tr((Sa Sb)^1/2) = sum of square roots of the (real, positive) eigenvalues of Sa Sb
    tr_sqrt = np.sqrt(np.linalg.eigvals(sa @ sb).real).sum()
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt
    assert frechet_distance_from_stats(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-8)


def test_frechet_from_samples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=gen)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    y = 2 * torch.randn(400, 3, generator=gen) + torch.tensor([1.0, 0.0, -1.0])
    # 1-D check of the sample statistics: FD = (m_a - m_b)^2 + (s_a - s_b)^2 with unbiased standard deviations
    a1, b1 = x[:, :1].double(), y[:, :1].double()
    expected = (a1.mean() - b1.mean()) ** 2 + (a1.std() - b1.std()) ** 2
    assert frechet_distance(a1, b1) == pytest.approx(expected.item(), rel=1e-9)
    assert frechet_distance(x, y) == pytest.approx(2 + 3 * (1 + 4 - 2 * 2), abs=1.0)  # population value 5


def test_frechet_singular_and_bad_shapes():
    gen = torch.Generator().manual_seed(1)
    few_a, few_b = torch.randn(5, 16, generator=gen), torch.randn(6, 16, generator=gen)
    assert np.isfinite(frechet_distance(few_a, few_b))
    with pytest.raises(ShapeError):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ShapeError):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


# -- digits classifier --------------------------------------------------------------------------------------------

def test_shipped_weights_are_package_data():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 512 * 1024
    pyproject = (WEIGHTS.parents[3].parent / "pyproject.toml").read_text()
    assert "evaluation/weights/*.safetensors" in pyproject


def test_classifier_accuracy_on_held_out_digits(test_digits):
    x, y = test_digits
    acc = digits_accuracy(x, y)
    assert acc >= 0.97
    for size in (16, 32):  # nearest upsampling (and 3 identical channels) must not change a single prediction
        up = x.repeat_interleave(size // 8, -1).repeat_interleave(size // 8, -2)
        assert digits_accuracy(up, y) == acc
        assert digits_accuracy(up.expand(-1, 3, -1, -1), y) == acc


def test_inputs_are_area_downsampled_to_8x8():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = torch.zeros(3, 1, 8, 8)
    for i in range(8):
        for j in range(8):
            expected[:, 0, i, j] = x[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(dim=(-1, -2))
    assert torch.allclose(DigitsClassifier.to_8x8(x), expected, atol=1e-6)
    rgb = torch.stack([x[:, 0], -x[:, 0], x[:, 0]], 1)  # grey = channel mean
    assert torch.allclose(DigitsClassifier.to_8x8(rgb), expected / 3, atol=1e-6)


def test_classifier_on_noise_is_near_chance():
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 1, 16, 16, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (2000,), generator=gen)
    assert digits_accuracy(noise, labels) < 0.2


def test_features_and_input_checks(test_digits):
    x, y = test_digits
    feats = digits_features(x)
    assert feats.shape == (len(x), 64)
    assert np.linalg.matrix_rank(np.cov(feats.numpy(), rowvar=False)) == 64
    model = DigitsClassifier.load()
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), model.fc2(F.relu(feats)).argmax(1))
    with pytest.raises(ShapeError):
        digits_accuracy(torch.zeros(4, 1, 12, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError):
        digits_accuracy(x[:3], y[:4])


@pytest.mark.slow
def test_training_regenerates_an_equivalent_classifier(test_digits):
    x, y = test_digits
    model = train_digits_classifier(seed=0)
    assert digits_accuracy(x, y, model) >= 0.97
    with torch.no_grad():
        agree = (model(x).argmax(1) == DigitsClassifier.load()(x).argmax(1)).float().mean().item()
    assert agree >= 0.98


# -- FID ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_torchmetrics(monkeypatch):
    """A stand-in ``torchmetrics`` (and ``torch_fidelity``) whose FID records what it is given."""
    calls: dict = {"updates": []}

    class FakeFID(torch.nn.Module):
        def __init__(self, feature=2048, feature_extractor_weights_path=None):
            super().__init__()
            calls["weights"] = feature_extractor_weights_path

        def update(self, imgs, real):
            calls["updates"].append((imgs.dtype, tuple(imgs.shape), real))

        def compute(self):
            return torch.tensor(1.5)

    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid", "torch_fidelity"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["torchmetrics.image.fid"].FrechetInceptionDistance = FakeFID
    return calls


def test_fid_skips_without_torchmetrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    assert "torchmetrics is not installed" in fid.fid_unavailable_reason("/some/weights.pth")
    with pytest.raises(DataError, match="FID unavailable: torchmetrics is not installed"):
        fid.compute_fid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_fid_needs_local_weights(fake_torchmetrics, monkeypatch, tmp_path):
    monkeypatch.delenv(fid.ENV, raising=False)
    assert "no local Inception weights" in fid.fid_unavailable_reason()
    assert "not found" in fid.fid_unavailable_reason(tmp_path / "missing.pth")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    monkeypatch.setenv(fid.ENV, str(weights))
    assert fid.fid_unavailable_reason() is None
    real = torch.zeros(5, 1, 8, 8, dtype=torch.uint8)
    fake = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    assert fid.compute_fid(real, fake, batch_size=2) == 1.5
    assert fake_torchmetrics["weights"] == str(weights)
    assert fake_torchmetrics["updates"] == [(torch.uint8, (2, 3, 8, 8), True), (torch.uint8, (2, 3, 8, 8), True),
                                            (torch.uint8, (1, 3, 8, 8), True), (torch.uint8, (2, 3, 8, 8), False),
                                            (torch.uint8, (1, 3, 8, 8), False)]
    with pytest.raises(ShapeError):
        fid.compute_fid(real.float(), fake)


# -- dtx eval -----------------------------------------------------------------------------------------------------

def write_archive(path, x, labels=None):
    """x in [-1, 1] [N, 1, S, S] -> uint8 NHWC as `dtx sample` writes it (clamp(127.5 x + 128, 0, 255))."""
    arr = np.clip(np.floor(127.5 * x.numpy() + 128), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    arrays = {"arr_0": arr} if labels is None else {"arr_0": arr, "labels": np.asarray(labels, np.int64)}
    np.savez(path, **arrays)
    return path


def run_eval(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_on_real_digits_and_shuffled_labels(test_digits, tmp_path, capsys):
    x, y = test_digits
    x16 = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    real = write_archive(tmp_path / "real.npz", x16, y)
    code, out, err = run_eval(capsys, str(real), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["num_samples"] == len(y) and res["image_shape"] == [1, 16, 16]
    assert abs(res["accuracy"] - res["classifier_test_accuracy"]) <= 0.01 and res["accuracy"] >= 0.97
    assert res["fd_reference"] == "digits/train" and res["fid"] is None and res["fid_skipped"]
    assert res["fd_digits"] == pytest.approx(res["fd_real_test_baseline"], rel=0.1)

    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    code, out, _ = run_eval(capsys, str(write_archive(tmp_path / "shuffled.npz", x16, shuffled)), "--json")
    assert code == 0 and json.loads(out)["accuracy"] < 0.25

    noise = torch.rand(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    code, out, _ = run_eval(capsys, str(write_archive(tmp_path / "noise.npz", noise, y)), "--json")
    assert code == 0 and json.loads(out)["fd_digits"] > 10 * res["fd_digits"]

    code, out, _ = run_eval(capsys, str(real))
    assert code == 0 and out.splitlines()[1].startswith("accuracy   0.9") and "fid        skipped:" in out


def test_eval_picks_newest_archive_in_run_folder(test_digits, tmp_path, capsys):
    x, y = test_digits
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    old = write_archive(run / "samples" / "step_00000100.npz", x[:20], y[:20])
    new = write_archive(run / "samples" / "step_00000200.npz", x[:30], y[:30])
    ckpt = write_archive(run / "checkpoints" / "stray.npz", x[:40], y[:40])
    os.utime(old, (1000, 1000))
    os.utime(new, (2000, 2000))
    os.utime(ckpt, (3000, 3000))
    code, out, err = run_eval(capsys, str(run), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["path"] == str(new) and res["num_samples"] == 30


def test_eval_without_labels(test_digits, tmp_path, capsys):
    x, _ = test_digits
    code, out, _ = run_eval(capsys, str(write_archive(tmp_path / "u.npz", x[:50])), "--json")
    res = json.loads(out)
    assert code == 0 and res["accuracy"] is None and res["fd_digits"] > 0


def test_eval_one_line_errors(test_digits, tmp_path, capsys):
    x, y = test_digits
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "missing.npz"))[::2], "no such sample archive")
    (tmp_path / "empty_run").mkdir()
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "empty_run"))[::2], "no .npz sample archive")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "junk.npz"))[::2], "cannot read sample archive")
    np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "noarr.npz"))[::2], "no 'arr_0'", "images")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 1), np.float32))
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "float.npz"))[::2], "uint8 NHWC")
    np.savez(tmp_path / "odd.npz", arr_0=np.zeros((2, 12, 12, 1), np.uint8))
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "odd.npz"))[::2], "multiple of 8", "12x12")
    write_archive(tmp_path / "badlab.npz", x[:4], [0, 1, 2, 10])
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "badlab.npz"))[::2], "0..9")
    write_archive(tmp_path / "short.npz", x[:4], [0, 1])
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "short.npz"))[::2], "labels must be integers [N=4]")


# -- videos of one moving digit -------------------------------------------------------------------------------------

def moving_clips(x8: torch.Tensor, frames: int = 8):
    """Each 8x8 digit upscaled 2x and moved in a straight line over a black 32x32 canvas (as Latte's moving-digits
    draws them, without bounces): videos [N, F, 1, 32, 32] in [-1, 1] and each frame's top-left corner [N, F, 2]."""
    n = len(x8)
    sprites = x8.repeat_interleave(2, -1).repeat_interleave(2, -2)
    i = torch.arange(n)
    start = torch.stack([i % 3, (i // 3) % 3], 1)
    velocity = torch.stack([1 + i % 2, 1 + (i // 2) % 2], 1) * torch.where(i % 4 < 2, 1, -1)[:, None]
    start = torch.where(velocity < 0, 16 - start, start)
    corners = start[:, None] + torch.arange(frames)[None, :, None] * velocity[:, None]
    videos = torch.full((n, frames, 1, 32, 32), -1.0)
    for k in range(n):
        for f in range(frames):
            r, c = corners[k, f].tolist()
            videos[k, f, :, r:r + 16, c:c + 16] = sprites[k]
    return videos, corners


@pytest.fixture(scope="module")
def test_clips(test_digits):
    x, y = test_digits
    videos, corners = moving_clips(x)
    return videos, y, corners


def test_locate_digits_finds_the_upscaled_digit(test_clips):
    videos, y, corners = test_clips
    frames = videos[:, :, 0].flatten(0, 1)
    centroid, origin = locate_digits(frames)
    diff = origin - corners.flatten(0, 1)
    assert (diff == 0).all(1).float().mean() >= 0.85  # mostly the sprite itself (left-right by the digit's mass)
    assert (diff[:, 0] == 0).float().mean() >= 0.99 and diff.abs().max() <= 2  # digits fill their box vertically
    assert (diff.remainder(2) == 0).all(1).float().mean() >= 0.99  # on the sprite's 2x2 grid: no block is split
    # the centroid moves exactly with the digit
    shift = centroid.view(len(y), -1, 2) - centroid.view(len(y), -1, 2)[:, :1]
    assert torch.allclose(shift, (corners - corners[:, :1]).float(), atol=1e-4)
    blank = torch.full((2, 32, 32), -1.0)
    centroid, origin = locate_digits(blank)
    assert centroid.tolist() == [[15.5, 15.5]] * 2 and origin.tolist() == [[8, 8]] * 2
    corner = torch.full((1, 32, 32), -1.0)
    corner[0, 30:, 30:] = 1.0  # a digit at the edge: the window is clamped to the frame
    assert locate_digits(corner)[1].tolist() == [[16, 16]]


def test_frame_consistency_of_real_frozen_and_mislabelled_clips(test_clips):
    videos, y, _ = test_clips
    real = frame_consistency(videos, y)
    assert real["num_videos"] == len(y) and real["frames"] == 8
    assert real["frame_consistency"] >= 0.95 and real["clip_consistency"] >= 0.95 and real["label_agreement"] >= 0.99
    assert real["moving"] == 1.0 and real["mean_displacement_px"] >= 7 * 2 ** 0.5 - 1e-4
    rgb = frame_consistency(videos.expand(-1, -1, 3, -1, -1), y)
    assert rgb["frame_consistency"] == real["frame_consistency"]
    frozen = frame_consistency(videos[:, 3:4].expand(-1, 8, -1, -1, -1), y)
    assert frozen["moving"] == 0.0 and frozen["mean_displacement_px"] == 0.0
    assert frozen["label_agreement"] >= 0.99  # a frame counts only when classified with probability >= 0.5
    wrong = frame_consistency(videos, (y + 1) % 10)
    assert wrong["frame_consistency"] < 0.1 and wrong["clip_consistency"] < 0.1
    unlabelled = frame_consistency(videos[:10])
    assert unlabelled["frame_consistency"] is None and unlabelled["clip_consistency"] is None
    assert unlabelled["moving"] == 1.0
    with pytest.raises(ShapeError):
        frame_consistency(videos[0], y[:1])  # not batch-first
    with pytest.raises(ShapeError):
        frame_consistency(torch.zeros(2, 4, 1, 8, 8), torch.zeros(2))  # smaller than the 16x16 crop
    with pytest.raises(ShapeError):
        frame_consistency(videos[:3], y[:4])


def test_eval_on_video_archives(test_clips, tmp_path, capsys):
    from dtx.writers import save_npz

    videos, y, _ = test_clips
    real = save_npz(videos, tmp_path / "real.npz", labels=y, channel_dim=2)  # NFHWC, as `dtx sample` writes
    code, out, err = run_eval(capsys, str(real), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "videos" and res["num_samples"] == len(y) and res["video_shape"] == [8, 1, 32, 32]
    assert res["frame_consistency"] >= 0.95 and res["accuracy"] == res["frame_consistency"]
    assert res["clip_consistency"] >= 0.95 and res["moving"] == 1.0
    assert res["fd_digits"] < 3 * res["fd_real_test_baseline"] + 1 and res["fid"] is None and res["fid_skipped"]

    frozen = save_npz(videos[:, :1].expand(-1, 8, -1, -1, -1), tmp_path / "frozen.npz", labels=y, channel_dim=2)
    code, out, _ = run_eval(capsys, str(frozen), "--json")
    assert code == 0 and json.loads(out)["moving"] == 0.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    code, out, _ = run_eval(capsys, str(save_npz(videos, tmp_path / "s.npz", labels=shuffled, channel_dim=2)), "--json")
    assert code == 0 and json.loads(out)["frame_consistency"] < 0.25

    code, out, err = run_eval(capsys, str(real))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("samples ") and f"({len(y)} videos, 8 frames of 1x32x32)" in lines[0]
    assert lines[1].startswith("frame_consistency  0.9") and lines[2].startswith("clip_consistency   0.9")
    assert any(line.startswith("moving             1.0000") for line in lines), out

    code, out, _ = run_eval(capsys, str(save_npz(videos[:5], tmp_path / "u.npz", channel_dim=2)))
    assert code == 0 and "frame_consistency  n/a (archive has no labels)" in out

    small = save_npz(torch.zeros(2, 4, 1, 8, 8), tmp_path / "small.npz", labels=[0, 1], channel_dim=2)
    assert_one_line_error(*run_eval(capsys, str(small))[::2], "16x16", "8x8")
    save_npz(videos[:4], tmp_path / "badlab.npz", labels=[0, 1, 2, 10], channel_dim=2)
    assert_one_line_error(*run_eval(capsys, str(tmp_path / "badlab.npz"))[::2], "0..9")
