"""Issue 30, points 4-7 across the first-party packages: core's table of their names, `dtx recipes` over the shipped
recipes, the video metrics on Latte's moving digits, DiT's diffusers export, and the root README's figures against
the package READMEs'."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dtx import plugins
from dtx.cli import main
from dtx.testing import fresh_plugin_host

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECIPES = {"dit-digits": "dit", "dit-digits-flow": "dit", "dit-digits-lora": "dit", "hdit-digits": "hdit", "latte-moving-digits": "latte",
                   "gentron-digits": "gentron", "gentron-moving-digits": "gentron"}


@pytest.fixture
def host():
    with fresh_plugin_host():
        yield plugins.host()


def test_core_knows_every_name_the_first_party_packages_register(host):
    """``dtx.plugins.FIRST_PARTY`` (the install hints) equals what each installed first-party package registers."""
    by_dist = {r.dist: r.name for r in host if r.dist in plugins.FIRST_PARTY}
    assert set(by_dist) == set(plugins.FIRST_PARTY), "every first-party package is installed in the test venv"
    for dist, plugin in by_dist.items():
        for kind in ("model", "recipe", "dataset", "conditioner", "runner"):
            registered = {e.name for e in host._registrations[kind] if e.plugin == plugin}
            assert registered == set(plugins.FIRST_PARTY[dist].get(kind, ())), (dist, kind)


def test_recipes_lists_every_shipped_recipe(host, capsys):
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(SHIPPED_RECIPES)
    for name, family in SHIPPED_RECIPES.items():
        row = rows[name]
        assert row["family"] == family and row["plugin"] == family and "error" not in row
        assert row["data"] and row["max_steps"] >= 1
    from dtx.commands.train import resolve_train_config

    for name, row in rows.items():
        cfg = resolve_train_config(name, out="unused")
        assert (row["data"], row["max_steps"], row["max_minutes"]) == \
            (cfg.data.name, cfg.max_steps, cfg.max_minutes or None)


def test_bench_memory_of_a_dit_s2_forward_matches_a_hand_estimate(host, capsys):
    """`dtx bench` on CPU reports the tensors' peak: DiT-S/2's no-grad forward at batch 8 holds at most one block's
    working set, the residual stream, its modulated norm and the MLP's hidden layer before and after the GELU:
    B * T * (2 D + 2 * 4 D) floats, with T = (32 / 2)^2 tokens and D = 384."""
    assert main(["bench", "DiT-S/2", "--batch", "8", "--mode", "forward", "--warmup", "1", "--repeats", "1",
                 "--device", "cpu", "--compile", "off", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    b, t, d = 8, (32 // 2) ** 2, 384
    estimate = b * t * (2 * d + 2 * 4 * d) * 4 / 2 ** 20  # 30 MiB
    assert estimate / 2 <= row["peak_mem_mb"] <= 2 * estimate, (row["peak_mem_mb"], estimate)


def test_video_metrics_fail_on_noise_and_pass_on_moving_digits(tmp_path, capsys):
    """`moving` and `label_agreement` measure a digit: pure noise clips (uniform, dark Gaussian, smooth blobs) score
    near 0 where they scored up to 1.0 / 0.7 before; Latte's moving-digits clips keep 1.0 and >= 0.97."""
    import torch
    from dtx_latte.data import MovingDigits

    from dtx.writers import save_npz

    data = MovingDigits("test", frames=8)
    n = 48
    real = torch.stack([data.clip(i) for i in range(n)])
    g = torch.Generator().manual_seed(0)
    noise = {"uniform": torch.rand(n, 8, 1, 32, 32, generator=g) * 2 - 1,
             "dark": (0.5 * torch.randn(n, 8, 1, 32, 32, generator=g) - 0.5).clamp(-1, 1),
             "blobs": torch.nn.functional.avg_pool2d(torch.randn(n * 8, 1, 32, 32, generator=g), 5, 1, 2)
             .mul(4).clamp(-1, 1).view(n, 8, 1, 32, 32)}

    def scores(videos: torch.Tensor, name: str) -> dict:
        archive = save_npz(videos, tmp_path / f"{name}.npz", labels=data.labels[:n], channel_dim=2)
        assert main(["eval", str(archive), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    good = scores(real, "real")
    assert good["moving"] == 1.0 and good["label_agreement"] >= 0.97 and good["digit_frames"] == 1.0
    assert (good["num_samples"], good["num_frames"]) == (n, n * 8)
    for name, videos in noise.items():
        bad = scores(videos, name)
        assert bad["moving"] == 0.0 and bad["label_agreement"] <= 0.05 and bad["digit_frames"] <= 0.05, (name, bad)
    assert main(["eval", str(tmp_path / "real.npz")]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"({n} videos: one digit in every frame, its centre of mass moving >= 1 px;" in table["moving"]
    assert f"({n * 8} frames: one digit, classified with probability >= 0.5" in table["label_agreement"]


def _dit_folder(path: Path, objective: dict) -> Path:
    """A small pixel-space class-conditional DiT saved as a dtx folder with a run's data facts and objective."""
    from dtx.data.info import DataInfo
    from dtx.models import create_model, save_model

    model = create_model("DiT", input_size=8, in_channels=1, num_classes=10, patch_size=2, hidden_size=32, depth=1,
                         num_heads=2, learn_sigma=False)
    info = DataInfo(channels=1, height=8, width=8, num_classes=10, fields=("y",))
    return save_model(model, path, extra={"data_info": info.to_dict(), "objective": objective,
                                          "sample": {"sampler": "ddim", "steps": 3, "cfg": 1.5}})


def test_convert_refusal_of_an_edm_dit_names_the_recipe_variant_that_exports(host, tmp_path, capsys):
    source = _dit_folder(tmp_path / "edm", {"kind": "karras"})
    out = tmp_path / "hf"
    assert main(["convert", str(source), "--to", "diffusers", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dtx: error: this model was trained in sigma space")
    assert "To export, train with the DDPM objective and a DDPM sampler" in err
    assert ("`dtx train dit-digits objective.kind=gaussian sample.sampler=ddim --out runs/dit-digits-ddpm`, then "
            f"`dtx convert runs/dit-digits-ddpm --to diffusers {out}`") in err
    assert not out.exists() or not any(out.iterdir())


def test_a_pixel_dit_round_trip_through_diffusers_samples_without_a_vae(host, tmp_path, capsys):
    """The exported config.json keeps dtx's data facts and sampling settings (`_dtx`), so the diffusers folder and
    the dtx folder converted back from it sample pixels as the run did, without --vae."""
    import numpy as np
    import yaml

    source = _dit_folder(tmp_path / "ddpm", {"kind": "gaussian", "diffusion_steps": 1000})
    assert main(["convert", str(source), "--to", "diffusers", str(tmp_path / "hf")]) == 0
    stored = json.loads((tmp_path / "hf" / "config.json").read_text())["_dtx"]
    assert stored["data_info"]["is_latent"] is False and stored["sample"]["cfg"] == 1.5
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = yaml.safe_load((tmp_path / "back" / "config.yaml").read_text())
    assert back["data_info"]["is_latent"] is False and back["sample"]["steps"] == 3
    for folder in ("hf", "back"):
        png = tmp_path / f"{folder}.png"
        assert main(["sample", str(tmp_path / folder), "--classes", "3", "--n-per-class", "2", "--out", str(png)]) == 0
        with np.load(png.with_suffix(".npz")) as archive:
            assert archive["arr_0"].shape == (2, 8, 8, 1) and archive["labels"].tolist() == [3, 3]
    capsys.readouterr()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for bad, key in (({**stored, "data_info": {**stored["data_info"], "num_classes": 5}}, "_dtx.data_info.num_classes"),
                     ({"data_info": [1]}, "_dtx must map section names to JSON objects")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "_dtx": bad}))
        assert main(["sample", str(tmp_path / "hf"), "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and "config.json" in err, err
        assert not (tmp_path / "bad.png").exists()


def test_convert_notes_and_the_exported_readme_cite_no_document_users_lack(host, tmp_path, capsys):
    source = _dit_folder(tmp_path / "ddpm", {"kind": "gaussian"})
    assert main(["convert", str(source), "--to", "diffusers", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    readme = (tmp_path / "hf" / "README.md").read_text()
    citation = re.compile(r"\b[\w-]+\.md\b")  # e.g. "dit.md 8.3": a spec file that ships with no package
    assert "note:" in printed and not citation.search(printed), printed
    assert "divides the frequency exponent by 127" in readme and not citation.search(readme), readme


FIGURE = re.compile(r"<!--fig:([\w.-]+)-->(.*?)<!--/fig-->", re.S)


def test_root_readme_figures_equal_the_package_readmes(host):
    """Every result the root README states (family table, demo figures) is marked ``<!--fig:KEY-->TEXT<!--/fig-->``
    and equals the one figure of that key in the package READMEs, where the measurements are reported."""
    root = FIGURE.findall((ROOT / "README.md").read_text())
    source: dict[str, set[str]] = {}
    for readme in sorted((ROOT / "packages").glob("*/README.md")):
        for key, text in FIGURE.findall(readme.read_text()):
            source.setdefault(key, set()).add(text)
    keys = {key for key, _ in root}
    assert {"dit-digits.accuracy", "dit-digits.fd", "hdit-digits.accuracy", "latte-moving-digits.frame_consistency",
            "gentron-digits.all"} <= keys
    for key, text in root:
        assert source.get(key) == {text}, f"root README {key} = {text!r}, package READMEs: {source.get(key)}"
    table = (ROOT / "README.md").read_text().split("## Quick start")[0]
    for family in ("HDiT", "Latte", "GenTron"):
        row = next(line for line in table.splitlines() if line.startswith(f"| **{family}**"))
        assert "<!--fig:" in row and "do not yet reach" not in row and "does not yet reach" not in row, row
