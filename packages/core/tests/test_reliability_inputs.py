"""Issue 29, inputs: one reader for every stored config (environment interpolation refused everywhere), sizes checked
before any layer is built or table allocated, bad input as one ``dtx: error:`` line (exit 2) instead of a foreign
exception, and messages that say what is wrong.

conftest's tiny denoiser (``width`` x ``depth`` blocks) and its 24 ramp images are registered as a run-time
plugin, so these tests need no backbone; ``tests/test_reliability_inputs_families.py`` covers the DiT folders.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from dtx import plugins
from dtx.cli import main
from dtx.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(autouse=True)
def tiny_plugin(tiny_denoiser):
    tiny_denoiser("tiny-inputs", "tiny-mlp-denoiser", {"tiny-inputs-data": {"ramp": True}})


@pytest.fixture
def recipe(write_tiny_recipe) -> Path:
    return write_tiny_recipe("tiny-mlp-denoiser", "tiny-inputs-data", sample={"every": 0}, max_steps=2)


def train(recipe: Path, out: Path, *extra: str) -> int:
    return main(["train", str(recipe), "--runner", "local", "--out", str(out), *extra])


@pytest.fixture
def run(recipe: Path, tmp_path: Path, capsys) -> Path:
    """A finished 2-step run with one checkpoint."""
    out = tmp_path / "run"
    assert train(recipe, out) == 0
    capsys.readouterr()
    return out


@pytest.fixture
def folder(run: Path, tmp_path: Path, capsys) -> Path:
    """The run converted to a dtx model folder (model.safetensors + config.yaml)."""
    out = tmp_path / "model"
    assert main(["convert", str(run), str(out)]) == 0
    capsys.readouterr()
    return out


def error_line(capsys) -> str:
    """The CLI's one error line (progress bars and warnings dropped); fails unless there is exactly one."""
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("dtx: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the run lock (which records its holder), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dtx-lock"}


def rehash(ckpt: Path) -> None:
    """Recompute the manifest's sizes and hashes after a deliberate edit, so only the edit itself can be caught."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def edit_yaml(path: Path, edit) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))


# -- finding 3: environment interpolation is refused wherever a config is read ---------------------------------------

def test_environment_interpolation_in_a_model_folder_is_refused_and_never_written(folder, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("DTX_SECRET_TEST", "ddim")
    edit_yaml(folder / "config.yaml", lambda cfg: cfg["sample"].update(sampler="${oc.env:DTX_SECRET_TEST}"))
    before = digest(folder)
    out = tmp_path / "converted"
    assert main(["convert", str(folder), str(out)]) == 2
    line = error_line(capsys)
    assert f"{folder / 'config.yaml'}: config key 'sample.sampler' reads an environment variable" in line
    assert "ddim" not in line.replace("${oc.env:DTX_SECRET_TEST}", "")
    assert not out.exists()
    assert main(["sample", str(folder), "--out", str(tmp_path / "g.png")]) == 2
    assert "'sample.sampler' reads an environment variable" in error_line(capsys)
    assert not (tmp_path / "g.png").exists() and digest(folder) == before


def test_environment_interpolation_in_a_run_checkpoints_model_spec_is_refused(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DTX_SECRET_TEST", "16")
    ckpt = run / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "state.json").read_text())
    state["model_spec"]["width"] = "${oc.env:DTX_SECRET_TEST}"
    (ckpt / "state.json").write_text(json.dumps(state))
    rehash(ckpt)
    before = digest(run)
    assert main(["convert", str(run), str(tmp_path / "converted")]) == 2
    assert "config key 'model_spec.width' reads an environment variable" in error_line(capsys)
    assert not (tmp_path / "converted").exists() and digest(run) == before


def test_environment_interpolation_in_a_diffusers_json_is_refused(tmp_path):
    from dtx.diffusers_interop import read_json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "X", "sub": {"root": "${oc.env:HOME}"}}))
    with pytest.raises(ConfigError, match=r"config.json: config key 'sub.root' reads an environment variable"):
        read_json(path)


def test_one_reader_resolves_key_interpolation_and_names_the_source(tmp_path):
    from dtx.config import read_config

    assert read_config({"a": 3, "b": "${a}"}, "src") == {"a": 3, "b": 3}
    with pytest.raises(ConfigError, match=r"^src: config error at 'a': Recursive interpolation"):
        read_config({"a": "${b}", "b": "${a}"}, "src")


# -- finding 5: crafted sizes are refused before anything is built or allocated --------------------------------------

@pytest.mark.parametrize("options, key", [({"width": 10**7}, "width=10000000"), ({"depth": 10**9}, "depth=1000000000"),
                                          ({"input_size": 10**6}, "input_size=1000000")])
def test_crafted_model_sizes_are_refused_by_name_before_building(options, key):
    from dtx.models import create_model

    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"model 'tiny-mlp-denoiser' is too large with {key}:"):
        create_model("tiny-mlp-denoiser", **options)
    assert time.perf_counter() - start < 30  # a bounded meta-device build, not a hang
    create_model("tiny-mlp-denoiser", width=32, depth=3)  # ordinary sizes still build


def test_a_model_folder_whose_sizes_its_weights_cannot_hold_is_refused(folder, tmp_path, capsys):
    edit_yaml(folder / "config.yaml", lambda cfg: cfg["model"].update(width=16384))  # 805M parameters
    before = digest(folder)
    assert main(["convert", str(folder), str(tmp_path / "converted")]) == 2
    line = error_line(capsys)
    assert f"dtx: error: {folder}: width=16384 makes model 'tiny-mlp-denoiser'" in line and "bytes of weights" in line
    assert not (tmp_path / "converted").exists() and digest(folder) == before


def test_diffusion_step_counts_are_capped_before_any_table_is_built(tmp_path):
    from dtx.diffusers_interop import objective_from_scheduler
    from dtx.diffusion.gaussian import MAX_DIFFUSION_STEPS, get_beta_schedule
    from dtx.training.config import load_train_config

    with pytest.raises(ConfigError, match="'objective.diffusion_steps'"):
        load_train_config(["objective.diffusion_steps=10000000000"])
    with pytest.raises(ConfigError, match="number of diffusion steps"):
        get_beta_schedule("cosine", MAX_DIFFUSION_STEPS + 1)
    path = tmp_path / "scheduler_config.json"
    path.write_text('{"_class_name": "DDIMScheduler", "num_train_timesteps": 1e10, "beta_schedule": '
                    '"squaredcos_cap_v2"}')
    with pytest.raises(CheckpointError, match="scheduler_config.json: num_train_timesteps must be in"):
        objective_from_scheduler(path)


def test_sample_counts_are_capped_before_any_tensor_is_allocated(run, tmp_path, capsys):
    from dtx.training.config import load_train_config

    assert main(["sample", str(run), "--n-per-class", "100000000000", "--out", str(tmp_path / "g.png")]) == 2
    assert "--n-per-class must be at most" in error_line(capsys)
    with pytest.raises(ConfigError, match="'sample.n_per_class'"):
        load_train_config(["sample.n_per_class=100000000000"])
    assert not (tmp_path / "g.png").exists()


# -- finding 14: bad input is one error line, never a foreign exception -----------------------------------------------

@pytest.mark.parametrize("case", ["seed", "prompts-not-utf8", "out-folder", "out-under-file", "device"])
def test_bad_sample_arguments_are_one_error_line_naming_the_option(case, run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe a prompt\n")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("")
    extra, fragment = {
        "seed": (["--seed", str(2**70)], "argument --seed: must be in [0, 2**63)"),
        "prompts-not-utf8": (["--prompts-file", str(tmp_path / "prompts.txt")], "prompts.txt is not UTF-8 text"),
        "out-folder": (["--out", str(tmp_path / "dir.png")], "--out"),
        "out-under-file": (["--out", str(tmp_path / "file" / "g.png")], "which is a file, not a folder"),
        "device": (["--device", "tpu"], "--device 'tpu' is not a device"),
    }[case]
    if not any(a == "--out" for a in extra):
        extra += ["--out", str(tmp_path / "g.png")]
    before = digest(run)
    assert main(["sample", str(run), *extra]) == 2
    assert fragment in error_line(capsys)
    assert digest(run) == before and not (tmp_path / "g.png").exists() and not (tmp_path / "dir.npz").exists()
    assert list((tmp_path / "dir.png").iterdir()) == []


def test_recursive_interpolation_in_a_model_folder_is_one_error_line(folder, tmp_path, capsys):
    with open(folder / "config.yaml", "a") as f:
        f.write("a: ${b}\nb: ${a}\n")
    assert main(["sample", str(folder), "--out", str(tmp_path / "g.png")]) == 2
    line = error_line(capsys)
    assert f"{folder / 'config.yaml'}: config error at" in line and "Recursive interpolation" in line
    assert not (tmp_path / "g.png").exists()


def test_a_malformed_metrics_line_is_named_by_every_reader_and_nothing_is_written(recipe, run, capsys):
    from dtx.training.metrics import plot_loss

    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": "abc", "loss": 1.0}\n')
    before = digest(run)
    assert train(recipe, run, "max_steps=3") == 2
    assert f"{metrics} line 3: not a metrics record" in error_line(capsys)
    assert digest(run) == before
    with pytest.raises(DataError, match="line 3"):
        plot_loss(metrics, run / "loss.png")
    # a torn last line (a kill mid-write) is still dropped, as before
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]) + '{"step": 3, "lo')
    assert train(recipe, run, "max_steps=3") == 0
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def _tiny_vae(path: Path, in_channels: int) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            sample_size=8).save_pretrained(path)
    return path


def test_a_vae_that_does_not_fit_is_one_error_line(run, tmp_path, capsys):
    from PIL import Image

    vae = _tiny_vae(tmp_path / "vae", in_channels=1)
    assert main(["sample", str(run), "--vae", str(vae), "--out", str(tmp_path / "g.png")]) == 2
    assert f"--vae {vae} decodes 4-channel latents, but this model samples 1 channel(s)" in error_line(capsys)
    assert not (tmp_path / "g.png").exists()
    for i in range(2):  # an RGB image folder for a VAE that takes one channel
        (tmp_path / "images" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "images" / "a" / f"{i}.png")
    out = tmp_path / "latents"
    assert main(["extract-latents", "--vae", str(vae), "--data", str(tmp_path / "images"), "--out", str(out),
                 "--image-size", "16", "--no-progress"]) == 2
    assert f"the data have 3 channel(s) but the VAE {vae} takes 1" in error_line(capsys)
    assert not out.exists()


def test_extract_latents_checks_seed_device_and_output_before_reading_anything(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    base = ["extract-latents", "--vae", str(tmp_path / "no-vae"), "--data", str(tmp_path / "no-data")]
    assert main([*base, "--out", str(tmp_path / "o"), "--seed", str(2**64)]) == 2
    assert "argument --seed" in error_line(capsys)
    assert main([*base, "--out", str(tmp_path / "file" / "o")]) == 2
    assert "--out" in error_line(capsys)


# -- finding 16: messages that say what is wrong ------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["/dev/zero", "folder"])
def test_a_prompts_file_that_is_no_regular_file_is_named_so(source, run, tmp_path, capsys):
    path = "/dev/zero" if source == "/dev/zero" else str(tmp_path)
    if not Path(path).exists():
        pytest.skip("no /dev/zero here")
    assert main(["sample", str(run), "--prompts-file", path, "--out", str(tmp_path / "g.png")]) == 2
    line = error_line(capsys)
    assert f"--prompts-file {path} is " in line and "not a regular file" in line and "not found" not in line


def test_an_image_given_as_a_model_is_named_as_what_it_is(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    assert main(["convert", str(tmp_path / "grid.png"), str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "grid.png is not a model checkpoint: PNG image" in line and "pickled" not in line
    assert not (tmp_path / "out").exists()


def test_an_allow_list_naming_an_unknown_plugin_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("DTX_PLUGINS", "bogus")
    plugins.reset()
    assert main(["models"]) == 2
    line = error_line(capsys)
    assert "DTX_PLUGINS names unknown plugin 'bogus'; installed: core" in line
