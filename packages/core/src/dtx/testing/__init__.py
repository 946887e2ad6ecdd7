"""Test helpers for dtx and its plugins: the conformance kit, plugin-host isolation and a tiny VAE.

- ``ModelConformance`` and ``ModelCase`` (``dtx.testing.conformance``): the checks every backbone plugin runs in its
  own tests by subclassing one class (see docs/plugins.md);
- ``fresh_plugin_host``: isolate the process-wide plugin host;
- ``save_tiny_vae``: a tiny random VAE on disk (the real ``from_pretrained`` path, no download);
- ``randomize_parameters``: seeded random values in place of a (partly zero) init, so comparisons see every tensor.

The pytest plugin ``dtx.testing.pytest_plugin`` (entry point ``pytest11``) adds the ``--dtx-compile`` option and
the ``dtx_plugin_host`` fixture. The kit is imported on first use, so importing this module needs no pytest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import plugins

PLUGIN_ENV = ("DTX_PLUGINS", "DTX_DISABLE_PLUGINS")
_KIT = ("ModelCase", "ModelConformance", "HEAVY_MODULES")

__all__ = ["PLUGIN_ENV", "fresh_plugin_host", "randomize_parameters", "save_tiny_vae", *_KIT]


def __getattr__(name: str) -> Any:
    """The conformance kit, imported when first named (it needs pytest)."""
    if name in _KIT:
        from . import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def fresh_plugin_host() -> Iterator[None]:
    """Rediscover every installed plugin with no allow/deny list, and forget them again afterwards."""
    saved = {name: os.environ.pop(name) for name in PLUGIN_ENV if name in os.environ}
    plugins.reset()
    try:
        yield
    finally:
        plugins.reset()
        for name in PLUGIN_ENV:
            os.environ.pop(name, None)
        os.environ.update(saved)


def save_tiny_vae(path: str | os.PathLike, seed: int = 0) -> tuple[Any, Path]:
    """A randomly initialised 2x-downsampling diffusers ``AutoencoderKL`` (4 latent channels, scaling factor 0.5)
    saved to ``path``; returns (vae in eval mode, path). Tests load it back through ``dtx.data.vae.load_vae``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(path)
    return vae.eval(), Path(path)


def randomize_parameters(model: Any, seed: int = 0, std: float = 0.1, trainable_only: bool = True) -> Any:
    """Overwrite ``model``'s parameters with seeded N(0, std^2) values (frozen ones too unless ``trainable_only``)
    and return it in eval mode: zero-initialised adaLN and output layers would hide key-mapping mistakes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
