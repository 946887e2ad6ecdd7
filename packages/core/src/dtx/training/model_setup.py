"""Setting up a run's model and data: the data description (after an optional frozen VAE), model options derived
from it, and activation checkpointing."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import plugins
from ..data import build_dataset
from ..data.info import DataInfo, data_info
from ..errors import ConfigError
from ..options import factory_options
from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """The dataset of a run, the frozen VAE that encodes it on the fly (or None) and what the model sees."""

    dataset: Dataset
    vae: Any
    info: DataInfo


def build_run_data(cfg: TrainConfig, device: torch.device) -> RunData:
    """The recipe's dataset; pixel data with ``data.vae`` are encoded per frame by that frozen local VAE."""
    dataset = build_dataset(cfg.data.name, **cfg.data.options)
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


def checkpoint_policy(value: Any, option: str = "checkpointing") -> int:
    """An activation-checkpointing policy as ``every``: 0 none, 1 every block, k every k-th block (blocks 0, k,
    2k, ...). Accepts 0/1/k, booleans, "none", "all"/"every" or "every-k"; else a ConfigError naming ``option``."""
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    named = {"none": 0, "off": 0, "false": 0, "all": 1, "every": 1, "on": 1, "true": 1}
    if text in named:
        return named[text]
    digits = text[len("every-"):] if text.startswith("every-") else text
    if digits.isdigit():
        return int(digits)
    raise ConfigError(f"{option}={value!r} is not a checkpointing policy: none, all, every-K or K (a block count)")


def enable_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Recompute transformer blocks in the backward pass: every block (``every=1``) or every ``every``-th one
    (blocks 0, k, 2k, ...: memory between none and all, for less recomputation); ``every=0`` does nothing.

    Every block uses the model's own switch when it has one. Otherwise (and for every k-th) each chosen module
    inside a ``blocks`` ModuleList gets a checkpointed forward (state-dict keys unchanged). Returns the number of
    wrapped blocks (-1 when the model's own switch handled it).
    """
    from torch.utils.checkpoint import checkpoint

    if every < 0:
        raise ConfigError(f"activation checkpointing every={every}: must be >= 0 (0 none, 1 every block)")
    if every == 0:
        return 0
    if every == 1:
        for switch in ("set_grad_checkpointing", "enable_gradient_checkpointing"):
            if callable(getattr(model, switch, None)):
                getattr(model, switch)()
                return -1
        if isinstance(getattr(model, "gradient_checkpointing", None), bool):
            model.gradient_checkpointing = True
            return -1
    wrapped = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList):
            for i, block in enumerate(module):
                if i % every == 0:
                    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
                    wrapped += 1
    if not wrapped:
        log.warning("activation checkpointing requested but %s has no `blocks` list; ignored", type(model).__name__)
    return wrapped
