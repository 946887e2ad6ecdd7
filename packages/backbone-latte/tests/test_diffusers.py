"""``dtx convert --to diffusers`` of dtx-backbone-latte models: every variant is refused with one error line saying
why diffusers' LatteTransformer3DModel (Latte-1's adaLN-single text-to-video layout) cannot hold it, and nothing is
written. (Latte-1 itself loads and exports through dtx-ext-gentron: packages/ext-gentron/tests/test_diffusers.py.)"""

from __future__ import annotations

import pytest

import dtx
from dtx.cli import main
from dtx.models import save_model


@pytest.mark.parametrize("variant, reason", [(1, "adaLN-Zero"), (2, "late fusion"), (3, "factorised"),
                                             (4, "split-head")])
def test_latte_variants_are_refused_with_the_reason(tmp_path, capsys, variant, reason):
    model = dtx.create_model("Latte", depth=2, hidden_size=32, num_heads=2, input_size=8, num_frames=2,
                             variant=variant)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dtx: error:")
    assert "cannot hold this Latte" in err and reason in err and "Latte-1" in err
    assert not (tmp_path / "out").exists()
