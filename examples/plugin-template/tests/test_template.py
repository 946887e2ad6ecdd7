"""The template's own tests: the dtx conformance kit in one class, and its recipe trains and samples.

Run them after installing the plugin (``pip install ".[test]"``): the kit checks the installed entry point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import dtx
from dtx.cli import main
from dtx.testing import ModelCase, ModelConformance


class TestTemplateConformance(ModelConformance):
    plugin = "template"
    cases = [
        ModelCase("TemplateViT-S", {"input_size": 8, "num_classes": 10}, zero_init=True, id="preset-digits"),
        ModelCase("TemplateViT", {"input_size": [8, 4], "in_channels": 3, "hidden_size": 32, "depth": 1},
                  zero_init=True, id="unconditional-rgb-8x4"),
    ]


def test_recipe_trains_and_samples(tmp_path: Path, dtx_plugin_host) -> None:
    """A few steps of ``template-digits`` with the local runner, then ``dtx sample`` and ``dtx.load_model``."""
    run = tmp_path / "run"
    assert main(["train", "template-digits", "--out", str(run), "--max-steps", "4", "--runner", "local",
                 "sample.every=0", "ckpt_every=4", "log_every=2", "data.batch_size=16"]) == 0
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--steps", "2", "--classes", "0,1", "--n-per-class", "2",
                 "--out", str(grid)]) == 0
    samples = np.load(grid.with_suffix(".npz"))
    assert grid.is_file() and samples["arr_0"].shape == (4, 8, 8, 1)
    assert list(samples["labels"]) == [0, 0, 1, 1]
    model = dtx.load_model(run)
    assert type(model).__name__ == "TemplateViT" and model.num_classes == 10
