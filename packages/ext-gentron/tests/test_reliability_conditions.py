"""Issue 29, finding 8 on a real text model: GenTron's conditioners declare what they read from a sampling request,
so ``--classes`` or a flag the run has no conditioner for is refused (exit 2, naming the option and what the model
takes) instead of being ignored, on the command line and in a recipe's ``sample`` section."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dtx.cli import main
from dtx.testing import fresh_plugin_host
from dtx_gentron.conditioning import MotionConditioner
from dtx_gentron.text import TextConditioner
from dtx_gentron.text_cache import PrecomputedTextConditioner

TINY = ["model.options.hidden_size=32", "model.options.depth=1", "model.options.num_heads=2",
        "model.options.context_dim=16", "model.options.text_length=8", "data.batch_size=4", "data.options.size=8",
        "sample.steps=2", "sample.n_per_class=1", "compile=false", "--max-steps", "1"]


pytestmark = pytest.mark.usefixtures("dtx_plugin_host")  # each test rediscovers the installed plugins


@pytest.fixture(scope="module")
def t2i(tmp_path_factory, encoder) -> Path:
    """A one-step GenTron text-to-image run with a tiny text encoder."""
    root = tmp_path_factory.mktemp("t2i")
    with fresh_plugin_host():
        assert main(["train", "gentron-digits", "--runner", "local", "--out", str(root / "run"), *TINY,
                     f"conditioning.conditioners.text.options.encoder={encoder}",
                     "conditioning.conditioners.text.options.max_length=8"]) == 0
    return root / "run"


def test_gentron_conditioners_declare_what_they_read():
    assert TextConditioner.request_parts(None) == ("prompts", "negative_prompt")
    assert PrecomputedTextConditioner.request_parts(None) == ("prompts", "negative_prompt")
    assert MotionConditioner().request_parts() == ("flags.motion_free",)


@pytest.mark.parametrize("argv, fragment", [
    (["--classes", "3"], "--classes: this model takes text prompts (--prompt), a negative prompt (--negative-prompt), "
                         "not class labels"),
    (["--motion-free"], "--motion-free: this model takes text prompts (--prompt), a negative prompt "
                        "(--negative-prompt), not the flag 'motion_free'"),
    (["--prompt", "a red 3", "--set-flag", "shuffle"], "--set-flag shuffle: this model takes text prompts"),
])
def test_a_text_model_refuses_conditions_it_cannot_use(t2i, tmp_path, capsys, argv, fragment):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in t2i.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["sample", str(t2i), "--steps", "2", "--out", str(tmp_path / "s.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("dtx: error: ") == 1 and f"dtx: error: {fragment}" in err
    assert not list(tmp_path.iterdir())
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in t2i.rglob("*") if p.is_file()} == before


def test_a_text_recipe_sampling_class_labels_is_refused_before_writing(tmp_path, capsys, encoder):
    capsys.readouterr()
    assert main(["train", "gentron-digits", "--runner", "local", "--out", str(tmp_path / "run"), *TINY,
                 f"conditioning.conditioners.text.options.encoder={encoder}", "sample.classes=[3]"]) == 2
    assert ("bad value for config key 'sample.classes': this model takes text prompts (sample.prompts)"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_t2v_recipe_without_its_t2i_run_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "gentron-moving-digits", "--runner", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("dtx: error: ") == 1
    assert "'model.init_from': runs/gentron-digits not found" in err and "`dtx train gentron-digits`" in err
    assert not list(tmp_path.iterdir())  # nothing written, not even runs/
    assert main(["train", "gentron-moving-digits", "--runner", "local", "model.init_from=elsewhere/t2i"]) == 2
    assert "'model.init_from': elsewhere/t2i not found; point it at" in capsys.readouterr().err
