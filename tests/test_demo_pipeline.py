"""The demo pipeline across packages: the ``dit-digits`` recipe (dtx-backbone-dit) trained by the core loop, sampled
by ``dtx sample`` and scored by ``dtx eval``, all through ``dtx.cli.main`` as README's demo runs it (shortened)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dtx.cli import main
from dtx.testing import fresh_plugin_host

pytest.importorskip("dtx_dit")


@pytest.fixture(autouse=True)
def all_plugins():
    with fresh_plugin_host():
        yield


def test_recipe_is_the_class_conditional_dit_on_embedded_digits():
    from dtx.commands.train import resolve_train_config

    cfg = resolve_train_config("dit-digits")
    assert cfg.model.name.startswith("DiT") and cfg.data.name == "digits"
    assert cfg.model.options.get("class_dropout_prob", 0.1) > 0  # a null class, so guidance is possible
    assert cfg.out == "runs/dit-digits"
    from dtx.data import build_dataset

    data = build_dataset(cfg.data.name, **cfg.data.options)
    assert data.num_classes == 10 and not data.is_latent


def test_train_sample_eval_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["model.options.hidden_size=32", "model.options.depth=1", "model.options.num_heads=2",
             "data.batch_size=32", "sample.steps=4", "sample.n_per_class=1", "log_every=2", "ckpt_every=2"]
    assert main(["train", "dit-digits", "--runner", "local", "--out", str(out), "--max-steps", "4", *small]) == 0
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "samples/step_0000004.png",
                 "checkpoints/step_00000002", "checkpoints/step_00000004"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)

    grid = out / "samples" / "final.png"
    assert main(["sample", str(out), "--steps", "4", "--n-per-class", "2", "--seed", "0", "--out", str(grid)]) == 0
    archive = np.load(grid.with_suffix(".npz"))
    assert archive["arr_0"].shape == (20, 8, 8, 1) and archive["arr_0"].dtype == np.uint8
    assert archive["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    capsys.readouterr()

    assert main(["eval", str(grid.with_suffix(".npz")), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["num_samples"] == 20 and 0.0 <= scores["accuracy"] <= 1.0
    assert scores["classifier_test_accuracy"] > 0.9  # the shipped classifier itself is sound
