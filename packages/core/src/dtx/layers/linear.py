"""Linear layers whose CPU float32 matrix products can run on oneDNN.

PyTorch sends CPU float32 ``linear`` to the BLAS it was built with (MKL in the official wheels), whose sgemm on
non-Intel processors keeps to AVX2 kernels; oneDNN, also inside every official wheel, uses AVX-512 wherever the
processor has it, with the same float32 precision (different kernel). On Intel processors MKL is as fast or faster.
:class:`Linear` is ``nn.Linear`` (same parameters, same state dict, same initialisation) whose forward and backward
products go through oneDNN when chosen and the input is a plain CPU float32 tensor outside autocast; everything else
(CUDA, bfloat16 or autocast, which PyTorch already sends to oneDNN, tensor subclasses such as DTensor) takes
``F.linear``.

``DTX_LINEAR=auto|onednn|aten`` chooses: ``aten`` always takes ``F.linear`` (PyTorch's own dispatch); ``onednn``
takes oneDNN where PyTorch was built with it; ``auto`` takes oneDNN only on the processors where it beats the BLAS
(``dtx.cpu.CpuInfo.onednn_linear``: non-Intel x86 with AVX-512).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import cpu_info
from ..errors import ConfigError

BACKENDS = ("auto", "onednn", "aten")
_override: list[str] = []  # innermost ``linear_backend`` context last


def _probe_onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _probe_onednn()  # probed once: torch.compile does not trace torch.backends
_AUTO_ONEDNN = cpu_info().onednn_linear  # what "auto" takes on this processor


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's dense-input linear (``torch.ops.mkldnn._linear_pointwise``)."""
    return _ONEDNN


def linear_backend() -> str:
    """The active backend: the innermost :func:`use_linear_backend` context, else ``DTX_LINEAR``, else "auto"."""
    if _override:
        return _override[-1]
    value = os.environ.get("DTX_LINEAR", "auto").lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"DTX_LINEAR={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@contextlib.contextmanager
def use_linear_backend(backend: str) -> Iterator[None]:
    """Run a block with ``backend`` ("auto", "onednn" or "aten"): benchmarks and tests compare the two paths."""
    if backend not in BACKENDS:
        raise ConfigError(f"linear backend {backend!r} is not one of {', '.join(BACKENDS)}")
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()


@torch.library.custom_op("dtx::onednn_mm", mutates_args=())
def _onednn_mm_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The product as an opaque operator for torch.compile (Inductor's own lowering of oneDNN's linear assumes
    frozen, pre-packed weights)."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [None], "")


@_onednn_mm_op.register_fake
def _(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return a.new_empty(a.shape[0], weight.shape[0])


def _onednn_mm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ weight.T + bias`` for a 2-D ``a`` in oneDNN; strided (transposed) operands are read in place."""
    if torch.compiler.is_compiling():
        return _onednn_mm_op(a, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` with all three products of forward and backward in oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])                                 # (M, K)
        return _onednn_mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])                           # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(g2, weight.t(), None).view(x.shape)     # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_mm(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)                                          # (N,)
        return grad_x, grad_w, grad_b


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")
            and _plain(x) and _plain(weight) and _plain(bias) and _ONEDNN
            and (linear_backend() == "onednn" or (linear_backend() == "auto" and _AUTO_ONEDNN)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with CPU float32 products in oneDNN (see the module docstring for when)."""
    if _use_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def fused_activations() -> Iterator[None]:
    """Inside: ``linear_gelu_tanh`` without autograd on the oneDNN path runs as one fused product (sampling: the
    activation as the product's post-op, equal to the separate pass to float32 rounding, not bit for bit)."""
    _fusing.append(True)
    try:
        yield
    finally:
        _fusing.pop()


_fusing: list[bool] = []


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")``, fused inside ``fused_activations`` (see there)."""
    if _fusing and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and \
            _use_onednn(x, weight, bias):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "gelu", [None], "tanh")
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(linear(x, weight, bias), approximate="tanh")


class Linear(nn.Linear):
    """``nn.Linear`` whose products go through :func:`linear`; parameters, state dict and init are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
