"""Fréchet distance between Gaussians fitted to two feature sets (the statistic behind FID, FVD and FD-DINOv2):
||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the matrix square root from scipy.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ShapeError

EPS = 1e-6
MAX_IMAG = 1e-3


def feature_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features ``[N, D]``."""
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ShapeError(f"features must be [N, D] with N >= 2, got shape {tuple(x.shape)}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                sigma_b: np.ndarray, eps: float = EPS) -> float:
    """Fréchet distance of N(mu_a, sigma_a) and N(mu_b, sigma_b).

    When the product of the covariances is singular (fewer samples than dimensions), ``eps`` is added to both
    diagonals before the square root, the usual fix of the TTUR/pytorch-fid implementations.
    """
    from scipy import linalg

    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ShapeError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    diff = mu_a - mu_b
    with warnings.catch_warnings():  # singular products are expected with few samples; checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=MAX_IMAG):
            raise ValueError(f"matrix square root has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); features are degenerate")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between feature sets ``[N_a, D]`` and ``[N_b, D]``."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))
