"""Timestep respacing (ADM ``respace.py``) and the DiT ``create_diffusion`` factory.

A respaced chain keeps a subset of the original steps, recomputes betas so that its cumulative alphas equal the
original ones at the kept steps, and remembers the original timestep of each kept step for calling the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError
from .gaussian import GaussianDiffusion, get_beta_schedule


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original steps to keep.

    ``"ddimN"`` keeps ``range(0, T, stride)`` for the integer stride giving exactly N steps. Otherwise the counts
    (``"250"``, ``"10,15,20"`` or a list of ints) split [0, T) into equal sections, each sampled with a fractional
    stride that hits both of its ends.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ConfigError(f"bad timestep respacing {section_counts!r}; expected 'ddim<N>'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(f"cannot keep exactly {desired} of {num_timesteps} steps with an integer stride "
                              f"(respacing {section_counts!r})")
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ConfigError(f"bad timestep respacing {section_counts!r}; expected e.g. '250', '10,15,20' "
                              f"or 'ddim50'") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or min(counts) < 1:
        raise ConfigError(f"timestep respacing needs positive step counts, got {section_counts!r}")
    if len(counts) > num_timesteps:
        raise ConfigError(f"cannot split {num_timesteps} steps into {len(counts)} sections")

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot keep {count} steps from a section of {size} (respacing {section_counts!r})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(betas, timestep_map) of the chain over ``use_timesteps``: beta_i = 1 - abar_i / abar_prev (float64)."""
    keep = sorted(set(int(s) for s in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= len(betas):
        raise ConfigError(f"kept timesteps must lie in [0, {len(betas)}), got {keep[:1]}..{keep[-1:]}")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    new_betas = []
    last = 1.0
    for step in keep:
        new_betas.append(1.0 - alphas_cumprod[step] / last)
        last = alphas_cumprod[step]
    return np.array(new_betas, dtype=np.float64), np.array(keep, dtype=np.int64)


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     predict_v: bool = False, learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000, channel_dim: int = 1,
                     betas: np.ndarray | None = None, use_timesteps: Sequence[int] | None = None) -> GaussianDiffusion:
    """DiT's factory: epsilon prediction, learned-range variance and MSE(+VB) loss by default; empty respacing keeps
    all ``diffusion_steps``. ``betas`` (e.g. from the ``schedule`` registry) replaces the named ``noise_schedule``;
    ``use_timesteps`` lists the kept steps directly instead of ``timestep_respacing``."""
    if predict_xstart and predict_v:
        raise ConfigError("predict_xstart and predict_v are mutually exclusive")
    betas = get_beta_schedule(noise_schedule, diffusion_steps) if betas is None else np.asarray(betas, np.float64)
    if betas.shape != (diffusion_steps,):
        raise ConfigError(f"the beta schedule has {betas.shape[0]} steps, diffusion_steps is {diffusion_steps}")
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    mean_type = "x0" if predict_xstart else "v" if predict_v else "epsilon"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = list(use_timesteps) if use_timesteps is not None else space_timesteps(diffusion_steps, timestep_respacing)
    new_betas, timestep_map = respace_betas(betas, kept)
    return GaussianDiffusion(new_betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type,
                             timestep_map=timestep_map, channel_dim=channel_dim)
