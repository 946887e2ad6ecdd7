"""What a model costs: parameters and per-sample forward FLOPs, counted analytically or measured.

A model family may register an analytic counter with its models (``register(name, factory, flops=counter)`` in
``dtx_register_models``); ``counter(model) -> Cost`` reads the built model (its config) and returns the closed form,
e.g. the multiply-accumulates a paper reports as "Gflops". Models without one are measured: one forward pass of a
batch built from the model's declared interface (``dtx.interface``), counted by ``torch.utils.flop_counter`` on
meta tensors, so nothing is allocated and nothing is computed.

Library layer: imports nothing from ``dtx.training`` or ``dtx.cli``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError, PluginError
from .interface import interface_of
from .models import count_parameters, create_model, model_entry, model_spec
from .options import factory_options

ANALYTIC = "analytic"
MEASURED = "measured"


@dataclass
class ClosedFormCost:
    """A family's closed-form count of one configuration: per-sample forward multiply-accumulates (the papers'
    "Gflops") and parameters, the frozen tables (sin-cos positions) among them."""

    macs: int
    params: int
    frozen_params: int = 0

    @property
    def gflops(self) -> float:
        """The papers' "Gflops": multiply-accumulates / 1e9."""
        return self.macs / 1e9

    @property
    def real_gflops(self) -> float:
        return 2 * self.macs / 1e9

    @property
    def trainable_params(self) -> int:
        return self.params - self.frozen_params


def linear_params(n_in: int, n_out: int) -> int:
    """Weights and bias of a ``Linear(n_in, n_out)``."""
    return n_in * n_out + n_out


@dataclass
class Cost:
    """Parameters and per-sample forward cost of one built model."""

    params: int  # every parameter, frozen ones included
    trainable_params: int
    macs: int | None  # per-sample forward multiply-accumulates (the papers' "Gflops"); None when not counted
    flops: int  # real per-sample forward FLOPs (a multiply-accumulate is two)
    method: str  # "analytic" (a registered counter) or "measured" (torch.utils.flop_counter)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific rows, e.g. DiT's tokens and block

    @property
    def frozen_params(self) -> int:
        return self.params - self.trainable_params

    @property
    def gflops(self) -> float:
        """Real forward GFLOPs per sample."""
        return self.flops / 1e9

    @property
    def gmacs(self) -> float | None:
        """Forward multiply-accumulates per sample / 1e9: what papers (DiT, U-ViT, ...) call "Gflops"."""
        return None if self.macs is None else self.macs / 1e9

    @property
    def train_gflops(self) -> float:
        """Rough training-step cost per sample: forward + backward ~ 3x the forward."""
        return 3 * self.gflops

    def row(self) -> dict[str, Any]:
        """A flat JSON-able dict: the common fields, then the family's extra rows (never overriding them)."""
        out: dict[str, Any] = {"method": self.method, "params": self.params,
                               "trainable_params": self.trainable_params, "macs": self.macs, "flops": self.flops,
                               "gflops_macs": self.gmacs, "gflops_real": self.gflops}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


Counter = Callable[[nn.Module], Cost]


def counter_of(name: str) -> Counter | None:
    """The analytic counter registered with model ``name`` (meta key ``flops``), or None."""
    return model_entry(name).meta.get("flops")


def size_overrides(name: str, input_size: int | list[int] | None = None,
                   frames: int | None = None) -> dict[str, Any]:
    """Model options for a size given on the command line: ``input_size`` (H or [H, W]) and ``num_frames``, each
    only if model ``name``'s factory accepts it (else one ConfigError naming the option)."""
    entry = model_entry(name)
    accepted = factory_options(entry.obj)
    out: dict[str, Any] = {}
    for option, flag, value in (("input_size", "--input-size", input_size), ("num_frames", "--frames", frames)):
        if value is None:
            continue
        if accepted is not None and option not in accepted:
            raise ConfigError(f"model {entry.name!r} has no option {option!r}, so {flag} cannot be set for it; "
                              f"options: {', '.join(sorted(accepted)) or 'none'}")
        out[option] = value
    return out


def meta_model(name: str, **overrides: Any) -> nn.Module:
    """Build registered model ``name`` on the meta device: shapes only, no memory, no initialisation work."""
    with torch.device("meta"):
        return create_model(name, **overrides)


def cost_of(model: nn.Module, counter: Counter | None = None) -> Cost:
    """The cost of a built model: ``counter``, else the one registered with the model it was built as
    (``dtx.create_model``'s record of it), else measured (``measure``)."""
    name = (model_spec(model) or {}).get("name")
    if counter is None and name is not None:
        counter = counter_of(name)
    if counter is not None:
        cost = counter(model)
        if not isinstance(cost, Cost):
            plugin = model_entry(name).plugin if name is not None else "?"
            raise PluginError(f"the flops counter of model {name!r} (plugin {plugin!r}) returned "
                              f"{type(cost).__name__}, not a dtx.costs.Cost")
        return cost
    return Cost(params=count_parameters(model), trainable_params=count_parameters(model, trainable_only=True),
                macs=None, flops=measure(model), method=MEASURED)


def model_cost(name: str, **overrides: Any) -> Cost:
    """Cost of registered model ``name`` built with ``overrides`` on the meta device: its family's analytic
    counter when one is registered, else measured with ``torch.utils.flop_counter``."""
    return cost_of(meta_model(name, **overrides), counter_of(name))


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("meta")


def example_inputs(model: nn.Module, batch: int = 1) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional ``(x, noise)`` and keyword conditions for one forward pass of ``model``, on its device.

    ``x``: ``[batch, *input_shape]``; noise: long zeros for ``noise_input == "timestep"``, else float ones;
    conditions: ``model.example_conditions(batch, device)`` when defined, else ``y`` (long zeros) when ``forward``
    takes ``y`` and ``model.num_classes > 0``, else none.
    """
    iface = interface_of(model)
    name = type(model).__name__
    if iface.input_shape is None:
        raise ConfigError(f"{name} declares no input_shape, so its FLOPs cannot be measured; pass --input-size "
                          f"(the model must accept an input_size option and declare input_shape from it)")
    device = _device(model)
    x = torch.zeros(batch, *iface.input_shape, device=device)
    if iface.noise_input == "timestep":
        noise = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        noise = torch.ones(batch, device=device)
    conditions: dict[str, torch.Tensor] = {}
    example = getattr(model, "example_conditions", None)
    if callable(example):
        conditions = dict(example(batch, device))
    else:
        try:
            takes_y = "y" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_y = False
        if takes_y and int(getattr(model, "num_classes", 0) or 0) > 0:
            conditions["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    return (x, noise), conditions


def measure(model: nn.Module, batch: int = 1) -> int:
    """Real FLOPs of one forward pass of ``model`` at ``batch``, counted by ``torch.utils.flop_counter``.

    Build the model on the meta device (``meta_model`` or ``with torch.device("meta")``) and nothing is allocated
    or computed; the inputs are made on the model's device (``example_inputs``). Counted are matmuls, convolutions
    and attention (2 FLOPs per multiply-accumulate); elementwise ops and biases are not.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    args, kwargs = example_inputs(model, batch)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# -- peak throughput and model FLOPs utilisation ------------------------------------------------------------------

#: Dense (no structured sparsity) peak tensor-core TFLOP/s of common GPUs per compute precision, from NVIDIA's data
#: sheets; "tf32" is fp32 matmuls on tensor cores (``allow_tf32``), "fp32" the plain CUDA-core rate. Matched against
#: ``torch.cuda.get_device_name`` by the longest name it contains ("H100 PCIe" before "H100", which is the SXM part).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak TFLOP/s of the GPU called ``device_name`` at ``precision`` (one of ``PRECISIONS``), or None when the
    GPU is not in ``GPU_PEAK_TFLOPS``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    name = device_name.upper().replace("-", " ")
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.upper() in name:
            return GPU_PEAK_TFLOPS[key][precision]
    return None


def device_peak_tflops(device: torch.device | str, precision: str) -> float | None:
    """Peak TFLOP/s of a CUDA ``device`` at ``precision``; None on CPU (no MFU there) or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(device), precision)


def achieved_tflops(flops: float, seconds: float) -> float:
    """FLOPs done in ``seconds``, as TFLOP/s."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the model's analytic FLOPs per second over the device's peak (a fraction; work
    the model does not need, such as activation recomputation, is not counted)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return achieved_tflops(flops, seconds) / peak_tflops


__all__ = ["ANALYTIC", "GPU_PEAK_TFLOPS", "MEASURED", "PRECISIONS", "Cost", "Counter", "achieved_tflops", "cost_of",
           "counter_of", "device_peak_tflops", "example_inputs", "gpu_peak_tflops", "measure", "meta_model", "mfu",
           "model_cost", "size_overrides"]
