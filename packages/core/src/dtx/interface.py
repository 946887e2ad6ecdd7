"""What the core needs to know about a backbone, declared by the model class itself.

A model states its tensor layout and what noise level it is conditioned on as class attributes (or properties):

- ``channel_dim``: 1 for images ``[B, C, H, W]``, 2 for videos ``[B, F, C, H, W]``; objectives, the learned-variance
  split and guidance read channels along it.
- ``noise_input``: ``"timestep"`` (a DDPM timestep index in ``[0, num_timesteps)``, e.g. DiT), ``"c_noise"`` (EDM's
  ``ln(sigma) / 4``, the default of continuous models) or ``"sigma"`` (raw sigma; the model maps it itself, as
  k-diffusion's own models do); or flow time: ``"flow_time"`` (t in [0, 1], 1 at the noise: SD3, Flux, diffusers'
  FlowMatch), ``"sit_time"`` (t in [0, 1], 1 at the data: SiT) or ``"flow_timestep"`` (1000·t, 1000 at the noise).
  A flow-matching model's velocity runs in its own time's direction (dx/dt for the time it declares).
- ``in_channels``, ``out_channels``, ``learn_sigma`` (output ``[eps, v]`` with twice the channels) and
  ``input_shape`` (the per-sample shape it was built for, e.g. ``(C, H, W)`` or ``(F, C, H, W)``), when known.

``interface_of(model)`` reads them once, with defaults, and checks them; nothing is attached to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError

NoiseInput = Literal["timestep", "c_noise", "sigma", "flow_time", "sit_time", "flow_timestep"]
NOISE_INPUTS: tuple[str, ...] = get_args(NoiseInput)


@dataclass(frozen=True)
class ModelInterface:
    """A backbone's declared layout and noise-level contract."""

    channel_dim: int = 1
    noise_input: NoiseInput = "timestep"
    num_timesteps: int = 1000  # range of a timestep embedding ("timestep" models)
    in_channels: int | None = None
    out_channels: int | None = None
    learn_sigma: bool = False
    input_shape: tuple[int, ...] | None = None  # per sample, without the batch axis

    @property
    def is_video(self) -> bool:
        return self.channel_dim == 2


def unwrap(model: Any) -> Any:
    """The user's module inside DDP/FSDP/compile wrappers (their attributes are not forwarded)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if inner is not None and inner is not model:
            return unwrap(inner)
    return model


def interface_of(model: Any) -> ModelInterface:
    """The declared ``ModelInterface`` of ``model`` (defaults: images, timestep-conditioned, fixed variance)."""
    m = unwrap(model)
    channel_dim = getattr(m, "channel_dim", 1)
    noise_input = getattr(m, "noise_input", "timestep")
    name = type(m).__name__
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim < 1:
        raise ConfigError(f"{name}.channel_dim must be an int >= 1 (1: [B, C, H, W], 2: [B, F, C, H, W]), "
                          f"got {channel_dim!r}")
    if noise_input not in NOISE_INPUTS:
        raise ConfigError(f"{name}.noise_input must be one of {', '.join(NOISE_INPUTS)}, got {noise_input!r}")
    shape = getattr(m, "input_shape", None)
    in_ch = getattr(m, "in_channels", None)
    out_ch = getattr(m, "out_channels", None)
    return ModelInterface(channel_dim=channel_dim, noise_input=noise_input,
                          num_timesteps=int(getattr(m, "num_timesteps", 1000)),
                          in_channels=int(in_ch) if in_ch is not None else None,
                          out_channels=int(out_ch) if out_ch is not None else None,
                          learn_sigma=bool(getattr(m, "learn_sigma", False)),
                          input_shape=tuple(int(s) for s in shape) if shape is not None else None)
