"""diffusers interop for DiT: DiTTransformer2DModel folders built and saved by diffusers itself load through
dtx.load_model and match diffusers' own forward pass wherever the numerics agree; the known differences of
diffusers' DiTTransformer2DModel from facebookresearch/DiT (timestep features /127 vs /128, norm3 eps 1e-5 vs 1e-6)
are measured; dtx DiTs exported with ``dtx convert --to diffusers`` load with diffusers' from_pretrained and match;
a Gaussian-trained DiT samples through DiTPipeline; a sigma-space DiT is refused with the reason."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTPipeline, DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

import dtx  # noqa: E402
from dtx.cli import main  # noqa: E402
from dtx.models import load_model_with_info, save_model  # noqa: E402
from dtx.testing import randomize_parameters

HEADS, HEAD_DIM, LAYERS, SIZE, CLASSES = 2, 16, 2, 8, 10


def tied_embedders(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """The layout diffusers' DiT converter writes: DiT's one timestep/label embedder copied into every block."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_parameters(model, seed, std=0.1)


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    """A tiny random DiTTransformer2DModel with diffusers' default norm_eps (1e-5, as facebook/DiT-XL-2-256), saved
    sharded by diffusers itself."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                  out_channels=8, num_layers=LAYERS, sample_size=SIZE, patch_size=2,
                                  num_embeds_ada_norm=CLASSES)
    tied_embedders(randomize(model, 0))
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    model.save_pretrained(folder, max_shard_size="20KB")
    return model, folder


def inputs(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, SIZE, SIZE, generator=g)
    return x, torch.tensor([0, 421, 999][:n]), torch.tensor([0, 3, CLASSES][:n])


def diffusers_out(model: DiTTransformer2DModel, x, t, y, *, divisor_128: bool = False, eps: float | None = None):
    """diffusers' forward, optionally with DiT's /128 timestep features and a given norm3 eps (patched on a copy
    of the module attributes, restored afterwards)."""
    saved = [(b.norm1.emb.time_proj.downscale_freq_shift, b.norm3.eps) for b in model.transformer_blocks]
    try:
        for b in model.transformer_blocks:
            if divisor_128:
                b.norm1.emb.time_proj.downscale_freq_shift = 0
            if eps is not None:
                b.norm3.eps = eps
        with torch.no_grad():
            return model(x, timestep=t, class_labels=y).sample
    finally:
        for b, (shift, e) in zip(model.transformer_blocks, saved):
            b.norm1.emb.time_proj.downscale_freq_shift, b.norm3.eps = shift, e


def test_t_embedding_difference_is_measured():
    """diffusers' timestep features (downscale_freq_shift=1: /127) against DiT's (/128, dtx's), for every DDPM
    index."""
    from dtx.layers import timestep_embedding

    t = torch.arange(1000)
    ours = timestep_embedding(t, 256)
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    reference = torch.cat([torch.cos(t[:, None] * torch.exp(-math.log(1e4) * torch.arange(128) / 128)),
                           torch.sin(t[:, None] * torch.exp(-math.log(1e4) * torch.arange(128) / 128))], dim=1)
    assert torch.allclose(ours, reference, atol=1e-4)  # dtx is DiT's
    diff = (ours - theirs).abs()
    rel_999 = float((ours[999] - theirs[999]).norm() / ours[999].norm())
    print(f"t-embedding /127 vs /128: max |diff| {float(diff.max()):.3f} over t in [0, 999], "
          f"relative L2 at t=999 {rel_999:.3f}, at t=0 {float(diff[0].max()):.1e}")
    assert float(diff[0].max()) == 0.0
    assert 1.9 < float(diff.max()) < 2.0  # derived: max |diff| is 1.98 over t in [0, 999]
    assert 0.9 < rel_999 < 1.1  # derived: the relative L2 difference at t = 999 is ~1.0


def test_diffusers_folder_loads_and_matches_diffusers_where_numerics_agree(diffusers_dit):
    model, folder = diffusers_dit
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    ours, info = load_model_with_info(folder)
    assert info["format"] == "diffusers-dit" and any("128" in n for n in info["notes"])
    assert ours.config.depth == LAYERS and ours.config.hidden_size == HEADS * HEAD_DIM
    assert ours.num_classes == CLASSES and ours.learn_sigma
    x, t, y = inputs()
    with torch.no_grad():
        got = ours(x, t, y)
    same = diffusers_out(model, x, t, y, divisor_128=True, eps=1e-6)
    assert torch.allclose(got, same, atol=2e-5, rtol=0), float((got - same).abs().max())
    # the differences dtx does not take over, each alone
    t_only = diffusers_out(model, x, t, y, eps=1e-6)
    eps_only = diffusers_out(model, x, t, y, divisor_128=True)
    d_t = (got - t_only).abs().amax(dim=(1, 2, 3))
    d_eps = float((got - eps_only).abs().max())
    print(f"dtx vs diffusers DiT forward: /127 timestep features -> max |diff| per sample (t=0, 421, 999) "
          f"{[f'{v:.2e}' for v in d_t.tolist()]}; norm3 eps 1e-5 -> {d_eps:.2e}")
    assert float(d_t[0]) < 2e-5  # t = 0: cos(0) = 1, sin(0) = 0 whatever the divisor
    assert float(d_t[1:].min()) > 1e-3  # elsewhere the features differ
    assert 0 < d_eps < 1e-2
    # diffusers unpatched (its own numerics) differs from dtx by exactly those two effects
    assert not torch.allclose(got, diffusers_out(model, x, t, y), atol=1e-3)


def test_pipeline_folder_brings_its_vae_and_scheduler_to_dtx_sample(diffusers_dit, tmp_path, capsys):
    from diffusers import DDIMScheduler

    from dtx.testing import save_tiny_vae

    model, _ = diffusers_dit
    vae, _ = save_tiny_vae(tmp_path / "vae-src")
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear",
                                                                             clip_sample=False))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded, info = load_model_with_info(tmp_path / "pipe")
    assert info["pipeline"] == str(tmp_path / "pipe")
    data = info["config"]["data_info"]
    assert data["vae"] == str(tmp_path / "pipe" / "vae") and data["latent_scale"] == 0.5
    assert info["config"]["objective"]["noise_schedule"] == "linear"
    code = main(["sample", str(tmp_path / "pipe"), "--classes", "3", "--n-per-class", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)  # 8x8 latents, decoded by the 2x VAE
    # README's three commands: pipeline -> dtx folder -> sample -> back to a DiTPipeline folder
    assert main(["convert", str(tmp_path / "pipe"), str(tmp_path / "dtx")]) == 0
    assert main(["sample", str(tmp_path / "dtx"), "--classes", "1", "--n-per-class", "1", "--steps", "2",
                 "--out", str(tmp_path / "d.png"), "--device", "cpu"]) == 0
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    back = DiTPipeline.from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, back.transformer.state_dict()[k]) for k, v in model.state_dict().items())
    images = back(class_labels=[1], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_bad_folders_are_one_line_errors(diffusers_dit, tmp_path, capsys):
    model, folder = diffusers_dit
    untied = randomize(DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                             num_layers=LAYERS, sample_size=SIZE, num_embeds_ada_norm=CLASSES), 3)
    untied.save_pretrained(tmp_path / "untied")
    assert main(["convert", str(tmp_path / "untied"), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dtx: error:")
    assert "transformer_blocks.1.norm1.emb" in err and "one timestep and label embedder" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({**dict(model.config), "_class_name": "DiTTransformer2DModel",
                                                    "activation_fn": "geglu"}))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert main(["convert", str(broken), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "activation_fn 'geglu'" in err and "config.json" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# -- export -------------------------------------------------------------------------------------------------------

def tiny_dtx_dit(seed: int = 0, **kw):
    options = {"input_size": SIZE, "depth": LAYERS, "hidden_size": HEADS * HEAD_DIM, "num_heads": HEADS,
               "num_classes": CLASSES, **kw}
    model = dtx.create_model("DiT", **options)
    return randomize(model, seed)


def test_export_loads_with_from_pretrained_and_matches(tmp_path, capsys):
    model = tiny_dtx_dit(5)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "127" in out and "3" in out  # both notes: timestep features, guided channels
    assert "127" in (tmp_path / "out" / "README.md").read_text()
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.norm_eps == 1e-6
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
    same = diffusers_out(theirs, x, t, y, divisor_128=True)
    assert torch.allclose(ours, same, atol=2e-5, rtol=0), float((ours - same).abs().max())
    d_t = (ours - diffusers_out(theirs, x, t, y)).abs().amax(dim=(1, 2, 3))
    print(f"exported DiT, diffusers' own forward vs dtx: max |diff| per sample (t=0, 421, 999) "
          f"{[f'{v:.2e}' for v in d_t.tolist()]} (the /127 timestep features only)")
    assert float(d_t[0]) < 2e-5 and float(d_t[1:].min()) > 1e-3
    # and back: diffusers -> dtx gives the same weights
    back = dtx.load_model(tmp_path / "out")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_gaussian_trained_dit_samples_through_dit_pipeline(tmp_path, capsys):
    from PIL import Image

    from dtx.testing import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"c{i % 2}" / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{name: DiT, options: {{patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2}}}}
data:
  name: image-folder
  options: {{root: {tmp_path / 'img'}, image_size: 16}}
  batch_size: 4
  vae: {tmp_path / 'vae'}
objective: {{kind: gaussian}}
sample: {{every: 0, steps: 2}}
""")
    assert main(["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "run"), "--to", "diffusers", str(tmp_path / "pipe")]) == 0
    assert "DiTPipeline" in json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"]
    assert "class 1000" in capsys.readouterr().out  # DiTPipeline's hard-coded null class, noted for 2 classes
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe")
    start = time.perf_counter()
    images = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.0, generator=torch.manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    print(f"DiTPipeline on the exported run: 2 images in {time.perf_counter() - start:.2f} s")


def test_sigma_space_dit_is_refused_with_the_reason(tmp_path, capsys):
    model = tiny_dtx_dit(1, learn_sigma=False)
    save_model(model, tmp_path / "dtx", extra={"objective": {"kind": "karras", "sigma_data": 0.5}})
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sigma space" in err and "c_noise" in err and "EDMEulerScheduler" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, reason", [({"block": "cross-attention"}, "adaLN-Zero"),
                                        ({"num_classes": 0}, "class table"),
                                        ({"input_size": [8, 4]}, "non-square"),
                                        ({}, "pos_embed")])
def test_dits_diffusers_cannot_hold_are_refused(tmp_path, capsys, kw, reason):
    model = tiny_dtx_dit(2, **kw)
    if not kw:  # a position table other than the sin-cos one diffusers rebuilds
        with torch.no_grad():
            model.pos_embed.add_(0.1)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot hold" in err and reason in err


def test_dtx_sample_reproduces_dit_pipeline_with_its_ddim_steps(tmp_path, capsys):
    """A DiTPipeline folder with DDIM: ``dtx sample`` takes the scheduler's leading timesteps (0, T/N, 2T/N, ...),
    not DiT's even sections, so it samples what the pipeline samples from the same seed (diffusers' modules set to
    DiT's timestep divisor and norm eps, the two stated numerics differences)."""
    from diffusers import DDIMScheduler

    from dtx.testing import save_tiny_vae

    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                  out_channels=8, num_layers=LAYERS, sample_size=SIZE, patch_size=2,
                                  num_embeds_ada_norm=1000)  # DiTPipeline's null class is 1000
    tied_embedders(randomize(model, 4))
    vae, _ = save_tiny_vae(tmp_path / "vae-src")
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear",
                                                                             clip_sample=False))
    pipe.save_pretrained(tmp_path / "pipe")
    _, info = load_model_with_info(tmp_path / "pipe")
    assert info["config"]["sample"]["timestep_spacing"] == "leading"
    assert main(["sample", str(tmp_path / "pipe"), "--classes", "3,7", "--n-per-class", "1", "--steps", "4",
                 "--cfg", "4", "--seed", "0", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    ours = np.load(tmp_path / "s.npz")["arr_0"].astype(int)
    for block in pipe.transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    theirs = pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    theirs = np.round(np.clip(theirs, 0, 1) * 255).astype(int)
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert np.abs(ours - theirs).max() <= 1  # uint8 rounding of equal floats
    # DiT's own spacing visits other timesteps: a different sample
    assert main(["sample", str(tmp_path / "pipe"), "--classes", "3,7", "--n-per-class", "1", "--steps", "4",
                 "--cfg", "4", "--seed", "0", "--out", str(tmp_path / "d.png"), "--device", "cpu",
                 "--timestep-spacing", "sections"]) == 0
    assert np.abs(np.load(tmp_path / "d.npz")["arr_0"].astype(int) - theirs).max() > 1


def test_kept_timesteps_of_each_spacing():
    from dtx.training.objectives import kept_timesteps

    assert kept_timesteps(1000, 10, "leading") == list(range(0, 1000, 100))
    assert kept_timesteps(1000, 7, "leading") == [0, 142, 284, 426, 568, 710, 852]  # diffusers: i * (T // N)
    assert kept_timesteps(1000, 4, "sections") == [0, 333, 666, 999]  # DiT: both ends of [0, T-1]
