"""Closed-form parameter and multiply-accumulate counts of a DiT, counted as the paper's Table 4 counts them.

The paper's "Gflops" are multiply-accumulates per image and forward pass (VAE excluded); real FLOPs are twice that.
``measure_flops`` cross-checks the closed form with PyTorch's own counter on meta tensors (no memory, no compute).
``dit_counter`` is the closed form behind the core's counter interface (``dtx.costs``, ``dtx flops``): it is
registered with every DiT model as its ``flops`` counter.
"""

from __future__ import annotations


import torch
from torch import nn

from dtx.costs import ANALYTIC, ClosedFormCost, Cost, linear_params

from .model import DiTConfig

FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the t-MLP


DiTCost = ClosedFormCost  # per-sample forward MACs and parameters (frozen tables counted apart)




_linear = linear_params


def dit_cost(config: DiTConfig) -> DiTCost:
    """Parameters and per-image forward MACs of ``config`` for all four block designs (matmuls and convs only)."""
    cfg = config.validate()
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    gh, gw = cfg.grid
    t = gh * gw
    out = 2 * c if cfg.learn_sigma else c
    m = int(d * cfg.mlp_ratio)
    n_cond = 2 if cfg.num_classes > 0 else 1  # conditioning tokens: t (and y)
    modulated = cfg.block in ("adaln-zero", "adaln")

    params = _linear(c * p * p, d) + t * d + _linear(FREQ_DIM, d) + _linear(d, d)
    if cfg.num_classes > 0:
        params += (cfg.num_classes + int(cfg.class_dropout_prob > 0)) * d
    macs = t * p * p * c * d + FREQ_DIM * d + d * d

    tokens = t + n_cond if cfg.block == "in-context" else t
    block_params = _linear(d, 3 * d) + _linear(d, d) + _linear(d, m) + _linear(m, d)
    block_macs = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m
    if modulated:
        chunks = 6 if cfg.block == "adaln-zero" else 4
        block_params += _linear(d, chunks * d)
        block_macs += chunks * d * d
    elif cfg.block == "cross-attention":
        block_params += _linear(d, d) + _linear(d, 2 * d) + _linear(d, d) + 3 * 2 * d  # q, kv, proj, 3 affine norms
        block_macs += 2 * t * d * d + 2 * n_cond * d * d + 2 * t * n_cond * d
    else:
        block_params += 2 * 2 * d  # two affine norms
    params += cfg.depth * block_params
    macs += cfg.depth * block_macs

    params += _linear(d, p * p * out) + (_linear(d, 2 * d) if modulated else 2 * d)
    macs += t * d * p * p * out + (2 * d * d if modulated else 0)
    return DiTCost(macs=macs, params=params, frozen_params=t * d)


def dit_counter(model: nn.Module) -> Cost:
    """``dtx.costs`` counter of a built DiT (meta device is fine): the closed form of ``dit_cost``, as MACs and
    real FLOPs, with DiT's own rows (block design, latent size, tokens, frozen pos_embed, training GFLOPs)."""
    cfg = model.config
    cost = dit_cost(cfg)
    gh, gw = cfg.grid
    return Cost(params=cost.params, trainable_params=cost.trainable_params, macs=cost.macs, flops=2 * cost.macs,
                method=ANALYTIC,
                extra={"block": cfg.block, "input_size": list(cfg.input_hw), "tokens": gh * gw,
                       "frozen_params": cost.frozen_params,
                       "train_gflops_per_image": round(3 * cost.real_gflops, 2)})


def measure_flops(model: nn.Module, input_hw: tuple[int, int] | None = None, batch: int = 1) -> int:
    """Real FLOPs of one forward pass of ``model`` at ``batch``, counted by ``torch.utils.flop_counter`` on meta tensors.

    ``model`` may live on the meta device (build it under ``with torch.device("meta")``); no memory is used.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = input_hw or model.config.input_hw
    device = next(model.parameters()).device
    x = torch.zeros(batch, model.in_channels, h, w, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if model.num_classes > 0 else None
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, y)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
