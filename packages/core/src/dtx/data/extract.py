"""Latent extraction (``dtx extract-latents``, in ``dtx.commands.extract_latents``): encode an image folder (or, with ``--frames``, a video folder) once with a local diffusers
``AutoencoderKL`` into latent shards.

Latents are ``(z - shift_factor) * scaling_factor`` from the VAE's own config (0.18215 and no shift for the SD VAE),
with ``z`` the posterior mode (default) or one seeded posterior sample; video clips are encoded frame by frame into
``[F, C, h, w]`` (see ``dtx.data.vae``). Shards are written atomically, so an interrupted run can be resumed: shards
already present with the same settings are kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..errors import DataError
from . import CarryErrors, collate_carrying, raise_carried
from .images import ImageFolderDataset
from .latents import SHARD_GLOB, read_shard_metadata, shard_name, write_shard
from .vae import encode, info_after_vae, load_vae, vae_factors  # their home is dtx.data.vae; still importable here
from .videos import VideoFolderDataset

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: metadata that must agree between an existing output folder and a new run
SETTINGS = ("scale_factor", "shift_factor", "vae", "source", "image_size", "posterior", "classes", "shard_size",
            "total", "seed", "flips", "dtype", "frames", "frame_interval")


def extract_latents(vae: Any, data: ImageFolderDataset | VideoFolderDataset, out: str | Path, *,
                    vae_name: str = "", batch_size: int = 16, shard_size: int = 1024, sample_posterior: bool = False,
                    flips: bool = False, dtype: str = "float32", seed: int = 0, workers: int = 0,
                    progress: bool = True) -> list[Path]:
    """Encode every image (or clip, frame by frame) of ``data`` (crop, no random flip) into shards under ``out``;
    returns the shard paths."""
    from tqdm import tqdm

    if data.flip:
        raise DataError("extract latents from a dataset built with flip=False (use flips=True to store both)")
    frames = getattr(data, "frames", None)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*-shard_*"):  # left by a killed run (dtx.io.atomic_write's temporary names)
        stale.unlink()
    scale, shift = vae_factors(vae)
    settings = {"scale_factor": scale, "shift_factor": shift, "vae": vae_name, "source": str(data.root.resolve()),
                "image_size": data.image_size, "posterior": "sample" if sample_posterior else "mode",
                "classes": data.classes, "shard_size": shard_size, "total": len(data), "seed": seed,
                "flips": flips, "dtype": dtype}
    if frames is not None:
        settings.update(frames=frames, frame_interval=data.frame_interval)
    for existing in sorted(out.glob(SHARD_GLOB)):
        meta = read_shard_metadata(existing)
        diff = [k for k in SETTINGS if meta.get(k) != settings.get(k)]
        if diff:
            raise DataError(f"{out} already holds latents written with different {', '.join(diff)} "
                            f"({existing.name}); use an empty --out folder")
    paths = []
    bar = tqdm(total=len(data), desc="extract-latents", unit="img" if frames is None else "clip",
               disable=not progress)
    for k in range(math.ceil(len(data) / shard_size)):
        path = out / shard_name(k)
        indices = range(k * shard_size, min(len(data), (k + 1) * shard_size))
        paths.append(path)
        if path.exists():
            bar.update(len(indices))
            continue
        generator = torch.Generator(vae.device).manual_seed(seed + k)
        loader = DataLoader(CarryErrors(Subset(data, indices)), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_carrying)
        parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flipped": [], "labels": []}
        for batch in map(raise_carried, loader):
            x = batch["x"]
            parts["latents"].append(encode(vae, x, sample_posterior, generator).to(DTYPES[dtype]).cpu())
            if flips:
                parts["latents_flipped"].append(
                    encode(vae, x.flip(-1), sample_posterior, generator).to(DTYPES[dtype]).cpu())
            parts["labels"].append(batch["y"] if "y" in batch else torch.full((len(x),), -1, dtype=torch.int64))
            bar.update(len(x))
        write_shard(path, {key: torch.cat(v) for key, v in parts.items() if v}, settings)
    bar.close()
    return paths
