"""FID through torchmetrics' ``FrechetInceptionDistance``, only with Inception weights already on disk.

torchmetrics would otherwise download them on first use; dtx never does. The weights file (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``) comes from ``--inception-weights`` or ``$DTX_INCEPTION_WEIGHTS``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import torch

from ..errors import DataError, ShapeError

ENV = "DTX_INCEPTION_WEIGHTS"


def fid_weights_path(weights: str | Path | None = None) -> Path | None:
    """The Inception weights file to use: ``weights`` if given, else ``$DTX_INCEPTION_WEIGHTS``, else None."""
    raw = weights if weights is not None else os.environ.get(ENV)
    return Path(raw).expanduser() if raw else None


def fid_unavailable_reason(weights: str | Path | None = None) -> str | None:
    """None when FID can be computed without any download, otherwise one line saying why it cannot."""
    if importlib.util.find_spec("torchmetrics") is None:
        return "torchmetrics is not installed (pip install 'torchmetrics[image]')"
    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity, which provides torchmetrics' Inception network, is not installed"
    from torchmetrics.image.fid import FrechetInceptionDistance

    if "feature_extractor_weights_path" not in inspect.signature(FrechetInceptionDistance).parameters:
        return "this torchmetrics cannot load local Inception weights (needs feature_extractor_weights_path)"
    path = fid_weights_path(weights)
    if path is None:
        return f"no local Inception weights (pass --inception-weights or set {ENV}); dtx does not download them"
    if not path.is_file():
        return f"Inception weights file not found: {path}"
    return None


def _rgb_uint8(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ShapeError(f"{name} images for FID must be uint8 [N, 1 or 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def compute_fid(real: torch.Tensor, fake: torch.Tensor, weights: str | Path | None = None,
                batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """FID between uint8 image batches ``[N, C, H, W]`` (grey images are repeated to RGB; resized to 299 inside)."""
    reason = fid_unavailable_reason(weights)
    if reason:
        raise DataError(f"FID unavailable: {reason}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(fid_weights_path(weights)))
    metric = metric.to(device)
    for images, is_real in ((_rgb_uint8(real, "real"), True), (_rgb_uint8(fake, "fake"), False)):
        for chunk in images.split(batch_size):
            metric.update(chunk.to(device), real=is_real)
    return float(metric.compute())
