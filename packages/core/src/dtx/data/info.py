"""``DataInfo``: the one description of what a dataset yields, from which sample shapes and model sizes are derived."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class DataInfo:
    """Shape and kind of the tensors ``x`` a dataset yields (after the VAE, when training encodes on the fly).

    ``frames`` is None for images (``x`` is ``[C, H, W]``) and the clip length for videos (``[F, C, H, W]``).
    ``fields`` names the condition fields each item carries besides ``x`` (``y``, ``text``, flags ...).
    Latent data record the VAE's ``latent_scale`` (and ``latent_shift``), the VAE folder when known and
    ``vae_downsample``, the pixel-to-latent factor.
    """

    channels: int
    height: int
    width: int
    frames: int | None = None
    num_classes: int = 0
    is_latent: bool = False
    latent_scale: float | None = None
    latent_shift: float = 0.0
    vae: str | None = None
    vae_downsample: int = 1
    fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("channels", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"data {name} must be >= 1, got {getattr(self, name)}")
        if self.frames is not None and int(self.frames) < 1:
            raise ConfigError(f"data frames must be >= 1 or None (images), got {self.frames}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape of ``x``: ``(C, H, W)`` or ``(F, C, H, W)``."""
        chw = (self.channels, self.height, self.width)
        return chw if self.frames is None else (self.frames, *chw)

    @property
    def channel_dim(self) -> int:
        """Channel axis of a batch ``[B, C, H, W]`` (1) or ``[B, F, C, H, W]`` (2)."""
        return 1 if self.frames is None else 2

    @property
    def input_size(self) -> int | list[int]:
        """The model option ``input_size``: the side of square data, else ``[H, W]``."""
        return self.height if self.height == self.width else [self.height, self.width]

    def encoded(self, latent_channels: int, downsample: int, scale: float, shift: float, vae: str) -> "DataInfo":
        """The description of this pixel data after a VAE encodes it (frames unchanged: per-frame encoding)."""
        if self.height % downsample or self.width % downsample:
            raise ConfigError(f"data size {self.height}x{self.width} is not divisible by the VAE's factor {downsample}")
        return dataclasses.replace(self, channels=latent_channels, height=self.height // downsample,
                                   width=self.width // downsample, is_latent=True, latent_scale=scale,
                                   latent_shift=shift, vae=vae, vae_downsample=downsample)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fields"] = list(self.fields)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataInfo":
        """Read a stored description, including the dict of checkpoints written before DataInfo existed."""
        d = dict(d)
        if "image_size" in d:  # legacy: square images only
            size = int(d.pop("image_size"))
            d.setdefault("height", size)
            d.setdefault("width", size)
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["fields"] = tuple(d.get("fields") or ())
        return cls(**d)


def data_info(dataset: Any) -> DataInfo:
    """A dataset's ``DataInfo``: its ``info`` attribute, or one derived from the older attributes ``channels``,
    ``image_size``, ``num_classes``, ``is_latent`` and ``latent_scale`` (third-party datasets)."""
    info = getattr(dataset, "info", None)
    if isinstance(info, DataInfo):
        return info
    missing = [a for a in ("channels", "image_size") if not hasattr(dataset, a)]
    if missing:
        raise ConfigError(f"dataset {type(dataset).__name__} has no `info` (DataInfo) and no {', '.join(missing)}")
    size = dataset.image_size
    h, w = (size, size) if isinstance(size, int) else size
    num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    return DataInfo(channels=int(dataset.channels), height=int(h), width=int(w),
                    frames=getattr(dataset, "frames", None), num_classes=num_classes,
                    is_latent=bool(getattr(dataset, "is_latent", False)),
                    latent_scale=float(getattr(dataset, "latent_scale", 0.0) or 0.0) or None,
                    fields=tuple(getattr(dataset, "fields", ("y",) if num_classes else ())))
