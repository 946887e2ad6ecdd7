"""`model.init_from`: any source read without its architecture, keys mapped by the family's adapter or by equal
names and shapes, a report of loaded / skipped / new keys, and only on a fresh run (never over a resumed one)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import dtx
from dtx import plugins
from dtx.errors import CheckpointError
from dtx.init_weights import InitReport, copy_matching, init_weights, read_state_dict
from dtx.testing import fresh_plugin_host


class Small(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Embedding(classes, 4)


class Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 2)


def rename_adapter(model: nn.Module, state: dict) -> InitReport:
    return copy_matching(model, {k.replace("body.", "trunk."): v for k, v in state.items()})


@pytest.fixture
def small_models():
    module = types.ModuleType("dtx_init_test")

    @dtx.hookimpl
    def dtx_register_models(register):
        register("small", Small, family="t")
        register("renamed", Renamed, family="t", init_from=rename_adapter)

    module.dtx_register_models = dtx_register_models
    with fresh_plugin_host():
        plugins.register_plugin(module, name="init-test")
        yield


def test_equal_names_and_shapes_are_copied_and_the_rest_reported(small_models, tmp_path):
    torch.manual_seed(0)
    source = dtx.create_model("small", classes=3)
    torch.save({"ema": {"module." + k: v for k, v in source.state_dict().items()}, "opt": {}}, tmp_path / "a.pt")
    target = dtx.create_model("small", classes=5)
    report = init_weights(target, tmp_path / "a.pt")
    assert report.loaded == ["body.weight", "body.bias"] and report.new == ["head.weight"]
    assert report.skipped == {"head.weight": "shape (3, 4) vs (5, 4)"}
    assert torch.equal(target.body.weight, source.body.weight)
    assert "2 tensors loaded, 1 skipped, 1 newly initialised" in report.summary()


def test_a_family_adapter_maps_keys(small_models, tmp_path):
    source = dtx.create_model("small")
    dtx.save_model(source, tmp_path / "folder")
    assert set(read_state_dict(tmp_path / "folder")) == {"body.weight", "body.bias", "head.weight"}
    target = dtx.create_model("renamed")
    report = init_weights(target, tmp_path / "folder")
    assert sorted(report.loaded) == ["trunk.bias", "trunk.weight"] and sorted(report.new) == ["extra.bias",
                                                                                             "extra.weight"]
    assert torch.equal(target.trunk.bias, source.body.bias)
    with pytest.raises(CheckpointError, match="no tensor"):
        init_weights(dtx.create_model("renamed"), _save_unrelated(tmp_path))


def _save_unrelated(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "u.pt")
    return tmp_path / "u.pt"
