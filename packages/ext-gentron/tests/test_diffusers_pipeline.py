"""Whole diffusers pipeline folders through ``dtx sample``: tiny random PixArtAlphaPipeline and LattePipeline folders
(T5 encoder + T5 tokenizer, AutoencoderKL, transformer, scheduler) built and saved by diffusers and transformers
themselves sample from a prompt offline; the caption context the model receives is the folder's own T5 output for the
prompt and for the empty caption (the guidance null), tokenised at the pipeline's max_sequence_length, with the
padding masked. Also the text conditioner's ``tokenizer`` option (a tokenizer kept apart from its encoder)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, LattePipeline,  # noqa: E402
                       LatteTransformer3DModel, PixArtAlphaPipeline, PixArtTransformer2DModel)
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

from dtx.cli import main  # noqa: E402
from dtx.errors import ConfigError  # noqa: E402
from dtx.models import load_model_with_info  # noqa: E402
from dtx.testing import randomize_parameters  # noqa: E402
from dtx_gentron.pixart import PixArt  # noqa: E402
from dtx_gentron.text import TextConditioner  # noqa: E402

WORDS = ("a", "an", "the", "of", "on", "photo", "cat", "dog", "red", "blue", "running")
WIDTH, SIZE, FRAMES = 12, 8, 3  # T5 width = caption_channels; latent side; Latte clip length
PROMPT = "a photo of a red cat"
#: tokens per caption in diffusers' PixArtAlphaPipeline (LattePipeline.encode_prompt hard-codes the same 120)
MAX_LENGTH = inspect.signature(PixArtAlphaPipeline.encode_prompt).parameters["max_sequence_length"].default
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                   cross_attention_dim=16, attention_bias=True, sample_size=SIZE, patch_size=2,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=WIDTH)


def tiny_t5(seed: int = 0) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A T5 (unigram, sentencepiece-style) tokenizer over ``WORDS`` built in memory, and a random 2-layer T5
    encoder of width ``WIDTH``: no download, no sentencepiece model file."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=WIDTH, d_kv=WIDTH // 2, d_ff=2 * WIDTH, num_layers=2,
                      num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    """A random AutoencoderKL with 4 latent channels and a 2x downsample."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=2 * SIZE)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_parameters(model, seed, std=0.1, trainable_only=False)


def save_pipeline(kind: str, out: Path) -> Path:
    """A tiny PixArtAlphaPipeline (DPM-Solver++, as PixArt-alpha ships) or LattePipeline (DDIM, as Latte-1) folder."""
    tokenizer, encoder = tiny_t5()
    if kind == "pixart":
        transformer = PixArtTransformer2DModel(**TRANSFORMER, use_additional_conditions=False, interpolation_scale=1)
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(),
                                   transformer=randomize(transformer, 2), scheduler=DPMSolverMultistepScheduler())
    else:
        transformer = LatteTransformer3DModel(**TRANSFORMER, video_length=FRAMES)
        pipe = LattePipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(),
                             transformer=randomize(transformer, 3), scheduler=DDIMScheduler())
    pipe.save_pretrained(out)
    return out


def spy_on_context(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Record the caption keywords of every PixArt forward call."""
    calls: list[dict[str, torch.Tensor]] = []
    forward = PixArt.forward

    def recording(self: PixArt, x: torch.Tensor, t: Any, context: Any = None, context_mask: Any = None,
                  **kwargs: Any) -> torch.Tensor:
        calls.append({"context": context.detach().clone(), "context_mask": context_mask.detach().clone()})
        return forward(self, x, t, context, context_mask, **kwargs)

    monkeypatch.setattr(PixArt, "forward", recording)
    return calls


def t5_reference(pipe: Path, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own T5 output and attention mask for ``texts``, through transformers alone."""
    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer", local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(pipe / "text_encoder", local_files_only=True).eval()
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden, tokens.attention_mask.bool()


def check_context(calls: list[dict[str, torch.Tensor]], pipe: Path) -> None:
    """Each model call saw [null row; prompt row]: T5("") and T5(PROMPT) at the pipeline's max_sequence_length,
    padding masked (False in context_mask) and zero."""
    want, want_mask = t5_reference(pipe, ["", PROMPT], MAX_LENGTH)
    assert calls
    for call in calls:
        context, mask = call["context"], call["context_mask"]
        assert context.shape == (2, MAX_LENGTH, WIDTH) and mask.dtype == torch.bool
        assert torch.equal(mask, want_mask)  # padding tokens are masked
        assert 1 <= int(mask[0].sum()) < int(mask[1].sum()) < MAX_LENGTH  # "" is just </s>; the prompt is padded
        assert torch.allclose(context[mask], want[mask], atol=1e-6)
        assert not context[~mask].any()


def run_sample(pipe: Path, out: Path, capsys: pytest.CaptureFixture, cfg: str) -> dict[str, Any]:
    code = main(["sample", str(pipe), "--prompt", PROMPT, "--cfg", cfg, "--n-per-class", "1", "--steps", "3",
                 "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_pixart_pipeline_folder_samples_from_a_prompt_with_its_own_t5_vae_and_scheduler(tmp_path, capsys,
                                                                                         monkeypatch):
    pipe = save_pipeline("pixart", tmp_path / "pipe")
    _, info = load_model_with_info(pipe)
    config = info["config"]
    text = config["conditioning"]["conditioners"]["text"]
    assert text["name"] == "text" and text["options"]["encoder"] == str(pipe / "text_encoder")
    assert text["options"]["tokenizer"] == str(pipe / "tokenizer") and text["options"]["null"] == "empty"
    assert config["data_info"]["vae"] == str(pipe / "vae")
    scheduler = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert config["sample"]["sampler"] == "dpm-solver"
    assert config["sample"]["sampler_options"] == {"solver_order": scheduler["solver_order"],
                                                   "algorithm_type": scheduler["algorithm_type"]}
    assert config["sample"]["steps"] == inspect.signature(PixArtAlphaPipeline.__call__).parameters[
        "num_inference_steps"].default

    calls = spy_on_context(monkeypatch)
    written = run_sample(pipe, tmp_path / "out" / "x.png", capsys, "4.5")
    assert Path(written["grid"]).is_file() and Path(written["prompts"]).read_text() == PROMPT + "\n"
    images = np.load(written["npz"])["arr_0"]
    assert images.shape == (1, 2 * SIZE, 2 * SIZE, 3)  # decoded by the pipeline's VAE (2x)
    assert len(calls) == 3 - 1  # DPM-Solver: K - 1 model calls, each on [null; prompt]
    check_context(calls, pipe)

    # the pair is what diffusers' own pipeline encodes (prompt, and "" as its default negative prompt)
    theirs = PixArtAlphaPipeline.from_pretrained(pipe, local_files_only=True)
    embeds, mask, neg, neg_mask = theirs.encode_prompt(PROMPT, device="cpu", clean_caption=False)
    ours, our_mask = calls[0]["context"], calls[0]["context_mask"]
    assert torch.equal(our_mask, torch.cat([neg_mask, mask]).bool())
    assert torch.allclose(ours[our_mask], torch.cat([neg, embeds])[our_mask], atol=1e-6)


def test_latte_pipeline_folder_samples_a_video_from_a_prompt(tmp_path, capsys, monkeypatch):
    pipe = save_pipeline("latte", tmp_path / "pipe")
    calls = spy_on_context(monkeypatch)
    written = run_sample(pipe, tmp_path / "out" / "clip.png", capsys, "7.5")
    assert len(calls) == 3  # DDIM (the pipeline's scheduler): one call per step
    check_context(calls, pipe)
    videos = np.load(written["npz"])["arr_0"]
    assert videos.shape == (1, FRAMES, 2 * SIZE, 2 * SIZE, 3)
    assert Path(written["grid"]).is_file()
    assert sorted(Path(p).suffix for p in written["videos"]) == [".gif", ".mp4"]
    assert all(Path(p).stat().st_size > 0 for p in written["videos"])


def test_pipeline_with_a_broken_tokenizer_folder_is_one_error_naming_the_option(tmp_path, capsys):
    pipe = save_pipeline("pixart", tmp_path / "pipe")
    for path in (pipe / "tokenizer").iterdir():
        path.unlink()
    capsys.readouterr()  # diffusers' save progress bars
    code = main(["sample", str(pipe), "--prompt", PROMPT, "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    lines = capsys.readouterr().err.strip().splitlines()  # transformers' weight-loading bar may come first
    err = lines[-1]
    assert code == 2 and err.startswith("dtx: error:") and sum("dtx:" in line for line in lines) == 1
    assert "option tokenizer" in err and str(pipe / "tokenizer") in err


def test_tokenizer_option_loads_the_tokenizer_from_a_separate_folder(tmp_path):
    tokenizer, encoder = tiny_t5(seed=4)
    encoder.save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "tok")
    cond = TextConditioner(encoder=str(tmp_path / "encoder"), tokenizer=str(tmp_path / "tok"), max_length=10)
    assert cond.options["tokenizer"] == str(tmp_path / "tok")
    got = cond.encode({"text": [PROMPT, "the dog"]}, torch.device("cpu"))
    tokens = tokenizer([PROMPT, "the dog"], padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        want = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    mask = tokens.attention_mask.bool()
    assert torch.equal(got["context_mask"], mask)
    assert torch.allclose(got["context"][mask], want[mask], atol=1e-6)

    # without the option the encoder's folder, which holds no tokenizer, is refused (not a silent empty tokenizer)
    with pytest.raises(ConfigError, match="option encoder: .* holds no tokenizer.*give option tokenizer"):
        TextConditioner(encoder=str(tmp_path / "encoder"), max_length=10)


@pytest.mark.parametrize("value, match", [("", "option tokenizer must be a hub id or a folder"),
                                          (3, "option tokenizer must be a hub id or a folder"),
                                          ("./no-such-tokenizer", "option tokenizer './no-such-tokenizer': no such")])
def test_tokenizer_option_is_checked_at_the_boundary(encoders, value, match):
    with pytest.raises(ConfigError, match=match):
        TextConditioner(encoder=encoders["t5"], tokenizer=value)
