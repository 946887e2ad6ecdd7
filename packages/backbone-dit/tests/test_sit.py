"""SiT checkpoints (DiT's network trained as an interpolant): a random-weight file saved the way SiT's train.py and
its release save them loads with ``format="sit"`` as a DiT fed SiT's time, its forward equals DiT's forward of the
same weights fed t in [0, 1] (no x1000), and the folder ``dtx convert`` writes samples with SiT's objective."""

from __future__ import annotations

import argparse

import torch

import dtx
from dtx.cli import main
from dtx.models import load_model_with_info
from dtx.testing import randomize_parameters
from dtx.training.sampling import load_for_sampling

TINY = dict(input_size=8, depth=2, hidden_size=128, num_heads=2, num_classes=10, in_channels=4)


def _dit(**kw) -> torch.nn.Module:
    return randomize_parameters(dtx.create_model("DiT", **{**TINY, **kw}), 0, std=0.05).eval()


def _sit_train_args(**kw) -> argparse.Namespace:
    base = dict(model="SiT-XL/2", image_size=64, num_classes=10, path_type="Linear", prediction="velocity",
                loss_weight=None, sample_eps=None, train_eps=None)
    return argparse.Namespace(**{**base, **kw})


def _probe(model, t):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return x, model(x, t, torch.tensor([3, 10]))


def test_a_released_sit_file_loads_with_format_sit_and_runs_dits_network_on_sit_time(tmp_path):
    dit = _dit()  # learn_sigma: SiT-XL/2 256 keeps DiT's 8 output channels
    torch.save(dit.state_dict(), tmp_path / "SiT-tiny.pt")
    assert load_model_with_info(tmp_path / "SiT-tiny.pt")[1]["format"] == "dit-official"  # the tensors cannot tell
    sit, info = load_model_with_info(tmp_path / "SiT-tiny.pt", options=dtx.models.LoadOptions(format="sit"))
    assert info["format"] == "sit" and sit.noise_input == "sit_time"
    assert info["config"]["objective"] == {"kind": "flow", "path": "linear", "prediction": "velocity",
                                           "loss_weight": "none"}
    t = torch.tensor([0.25, 0.9])  # SiT's model gets t in [0, 1] as is
    torch.testing.assert_close(_probe(sit, t)[1], _probe(dit, t)[1], atol=0, rtol=0)
    assert dtx.load_model(tmp_path / "SiT-tiny.pt", format="sit").noise_input == "sit_time"


def test_the_flow_objective_feeds_a_sit_model_as_sits_sampler_does(tmp_path):
    """Flow time t (1 at the noise) reaches the network as s = 1 - t; SiT's velocity (towards the data, its first
    in_channels outputs) is dx/ds, so the objective's dx/dt is its negative."""
    from dtx.data.info import DataInfo
    from dtx.training.config import ObjectiveConfig
    from dtx.training.objectives import FlowObjective

    dit = _dit()
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {}, "args": _sit_train_args()},
               tmp_path / "0000100.pt")
    sit, info = load_model_with_info(tmp_path / "0000100.pt")  # train.py's args name the path: detected
    assert info["format"] == "sit"
    objective = FlowObjective(ObjectiveConfig(kind="flow"), sit, DataInfo(channels=4, height=8, width=8))
    t = torch.tensor([0.75, 0.1])
    x, sit_out = _probe(dit, 1 - t)
    with torch.no_grad():
        velocity = objective.net(sit)(x, t, y=torch.tensor([3, 10]))
    torch.testing.assert_close(velocity, -sit_out[:, :4], atol=0, rtol=0)


def test_train_args_choose_the_recorded_path_and_prediction(tmp_path):
    dit = _dit(learn_sigma=False)
    args = _sit_train_args(path_type="GVP", prediction="noise", loss_weight="likelihood", sample_eps=0.01)
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "args": args}, tmp_path / "gvp.pt")
    _, info = load_model_with_info(tmp_path / "gvp.pt")
    assert info["config"]["objective"] == {"kind": "flow", "path": "gvp", "prediction": "noise",
                                           "loss_weight": "likelihood", "sample_eps": 0.01}


def test_sit_presets_are_dits_sizes_fed_sit_time():
    for size in ("S", "B", "L", "XL"):
        with torch.device("meta"):
            sit, dit = dtx.create_model(f"SiT-{size}/2"), dtx.create_model(f"DiT-{size}/2")
        assert sit.noise_input == "sit_time" and dit.noise_input == "timestep"
        assert {k: v.shape for k, v in sit.state_dict().items()} == {k: v.shape for k, v in dit.state_dict().items()}


def test_convert_with_format_sit_then_sample_uses_sits_objective(tmp_path, capsys):
    torch.save(_dit().state_dict(), tmp_path / "SiT-tiny.pt")
    assert main(["convert", str(tmp_path / "SiT-tiny.pt"), str(tmp_path / "sit"), "--format", "sit"]) == 0
    setup = load_for_sampling(tmp_path / "sit")
    assert setup.objective.kind == "flow" and setup.cfg.sample.sampler == "flow-dopri5"
    assert setup.cfg.sample.guide_channels == 3  # SiT's forward_with_cfg guides three channels
    from dtx.testing import save_tiny_vae

    (_, vae), out = save_tiny_vae(tmp_path / "vae"), tmp_path / "s.png"
    assert main(["sample", str(tmp_path / "sit"), "--classes", "1,2", "--n-per-class", "1", "--sampler",
                 "flow-euler", "--steps", "3", "--out", str(out), "--device", "cpu", "--vae", str(vae)]) == 0
    assert out.exists()


def test_an_unknown_format_is_refused_naming_the_known_ones(tmp_path, capsys):
    torch.save(_dit().state_dict(), tmp_path / "m.pt")
    assert main(["sample", str(tmp_path / "m.pt"), "--format", "sit2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtx: error:") and "'sit2'" in err and "sit" in err
