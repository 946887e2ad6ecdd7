"""Setting up a run's model and data: the data description (after an optional frozen VAE) and the model options
derived from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import plugins
from ..data import build_dataset
from ..data.info import DataInfo, data_info
from ..errors import ConfigError
from ..options import factory_options
from .config import TrainConfig


@dataclass
class RunData:
    """The dataset of a run, the frozen VAE that encodes it on the fly (or None) and what the model sees."""

    dataset: Dataset
    vae: Any
    info: DataInfo


def build_run_data(cfg: TrainConfig, device: torch.device) -> RunData:
    """The recipe's dataset; pixel data with ``data.vae`` are encoded per frame by that frozen local VAE."""
    options = dict(cfg.data.options)
    if cfg.data.buckets is not None:
        accepted = factory_options(plugins.get("dataset", cfg.data.name).obj)
        if accepted is not None and "buckets" not in accepted:
            raise ConfigError(f"bad value for config key 'data.buckets': dataset {cfg.data.name!r} yields items of "
                              f"one size (it takes no buckets option; image-folder and video-folder do)")
        options["buckets"] = [list(shape) for shape in cfg.data.buckets.shapes]
    dataset = build_dataset(cfg.data.name, **options)
    info = data_info(dataset)
    vae = None
    if cfg.data.vae and not info.is_latent:
        from ..data.vae import info_after_vae, load_vae

        vae = load_vae(cfg.data.vae).to(device)
        info = info_after_vae(info, vae, cfg.data.vae)
    return RunData(dataset, vae, info)


def model_overrides(cfg: TrainConfig, info: DataInfo) -> dict[str, Any]:
    """The recipe's model options plus input size, channels, classes and frames taken from the data where the
    model accepts them and the recipe does not set them."""
    options = dict(cfg.model.options)
    accepted = factory_options(plugins.get("model", cfg.model.name).obj)
    derived: dict[str, Any] = {"input_size": info.input_size, "in_channels": info.channels,
                               "num_classes": info.num_classes}
    if info.frames is not None:
        derived["num_frames"] = info.frames
    for key, value in derived.items():
        if key not in options and (accepted is None or key in accepted):
            options[key] = value
    return options
