"""``dtx extract-latents``: encode an image folder (or, with ``--frames``, a video folder) once with a local diffusers
``AutoencoderKL`` into latent shards (``dtx.data.extract``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import parse_device, seed_arg
from ..data.extract import DTYPES, extract_latents
from ..data.images import ImageFolderDataset
from ..data.vae import info_after_vae, load_vae, vae_factors
from ..data.videos import VideoFolderDataset
from ..errors import DataError
from ..io import check_output_path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (or a pipeline folder with vae/)")
    p.add_argument("--data", required=True, help="image folder with one subfolder per class (with --frames: a video "
                   "folder of video files or frame-image folders, in class subfolders or flat)")
    p.add_argument("--out", required=True, help="output folder for the latent shards")
    p.add_argument("--image-size", type=int, default=256, help="pixel size after ADM centre crop (default 256)")
    p.add_argument("--frames", type=int, default=None,
                   help="read --data as videos and store clips of this many frames, encoded frame by frame")
    p.add_argument("--frame-interval", type=int, default=None,
                   help="with --frames: take every K-th frame of each video's first clip (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images (or clips) per encoder batch")
    p.add_argument("--shard-size", type=int, default=1024, help="latents (images or clips) per shard file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--mode", dest="sample_posterior", action="store_false",
                      help="store the posterior mode (default; deterministic)")
    mode.add_argument("--sample-posterior", dest="sample_posterior", action="store_true",
                      help="store one seeded posterior sample, as DiT's online encoder draws")
    p.set_defaults(sample_posterior=False)
    p.add_argument("--flips", action="store_true",
                   help="also store latents of the mirrored images, so training keeps ADM's random flip")
    p.add_argument("--unconditional", action="store_true", help="ignore class subfolders (no labels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of the latents")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the posterior samples")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    for name in ("image_size", "batch_size", "shard_size", "frames", "frame_interval"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_output_path(args.out, "--out", folder=True)
    frames = getattr(args, "frames", None)
    if frames is None:
        if getattr(args, "frame_interval", None) is not None:
            raise DataError("--frame-interval needs --frames (the clip length)")
        data = ImageFolderDataset(args.data, image_size=args.image_size, flip=False, unconditional=args.unconditional)
    else:
        data = VideoFolderDataset(args.data, image_size=args.image_size, frames=frames,
                                  frame_interval=args.frame_interval or 1, unconditional=args.unconditional)
    device = parse_device(args.device)
    vae = load_vae(args.vae)
    info_after_vae(data.info, vae, args.vae)  # the VAE takes the data's channels (one ConfigError otherwise)
    vae.to(device)
    paths = extract_latents(vae, data, args.out, vae_name=str(Path(args.vae).expanduser().resolve()),
                            batch_size=args.batch_size, shard_size=args.shard_size,
                            sample_posterior=args.sample_posterior, flips=args.flips, dtype=args.dtype,
                            seed=args.seed, workers=args.workers, progress=not args.no_progress)
    scale, shift = vae_factors(vae)
    what = "latents" if frames is None else f"{frames}-frame clip latents"
    print(f"wrote {len(data)} {what} in {len(paths)} shard(s) to {args.out} (scale_factor {scale:g}"
          + (f", shift_factor {shift:g}" if shift else "") + ")")
    return 0
