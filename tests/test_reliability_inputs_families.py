"""Issue 29, inputs, on DiT's folders: crafted sizes in a dtx model folder or a diffusers ``config.json`` are refused
by name before any layer is built, malformed ``config.json`` numbers are one error line, and a disabled family's
model is named as disabled rather than guessed at (``packages/core/tests/test_reliability_inputs.py`` covers the
rest without a backbone)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from dtx import plugins
from dtx.cli import main
from dtx.testing import fresh_plugin_host

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2,
            learn_sigma=False)


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with fresh_plugin_host():
        yield plugins.host()


@pytest.fixture
def folder(host, tmp_path: Path) -> Path:
    """A tiny class-conditional DiT as a dtx model folder."""
    from dtx.models import create_model, save_model

    torch.manual_seed(0)
    model = create_model("DiT", **TINY)
    info = {"channels": 1, "height": 8, "width": 8, "num_classes": 2, "fields": ["y"]}
    return save_model(model, tmp_path / "tiny", extra={"data_info": info, "sample": {"steps": 2}})


@pytest.fixture
def diffusers_folder(folder: Path, tmp_path: Path, capsys) -> Path:
    out = tmp_path / "tiny-diffusers"
    assert main(["convert", str(folder), str(out), "--to", "diffusers"]) == 0
    capsys.readouterr()
    return out


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dtx: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("key, value", [("hidden_size", 10**7), ("depth", 10**9)])
def test_crafted_sizes_in_a_dit_model_folder_are_refused_by_name(folder, tmp_path, capsys, key, value):
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace(f"  {key}: {TINY[key]}\n", f"  {key}: {value}\n"))
    start = time.perf_counter()
    assert main(["sample", str(folder), "--out", str(tmp_path / "g.png")]) == 2
    assert time.perf_counter() - start < 60
    assert f"model 'DiT' is too large with {key}={value}" in error_line(capsys)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("key, raw, fragment", [
    ("num_layers", '"abc"', "num_layers must be an integer, got 'abc'"),
    ("sample_size", "1e400", "sample_size must be an integer, got inf"),
    ("num_layers", "1000000000", "too large with depth=1000000000"),
    ("attention_head_dim", "10000000", "too large with hidden_size=20000000"),
])
def test_malformed_or_crafted_diffusers_config_values_are_one_error_line(diffusers_folder, tmp_path, capsys, key,
                                                                         raw, fragment):
    crafted = tmp_path / "crafted"
    shutil.copytree(diffusers_folder, crafted)
    config = json.loads((crafted / "config.json").read_text())
    config[key] = "@@"
    (crafted / "config.json").write_text(json.dumps(config).replace('"@@"', raw))
    assert main(["convert", str(crafted), str(tmp_path / "out")]) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_model_of_a_disabled_plugin_is_named_as_disabled(folder, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DTX_DISABLE_PLUGINS", "dit")
    plugins.reset()
    try:
        assert main(["sample", str(folder), "--out", str(tmp_path / "g.png")]) == 2
    finally:
        plugins.reset()
    line = error_line(capsys)
    assert "unknown model 'DiT' (plugin 'dit', which registers it, is disabled by DTX_DISABLE_PLUGINS)" in line
    assert "did you mean" not in line
