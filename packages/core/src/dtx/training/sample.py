"""Sampling from trained runs: rebuild a model from a run folder or checkpoint, draw class-conditional samples with
any registered sampler, and write them as a PNG grid and an ``.npz`` archive for evaluation.

The archive follows ADM/DiT: ``arr_0`` is uint8 NHWC with ``clamp(127.5 x + 128, 0, 255)``; ``labels`` is int64 [N].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import TrainConfig, config_from_dict
from .objectives import Objective, build_objective, class_conds

GRID_TILE_MIN = 32  # small images are enlarged (nearest) to at least this many pixels per tile in PNG grids


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] to uint8 NHWC, with the archives' ``clamp(127.5 x + 128, 0, 255)``."""
    from ..evaluation.report import to_uint8 as quantize

    return quantize(images.float()).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Tile ``images`` ([N, C, H, W] in [-1, 1]) ``nrow`` per row with a 1-pixel gap and write a PNG."""
    from PIL import Image

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    zoom = max(1, math.ceil(GRID_TILE_MIN / max(h, w)))
    arr = arr.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w = h * zoom, w * zoom
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def save_npz(images: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> Path:
    """``arr_0`` uint8 NHWC and, for class-conditional samples, ``labels`` int64 [N]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = labels.cpu().to(torch.int64).numpy()
    np.savez(path, **arrays)
    return path


@torch.no_grad()
def decode_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from scaled latents: ``decode(z / scaling_factor + shift_factor)``."""
    from ..data.extract import vae_factors

    scale, shift = vae_factors(vae)
    out = vae.decode((z / scale + shift).to(vae.device, vae.dtype)).sample
    return out.float().clamp(-1, 1)


@torch.no_grad()
def generate(model: nn.Module, objective: Objective, shape: Sequence[int], labels: torch.Tensor | None, n: int, *,
             sampler: str, steps: int, cfg_scale: float = 1.0, seed: int = 0, guide_channels: int | None = None,
             batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """``n`` samples of ``shape`` (C, H, W) in model space, labelled by ``labels`` ([n] or None), in batches."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            y = labels[start:start + m].to(device) if labels is not None else None
            conds, scales = class_conds(model, y, cfg_scale)
            out.append(objective.sample(model, (m, *shape), conds, scales, sampler, steps, gen,
                                        guide_channels=guide_channels, progress=progress).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def default_classes(num_classes: int, classes: Sequence[int] = ()) -> list[int]:
    """The requested classes, checked against the model; default: the first (up to) ten."""
    if not num_classes:
        return []
    chosen = list(classes) or list(range(min(num_classes, 10)))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return chosen


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint with the objective and data facts it was trained with."""

    model: nn.Module
    objective: Objective
    cfg: TrainConfig
    data_info: dict[str, Any]
    step: int
    checkpoint: Path


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder from a run folder (its newest valid checkpoint) or a checkpoint folder itself."""
    from ..checkpoint import MANIFEST, CheckpointManager

    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"run or checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path / "checkpoints").latest()
        if latest is None:
            raise CheckpointError(f"{path / 'checkpoints'} holds no complete checkpoint")
        return latest
    if (path / MANIFEST).is_file():
        return path
    raise CheckpointError(f"{path} is neither a run folder (with checkpoints/) nor a checkpoint folder "
                          f"(step_XXXXXXXX with manifest.json)")


def load_run(source: str | Path, *, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild the model of a run folder or checkpoint, with EMA weights unless ``use_ema`` is False."""
    from ..checkpoint import load_checkpoint, step_of
    from ..models import create_model, load_state_dict_strict

    ckpt = resolve_checkpoint(source)
    state = load_checkpoint(ckpt)
    missing = [k for k in ("model", "model_spec", "config", "data_info") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt} is not a dtx training checkpoint (missing {', '.join(missing)})")
    spec = dict(state["model_spec"])
    model = create_model(spec.pop("name"), **spec)
    key = "ema" if use_ema and "ema" in state else "model"
    load_state_dict_strict(model, state[key], f"{ckpt} ({key})")
    model.to(device).eval()
    cfg = config_from_dict(state["config"])
    info = dict(state["data_info"])
    return LoadedRun(model, build_objective(cfg.objective, model, int(info["image_size"])), cfg, info,
                     step_of(ckpt), ckpt)
