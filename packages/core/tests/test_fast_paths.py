"""Fast paths keep the numerics: fused adaLN modulate and gated residual equal the plain formulas (values and
gradients), and the trainer's ``recompute`` and ``compile`` switches keep the loss curve of a plain run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dtx.cli import main
from dtx.layers import AdaLNBlock, gated_residual, modulate
from dtx.training.compile import eager_reason


def test_modulate_and_gated_residual_equal_the_plain_formulas():
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8)
    shift, scale, gate = (torch.randn(3, 8, requires_grad=True) for _ in range(3))
    out = gated_residual(x, gate, modulate(y, shift, scale))
    ref = x + gate[:, None] * (y * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g_out = torch.autograd.grad(out.square().sum(), (x, shift, scale, gate))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, shift, scale, gate))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(modulate(y, None, scale), y * (1 + scale[:, None]))


def test_adaln_zero_block_equals_the_official_formula():
    torch.manual_seed(0)
    block = AdaLNBlock(16, 2)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, c = torch.randn(2, 6, 16), torch.randn(2, 16)
    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
    ln = torch.nn.functional.layer_norm
    h = x + g1.unsqueeze(1) * block.attn(ln(x, (16,), eps=1e-6) * (1 + sc1.unsqueeze(1)) + sh1.unsqueeze(1))
    ref = h + g2.unsqueeze(1) * block.mlp(ln(h, (16,), eps=1e-6) * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1))
    torch.testing.assert_close(block(x, c), ref, rtol=1e-5, atol=1e-5)


# -- trainer switches --------------------------------------------------------------------------------------------

TINY_RUN = ["data.batch_size=16", "max_steps=3", "log_every=1", "ckpt_every=100", "sample.every=0",
            "sample.n_per_class=1", "sample.steps=2", "model.options.depth=2", "model.options.hidden_size=32",
            "model.options.num_heads=2"]


def _train(tmp_path: Path, name: str, *overrides: str) -> dict[int, float]:
    from dtx.commands.train import resolve_train_config
    from dtx.training import LocalContext, train

    cfg = resolve_train_config("dit-digits", [*TINY_RUN, *overrides], out=str(tmp_path / name))
    train(cfg, LocalContext(cfg.out, device="cpu"))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


@pytest.mark.slow
def test_every_kth_block_recomputation_keeps_the_loss_curve(tmp_path):
    plain = _train(tmp_path, "plain")
    every2 = _train(tmp_path, "every2", "recompute=every-2")
    assert sorted(plain) == sorted(every2) == [1, 2, 3]
    assert all(math.isclose(plain[s], every2[s], rel_tol=1e-5) for s in plain)


@pytest.mark.slow
def test_compiled_training_keeps_the_loss_curve(tmp_path):
    if eager_reason("on", "cpu") is not None:
        pytest.skip(eager_reason("on", "cpu"))
    plain = _train(tmp_path, "plain")
    compiled = _train(tmp_path, "compiled", "compile=true")
    assert all(math.isclose(plain[s], compiled[s], rel_tol=1e-3) for s in plain)


@pytest.mark.parametrize("override, key", [("recompute=sometimes", "recompute"), ("checkpoint_every=2", "recompute"),
                                           ("compile=fast", "compile")])
def test_bad_switches_are_one_line_errors(tmp_path, capsys, override, key):
    code = main(["train", "dit-digits", "--runner", "local", "--out", str(tmp_path / "r"), override])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtx: ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("dtx: error:") and key in err[0]
    assert not (tmp_path / "r").exists()
