"""dtx.config.load_config: dataclass schema + YAML + dotlist overrides, and one-line ConfigErrors for bad input."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from dtx.config import check, load_config, merge, to_yaml
from dtx.errors import ConfigError


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    kind: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Ema:
    decay: float = 0.9999


@dataclasses.dataclass
class Recipe:
    model: str  # required: no default
    steps: int = 100
    optim: Optim = dataclasses.field(default_factory=Optim)
    ema: Optional[Ema] = None

    def validate(self) -> None:
        check(self.steps > 0, "steps", f"must be positive, got {self.steps}")


@pytest.fixture
def recipe_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: DiT-S/2\noptim:\n  lr: 0.001\n")
    return path


def one_line_config_error(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, *args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_schema_yaml_and_overrides_merge_in_order(recipe_yaml):
    cfg = load_config(Recipe, recipe_yaml, ["optim.lr=2e-3", "steps=7", "optim.kind=sgd"])
    assert isinstance(cfg, Recipe) and isinstance(cfg.optim, Optim)
    assert (cfg.model, cfg.steps, cfg.optim.lr, cfg.optim.kind, cfg.optim.betas) == ("DiT-S/2", 7, 2e-3, "sgd",
                                                                                    (0.9, 0.999))
    assert load_config(Recipe, recipe_yaml, {"steps": 3}, ["steps=4"]).steps == 4  # later sources win
    assert load_config(Recipe, recipe_yaml).optim.lr == 0.001
    assert load_config(Recipe, recipe_yaml, ["ema.decay=0.5"]).ema == Ema(0.5)  # Optional nested dataclass


def test_unknown_key_names_it_and_suggests_the_close_match(recipe_yaml):
    msg = one_line_config_error(recipe_yaml, ["optim.lrr=1"])
    assert msg.startswith("unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")
    assert msg.endswith("allowed keys here: lr, kind, betas")
    msg = one_line_config_error(recipe_yaml, ["stpes=1"])
    assert "unknown config key 'stpes' (did you mean 'steps'?)" in msg
    assert "unknown config key 'ema.decy' (did you mean 'ema.decay'?)" in one_line_config_error(
        recipe_yaml, ["ema.decy=0.1"])


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: x\noptim:\n  kindd: sgd\n")
    assert "unknown config key 'optim.kindd' (did you mean 'optim.kind'?)" in one_line_config_error(path)


def test_wrong_type_names_the_key(recipe_yaml):
    msg = one_line_config_error(recipe_yaml, ["steps=many"])
    assert msg.startswith("bad value for config key 'steps':") and "'many'" in msg
    assert "config key 'optim.lr'" in one_line_config_error(recipe_yaml, ["optim.lr=fast"])


def test_literal_field_lists_allowed_values(recipe_yaml):
    msg = one_line_config_error(recipe_yaml, ["optim.kind=adam"])
    assert msg == "bad value 'adam' for config key 'optim.kind'; allowed values: 'adamw', 'sgd'"


def test_missing_required_value_names_the_key():
    assert one_line_config_error() == "missing value for required config key 'model'"


def test_validate_hook_runs(recipe_yaml):
    assert one_line_config_error(recipe_yaml, ["steps=0"]) == "bad value for config key 'steps': must be positive, got 0"


def test_missing_file(tmp_path):
    assert one_line_config_error(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_invalid_yaml_is_one_line_with_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\noptim: [lr: 1\n")
    msg = one_line_config_error(path)
    assert msg.startswith(f"{path}: not valid YAML (") and "line 3" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert one_line_config_error(path) == f"{path}: top level must be a mapping, got ListConfig"


@pytest.mark.parametrize("override,fragment", [
    ("steps", "override 'steps' is not of the form key=value"),
    ("=3", "override '=3' is not of the form key=value"),
    ("steps=[1,2", "bad override 'steps=[1,2'"),
])
def test_malformed_override(recipe_yaml, override, fragment):
    assert fragment in one_line_config_error(recipe_yaml, [override])


def test_merge_and_to_yaml_round_trip(recipe_yaml, tmp_path):
    cfg = load_config(Recipe, recipe_yaml, ["steps=9"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(Recipe, saved) == cfg
    assert merge(Recipe, recipe_yaml).optim.lr == 0.001
