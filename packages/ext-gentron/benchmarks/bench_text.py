"""What text conditioning costs GenTron, measured side by side in one process (ratios, not timed tests).

1. Training step (forward + backward + AdamW) of the ``gentron-digits`` model on a batch of captioned digits, with the
   text encoder run on every batch (offline MiniLM, no cache) vs the same batch's encodings pre-extracted
   (``dtx_gentron.text_cache``: what the training loop reads from shards).
2. Sampling step of motion-free guidance on a T2V model (three condition sets: e(0,0), e(0,c_M), e(c_T,c_M)):
   one batched forward over all terms (``dtx.diffusion.guidance.guided``, what ``dtx sample`` runs) vs three
   separate forwards, per clip.

    python packages/ext-gentron/benchmarks/bench_text.py [--batch 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from dtx.benchmarking import timed
from dtx.diffusion.guidance import combine_guidance, guided

MODEL = dict(input_size=32, patch_size=4, in_channels=3, hidden_size=192, depth=6, num_heads=6, context_dim=384,
             text_length=20, learn_sigma=False)


def training_steps(batch: int, warmup: int, repeats: int) -> dict[str, float]:
    from dtx_gentron.data import CaptionedDigits
    from dtx_gentron.model import build_gentron
    from dtx_gentron.text import TextConditioner

    data = CaptionedDigits("train")
    items = [data[i] for i in range(batch)]
    x = torch.stack([it["x"] for it in items])
    captions = {"text": [it["text"] for it in items]}
    encoder = TextConditioner(max_length=MODEL["text_length"])
    cached = encoder.encode(captions, torch.device("cpu"))
    model = build_gentron(**MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = torch.randint(0, 1000, (batch,))

    def step(text: dict[str, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        model(x, t, **text).square().mean().backward()
        opt.step()

    run_encoder = timed(lambda: step(encoder.encode(captions, torch.device("cpu"))), lambda: None, warmup, repeats)
    pre_extracted = timed(lambda: step(cached), lambda: None, warmup, repeats)
    encode_only = timed(lambda: encoder.encode(captions, torch.device("cpu")), lambda: None, warmup, repeats)
    return {"batch": batch, "step_encoder_ms": round(run_encoder[0], 1), "step_pre_extracted_ms": round(pre_extracted[0], 1),
            "encoder_ms": round(encode_only[0], 1), "encoder_step_ratio": round(run_encoder[0] / pre_extracted[0], 2)}


def guidance_forwards(clips: int, warmup: int, repeats: int) -> dict[str, float]:
    from dtx_gentron.model import build_gentron

    model = build_gentron(**MODEL, num_frames=8).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(clips, 8, 3, 32, 32, generator=gen)
    t = torch.full((clips,), 500)
    text = {"context": torch.randn(clips, 20, 384, generator=gen), "context_mask": torch.ones(clips, 20, dtype=torch.bool),
            "pooled": torch.randn(clips, 384, generator=gen)}
    null = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in text.items()}
    on, off = torch.zeros(clips, dtype=torch.bool), torch.ones(clips, dtype=torch.bool)
    conds = [{**null, "motion_free": off}, {**null, "motion_free": on}, {**text, "motion_free": on}]
    scales = [1.2, 7.5]
    batched = guided(model, conds, scales, channel_dim=2)

    def separate() -> torch.Tensor:
        return combine_guidance([model(x, t, **c) for c in conds], scales, channel_dim=2)

    with torch.no_grad():
        torch.testing.assert_close(batched(x, t), separate(), rtol=1e-4, atol=1e-4)  # the same guided output
        one = timed(lambda: batched(x, t), lambda: None, warmup, repeats)
        three = timed(separate, lambda: None, warmup, repeats)
    return {"clips": clips, "batched_ms_per_clip": round(one[0] / clips, 2),
            "separate_ms_per_clip": round(three[0] / clips, 2), "separate_over_batched": round(three[0] / one[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"training": training_steps(args.batch, args.warmup, args.repeats)}))
    print(json.dumps({"mfg_sampling": guidance_forwards(args.clips, args.warmup, args.repeats)}))


if __name__ == "__main__":
    main()
