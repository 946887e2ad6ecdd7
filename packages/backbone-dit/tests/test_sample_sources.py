"""`dtx sample` reads every kind of source: a dtx model folder (no training run) and an official DiT `.pt`, whose
latent samples are decoded through a local VAE (a tiny random AutoencoderKL saved to a temp dir)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dtx
from dtx.cli import main

TINY = dict(depth=1, hidden_size=64, num_heads=1, patch_size=2, input_size=8)  # head dim 64: inferable


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_a_dtx_model_folder(tmp_path, capsys):
    torch.manual_seed(0)
    model = dtx.create_model("DiT", in_channels=3, num_classes=4, **TINY)
    dtx.save_model(model, tmp_path / "folder")
    code, out, err = _run(capsys, "sample", str(tmp_path / "folder"), "--classes", "1,2", "--n-per-class", "2",
                          "--steps", "3", "--sampler", "ddim", "--cfg", "1.5", "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (4, 8, 8, 3) and arr["labels"].tolist() == [1, 1, 2, 2]
    assert json.loads(out.strip().splitlines()[-1])["grid"] == str(tmp_path / "s.png")


@pytest.fixture
def official_pt(tmp_path):
    torch.manual_seed(1)
    model = dtx.create_model("DiT", in_channels=4, num_classes=4, **TINY)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def test_official_checkpoint_needs_a_vae_then_decodes_through_it(tmp_path, capsys, official_pt):
    code, _, err = _run(capsys, "sample", str(official_pt), "--steps", "2", "--out", str(tmp_path / "s.png"))
    assert code == 2 and err.count("\n") == 1 and "--vae" in err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npz").exists()

    from dtx.testing import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    code, _, err = _run(capsys, "sample", str(official_pt), "--vae", str(tmp_path / "vae"), "--classes", "3",
                        "--n-per-class", "2", "--steps", "2", "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3)  # 8x8 latents, decoded per sample by a 2x VAE
