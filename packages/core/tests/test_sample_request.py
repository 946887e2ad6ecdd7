"""One sampling request: a run's ``sample`` section with ``dtx sample``'s flags merged in as ``dtx train`` merges
``key=value`` overrides (``resolve_sample``), checked once (that the trainer's grids and ``dtx sample`` then take
the same path is tested in test_training.py)."""

from __future__ import annotations

import pytest

from dtx.conditioning import GuidanceStep
from dtx.errors import ConfigError
from dtx.training.config import SampleConfig, resolve_sample


def stored() -> SampleConfig:
    return SampleConfig(sampler="ddim", sampler_options={"eta": 0.5}, steps=50, cfg=4.0,
                        guidance=[GuidanceStep(["motion"], 1.2)], guidance_scales={"motion": 1.1}, fps=6.0)


def test_given_values_replace_the_runs_and_the_rest_stays():
    s = resolve_sample(stored(), {"steps": 7, "guidance_scales": {"text": 2.0}})
    assert (s.steps, s.sampler, s.sampler_options, s.cfg, s.fps) == (7, "ddim", {"eta": 0.5}, 4.0, 6.0)
    assert s.guidance_scales == {"motion": 1.1, "text": 2.0}  # dictionaries merge key by key, as in dtx train
    assert [(g.keys, g.scale) for g in s.guidance] == [(["motion"], 1.2)]


def test_a_new_cfg_drops_the_stored_nested_terms_and_a_new_sampler_its_options():
    s = resolve_sample(stored(), {"cfg": 2.0})
    assert s.cfg == 2.0 and s.guidance == []  # nested terms would override the cfg just asked for
    s = resolve_sample(stored(), {"cfg": 2.0, "guidance": [{"keys": ["text"], "scale": 3.0}]})
    assert [(g.keys, g.scale) for g in s.guidance] == [(["text"], 3.0)]
    assert resolve_sample(stored(), {"sampler": "euler"}).sampler_options == {}
    assert resolve_sample(stored(), {"sampler": "ddim", "sampler_options": {"eta": 0.0}}).sampler_options == {"eta": 0.0}


@pytest.mark.parametrize("overrides, key", [({"steps": 0}, "sample.steps"), ({"fps": -1.0}, "sample.fps"),
                                            ({"cfg": float("nan")}, "sample.cfg"), ({"stepz": 3}, "stepz")])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        resolve_sample(stored(), overrides)
