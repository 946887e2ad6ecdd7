"""A clean, non-editable install of dtx-core + dtx-backbone-latte trains and samples the moving-digits demo.

Like ``tests/test_clean_install.py`` (and with its ``fresh_venv`` fixture from ``tests/conftest.py``): a fresh venv
with ``torch==2.13.0`` and copies of ``packages/core`` and ``packages/backbone-latte`` installed as a user installs
them (not editable, declared dependencies only). Its ``dtx`` trains 3 steps of the ``latte-moving-digits`` recipe and
samples from the run; the sample writes a PNG frame grid, an NFHWC ``.npz`` (which ``dtx eval`` scores per frame)
and one GIF and one MP4 per video. Anything the video path imports but the two packages do not declare (the recipe file as package data, the
dataset, the conditioner, the GIF/MP4 writers) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "packages" / "backbone-latte" / "src" / "dtx_latte" / "recipes" / "latte-moving-digits.yaml"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_latte_install_trains_and_samples_moving_digits(fresh_venv):
    if not RECIPE.is_file():
        pytest.skip(f"the latte-moving-digits recipe is not shipped yet ({RECIPE.relative_to(ROOT)} is missing)")
    venv = fresh_venv("core", "backbone-latte")

    installed = venv.installed()
    assert {"dtx-core", "dtx-backbone-latte", "torch"} <= installed, installed
    assert "pytest" not in installed and "dtx-backbone-dit" not in installed, installed
    assert venv.editable().strip() == "", venv.editable()  # a real install, not links into the checkout

    dtx = venv.script("dtx")
    run = venv.cwd / "RUN"
    res = venv.run([dtx, "train", "latte-moving-digits", "--out", str(run), "--max-steps", "3", "--runner", "local",
                    "sample.every=0", "ckpt_every=3", "log_every=1", "sample.steps=2", "sample.n_per_class=1"],
                   timeout=900)
    assert res.returncode == 0, f"dtx train latte-moving-digits in the clean install failed: {venv.explain(res)}"

    png = run / "s.png"
    res = venv.run([dtx, "sample", str(run), "--steps", "2", "--classes", "3", "--n-per-class", "1",
                    "--out", str(png)], timeout=600)
    assert res.returncode == 0, f"dtx sample in the clean install failed: {venv.explain(res)}"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    for path in (png, png.with_suffix(".npz"), run / "s" / "sample_000.gif", run / "s" / "sample_000.mp4"):
        assert path.is_file() and path.stat().st_size > 0, f"no {path.relative_to(run)} in the run folder: {files}"

    # the video archive scores per frame (values are meaningless after 3 steps; the path must work)
    res = venv.run([dtx, "eval", str(png.with_suffix(".npz")), "--json"], timeout=300)
    assert res.returncode == 0, f"dtx eval of the sampled videos failed: {venv.explain(res)}"
    scores = json.loads(res.stdout)
    assert scores["kind"] == "videos" and scores["num_samples"] >= 1 and scores["video_shape"] == [8, 1, 32, 32]
    assert 0.0 <= scores["frame_consistency"] <= 1.0 and 0.0 <= scores["moving"] <= 1.0
