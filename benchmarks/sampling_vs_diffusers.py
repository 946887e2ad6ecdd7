"""dtx sampling vs diffusers' pipelines on the same weights, sampler and steps: seconds per sample, peak memory,
and the largest difference between the two outputs.

    python benchmarks/sampling_vs_diffusers.py                 # DiT-S/2, PixArt-shaped and Latte-1-shaped models
    python benchmarks/sampling_vs_diffusers.py --models dit --repeats 3

Each model is built by diffusers with random weights at a realistic shape and saved as a pipeline folder (a tiny
AutoencoderKL, and for the text models a tiny random T5, so that the denoiser dominates as it does at full size);
dtx loads the same folder. Both sides draw the same initial noise and run the folder's DDIM scheduler (leading
timesteps, as the pipelines do) for the same steps with the same guidance. The timings alternate between the two
sides in one process (median of ``--repeats``), after one warm-up each. dtx runs as ``dtx sample`` does: no
autograd, condition work once per run, guidance terms in one batched forward, and ``--compile`` where named.
DiT's numerics: diffusers computes timestep features with a /127 divisor and norm eps 1e-5 where DiT has /128 and
1e-6 (see the DiT package's diffusers interop); for the output check diffusers' modules are set to DiT's values.
Latte-1: LattePipeline cuts both captions to the prompt's token count and attends the null caption's padding, where
dtx masks padding; outputs are compared without guidance, where the two agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- the models, built by diffusers ------------------------------------------------------------------------------------

def dit_folder(root: Path) -> Path:
    """DiT-S/2 at 256 px (32x32x4 latents, 1000 classes), DDIM with DiT's linear betas."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from dtx.testing import randomize_parameters, save_tiny_vae

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                  num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    randomize_parameters(model, 0, std=0.02)
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:  # diffusers' converter copies DiT's one embedder into every block
        block.norm1.emb.load_state_dict(first)
    vae, _ = save_tiny_vae(root / "vae-src")
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
    pipe.save_pretrained(root / "dit")
    return root / "dit"


def dit_diffusers(folder: Path, classes: list[int], steps: int, cfg: float, seed: int) -> Callable[[], torch.Tensor]:
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for block in pipe.transformer.transformer_blocks:  # DiT's numerics (see the module docstring)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6

    def run() -> torch.Tensor:
        with torch.no_grad():
            images = pipe(class_labels=classes, num_inference_steps=steps, guidance_scale=cfg,
                          generator=torch.Generator().manual_seed(seed), output_type="np").images
        return torch.from_numpy(images)

    return run


def dtx_runner(folder: Path, request: Any, steps: int, cfg: float, seed: int, sampler: str,
               compile_model: bool) -> Callable[[], torch.Tensor]:
    """``dtx sample FOLDER`` in process: the same loading, request and one-sampling-path as the command."""
    from dtx.data.vae import load_vae
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import generate, load_for_sampling

    setup = load_for_sampling(folder)
    if compile_model:
        import dataclasses

        setup = dataclasses.replace(setup, model=torch.compile(setup.model))
    sample = resolve_sample(setup.cfg.sample, {"steps": steps, "cfg": cfg, "sampler": sampler})
    vae = load_vae(setup.info.vae)

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = generate(setup, request(), sample, per_subject=1, seed=seed, vae=vae)
        return ((out.x.clamp(-1, 1) + 1) / 2).movedim(out.channel_dim, -1)

    return run


WORDS = ("a", "an", "the", "of", "on", "photo", "cat", "dog", "red", "blue", "running", "in", "snow")
PROMPTS = ["a photo of a red cat", "a blue dog running in the snow"]
T5_WIDTH = 64


def tiny_t5() -> tuple[Any, Any]:
    """A T5 tokenizer over ``WORDS`` built in memory and a random 2-layer T5 encoder (the text work is done once per
    run on both sides, so its size does not matter here)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=T5_WIDTH, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return tokenizer, T5EncoderModel(config).eval()


def text_folder(root: Path, kind: str, layers: int, frames: int) -> Path:
    """A PixArt-alpha-shaped (width 1152 = 16 heads x 72, 256 px: 32x32x4 latents, 120 caption tokens) or
    Latte-1-shaped (the same width, ``frames`` frames of 32x32x4) pipeline with ``layers`` blocks, DDIM."""
    from diffusers import (DDIMScheduler, LattePipeline, LatteTransformer3DModel, PixArtAlphaPipeline,
                           PixArtTransformer2DModel)

    from dtx.testing import randomize_parameters, save_tiny_vae

    shape = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
                 cross_attention_dim=1152, attention_bias=True, sample_size=32, patch_size=2,
                 activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                 norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=T5_WIDTH)
    tokenizer, encoder = tiny_t5()
    vae, _ = save_tiny_vae(root / "vae-src")
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    if kind == "pixart":
        model = PixArtTransformer2DModel(**shape, use_additional_conditions=False, interpolation_scale=1)
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                                   transformer=randomize_parameters(model, 2, std=0.02))
    else:
        model = LatteTransformer3DModel(**shape, video_length=frames)
        pipe = LattePipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                             transformer=randomize_parameters(model, 3, std=0.02))
    pipe.save_pretrained(root / kind)
    return root / kind


def text_diffusers(folder: Path, kind: str, frames: int, steps: int, cfg: float, seed: int
                   ) -> Callable[[], torch.Tensor]:
    from diffusers import LattePipeline, PixArtAlphaPipeline

    side = 32 * 2  # the tiny VAE's 2x upsampling
    if kind == "pixart":
        pipe = PixArtAlphaPipeline.from_pretrained(folder)
        extra: dict[str, Any] = {"use_resolution_binning": False}
    else:
        pipe = LattePipeline.from_pretrained(folder)
        extra = {"video_length": frames}
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        if kind == "latte":  # diffusers' latents are [B, C, F, H, W], dtx's [B, F, C, H, W]: the same draw, moved
            noise = torch.randn((1, frames, 4, 32, 32), generator=torch.Generator().manual_seed(seed))
            extra["latents"] = noise.transpose(1, 2)
        with torch.no_grad():
            out = pipe(PROMPTS[:1], num_inference_steps=steps, guidance_scale=cfg, height=side, width=side,
                       generator=torch.Generator().manual_seed(seed), output_type="pt", clean_caption=False,
                       **extra)
        x = out.images if kind == "pixart" else out.frames
        return x.movedim(-3, -1)  # channels last, as dtx's side

    return run


def bench_text(root: Path, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    from dtx.conditioning import SampleRequest

    frames = args.frames if kind == "latte" else 0
    folder = text_folder(root, kind, args.layers, frames)
    theirs = text_diffusers(folder, kind, frames, args.steps, args.cfg, args.seed)
    request = lambda: SampleRequest(prompts=PROMPTS[:1])  # noqa: E731
    ours = {"dtx": dtx_runner(folder, request, args.steps, args.cfg, args.seed, "ddim", False)}
    if args.compile:
        ours["dtx --compile"] = dtx_runner(folder, request, args.steps, args.cfg, args.seed, "ddim", True)
    name = (f"PixArt-alpha-shaped 256px, {args.layers} blocks" if kind == "pixart" else
            f"Latte-1-shaped {frames}x256px, {args.layers} blocks")
    check = None
    if kind == "latte":  # LattePipeline attends the padding of the null caption (cut to the prompt's length), dtx
        # masks it: with guidance the unconditional terms differ by design, so outputs are compared without guidance
        check = (text_diffusers(folder, kind, frames, args.steps, 1.0, args.seed),
                 dtx_runner(folder, request, args.steps, 1.0, args.seed, "ddim", False))
    return _compare(name, theirs, ours, args.repeats, 1, check)


def _compare(name: str, theirs: Callable[[], torch.Tensor], ours: dict[str, Callable[[], torch.Tensor]],
             repeats: int, n: int, check: tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]] | None = None
             ) -> dict[str, Any]:
    """Time both sides (alternating, after a warm-up) and compare outputs: the timed runs' own, or ``check``'s
    (diffusers, dtx) pair where the timed settings differ by a stated design choice."""
    from dtx.benchmarking import peak_memory_mb

    ref = theirs()  # warm-up (and the output to compare)
    outs = {label: fn() for label, fn in ours.items()}
    if check is not None:
        ref, checked = check[0](), check[1]()
        outs = {label: checked for label in outs}
    times: dict[str, list[float]] = {"diffusers": [], **{label: [] for label in ours}}
    for _ in range(repeats):
        for label, fn in (("diffusers", theirs), *ours.items()):
            times[label].append(_timed(fn)[1])
    # the peak of the tensors one call allocates (torch's profiler): the resident set hides it, as freed memory is
    # reused; a run of its own after the timings
    peaks = {label: peak_memory_mb(fn, "cpu") for label, fn in (("diffusers", theirs), *ours.items())}
    base = statistics.median(times["diffusers"])
    row: dict[str, Any] = {"model": name, "samples": n, "diffusers_s_per_sample": round(base / n, 3),
                           "diffusers_peak_mib": round(peaks["diffusers"], 1)}
    for label in ours:
        t = statistics.median(times[label])
        diff = float((outs[label].float() - ref.float().reshape(outs[label].shape)).abs().max())
        row[label] = {"s_per_sample": round(t / n, 3), "ratio": round(t / base, 3),
                      "peak_mib": round(peaks[label], 1), "max_abs_diff": diff}
    return row


def bench_dit(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dtx.conditioning import SampleRequest

    folder = dit_folder(root)
    classes = list(range(args.n))
    theirs = dit_diffusers(folder, classes, args.steps, args.cfg, args.seed)
    request = lambda: SampleRequest(classes=classes)  # noqa: E731
    ours = {"dtx": dtx_runner(folder, request, args.steps, args.cfg, args.seed, "ddim", False)}
    if args.compile:
        ours["dtx --compile"] = dtx_runner(folder, request, args.steps, args.cfg, args.seed, "ddim", True)
    return _compare("DiT-S/2 256px", theirs, ours, args.repeats, args.n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["dit", "pixart", "latte"], choices=["dit", "pixart", "latte"])
    p.add_argument("--layers", type=int, default=2, help="blocks of the PixArt- and Latte-1-shaped models (Latte: "
                                                         "one spatial and one temporal per two)")
    p.add_argument("--frames", type=int, default=16, help="frames of the Latte-1-shaped model")
    p.add_argument("--n", type=int, default=2, help="samples per run")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time dtx with torch.compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", type=Path, default=Path("/tmp/dtx-bench-diffusers"))
    p.add_argument("--out", type=Path, help="also write the rows as a Markdown table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        row = bench_dit(args.root, args) if name == "dit" else bench_text(args.root, args, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(table(rows, args) + "\n")
    return 0


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"DDIM {args.steps} steps, guidance {args.cfg:g}, {args.threads} threads, median of {args.repeats} "
             f"interleaved runs.", "",
             "| model | side | s per sample | dtx / diffusers | peak tensor memory (MiB) | max abs diff of outputs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | diffusers pipeline | {r['diffusers_s_per_sample']:.3f} | 1 | "
                     f"{r['diffusers_peak_mib']:.0f} | |")
        for label, v in r.items():
            if isinstance(v, dict):
                lines.append(f"| {r['model']} | {label} | {v['s_per_sample']:.3f} | {v['ratio']:.2f} | "
                             f"{v['peak_mib']:.0f} | {v['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
