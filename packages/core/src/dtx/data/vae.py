"""The one home of VAE handling: load a local diffusers ``AutoencoderKL``, read its factors, encode pixels to scaled
latents and decode them back, for images ``[B, C, H, W]`` and video clips ``[B, F, C, H, W]`` alike.

Latents are ``(z - shift_factor) * scaling_factor`` with the factors from the VAE's own config (0.18215 and no shift
for the SD VAE); decoding inverts that. Video clips are coded frame by frame: ``[B, F, ...]`` is flattened to
``B * F`` frames, coded in chunks of at most ``FRAME_CHUNK`` frames (to bound memory) and reshaped back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError, ShapeError
from .info import DataInfo

#: most frames one ``vae.encode`` / ``vae.decode`` call sees when coding video clips
FRAME_CHUNK = 32


def load_vae(path: str | Path) -> Any:
    """Load a diffusers ``AutoencoderKL`` from a local folder (or its ``vae/`` subfolder); never downloads."""
    from diffusers import AutoencoderKL

    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"VAE path {path} is not a local folder; pass a diffusers AutoencoderKL directory "
                              f"(saved with save_pretrained); hub ids are not downloaded")
    subfolder = None
    if not (root / "config.json").is_file():
        if not (root / "vae" / "config.json").is_file():
            raise CheckpointError(f"no config.json in {root} (nor in {root / 'vae'}): not a diffusers VAE folder")
        subfolder = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load an AutoencoderKL from {root}: {type(exc).__name__}: {exc}") from exc
    return vae.eval().requires_grad_(False)


def vae_factors(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from the VAE config; the shift is 0 for VAEs without one."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_downsample(vae: Any) -> int:
    """The pixel-to-latent factor of each spatial side: ``2 ** (len(block_out_channels) - 1)`` (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, what: str) -> torch.Tensor:
    """``fn`` on a batch ``[B, C, H, W]`` as is, or on ``[B, F, C, H, W]`` frame by frame in chunks."""
    if x.dim() == 4:
        return fn(x)
    if x.dim() != 5:
        raise ShapeError(f"{what} takes [B, C, H, W] images or [B, F, C, H, W] clips, got shape {tuple(x.shape)}")
    b, f = x.shape[:2]
    flat = x.reshape(b * f, *x.shape[2:])
    out = torch.cat([fn(flat[i:i + FRAME_CHUNK]) for i in range(0, b * f, FRAME_CHUNK)])
    return out.reshape(b, f, *out.shape[1:])


@torch.no_grad()
def encode(vae: Any, x: torch.Tensor, sample_posterior: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents ``(z - shift) * scale`` of pixels ``x`` in [-1, 1] (``[B, C, H, W]`` or ``[B, F, C, H, W]``),
    with ``z`` the posterior mode or one posterior sample drawn from ``generator``; float32."""
    scale, shift = vae_factors(vae)

    def one(frames: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(frames.to(vae.device, vae.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return (z.float() - shift) * scale

    return _per_frame(one, x, "encode")


@torch.no_grad()
def decode(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1] from scaled latents (``[B, C, h, w]`` or ``[B, F, C, h, w]``):
    ``vae.decode(z / scale + shift)``, clamped."""
    scale, shift = vae_factors(vae)

    def one(frames: torch.Tensor) -> torch.Tensor:
        return vae.decode((frames / scale + shift).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)

    return _per_frame(one, z, "decode")


def check_decodes(vae: Any, channels: int, what: str) -> None:
    """Refuse a VAE (named ``what``) whose latents do not have the ``channels`` of the samples it is to decode, such
    as a VAE given to a model that samples pixels."""
    latent = int(getattr(vae.config, "latent_channels", channels))
    if latent != channels:
        pixels = " (images: a pixel model needs no VAE)" if channels in (1, 3) else ""
        raise ConfigError(f"{what} decodes {latent}-channel latents, but this model samples {channels} "
                          f"channel(s){pixels}")


def info_after_vae(info: DataInfo, vae: Any, vae_path: str) -> DataInfo:
    """The ``DataInfo`` of pixel data ``info`` once ``vae`` (loaded from ``vae_path``) encodes it on the fly."""
    if info.is_latent:
        raise ConfigError(f"the data are already VAE latents (vae {info.vae!r}); they cannot be encoded again "
                          f"with {vae_path}")
    in_channels = int(getattr(vae.config, "in_channels", info.channels))
    if info.channels != in_channels:
        raise ConfigError(f"the data have {info.channels} channel(s) but the VAE {vae_path} takes {in_channels}")
    scale, shift = vae_factors(vae)
    return info.encoded(int(vae.config.latent_channels), vae_downsample(vae), scale, shift, str(vae_path))


__all__ = ["FRAME_CHUNK", "check_decodes", "decode", "encode", "info_after_vae", "load_vae", "vae_downsample",
           "vae_factors"]
