"""Closed-form parameter and multiply-accumulate counts of an HDiT, counted as k-diffusion counts them.

k-diffusion's ``models/flops.py`` (behind the paper's "GFLOP" column) counts multiply-accumulates: N x in x out
for each Linear (the mapping network's and the AdaRMSNorms' once per sample), b x s_q x s_k x (d_q + d_v) for
global and shifted-window attention and tokens x heads x (d_q + d_v) x k² for neighborhood attention; the random
Fourier features and the class table lookup are not counted. ``hdit_counter`` is this closed form behind the core's
counter interface (``dtx.costs``, ``dtx flops``), registered with every HDiT model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dtx.costs import ANALYTIC, ClosedFormCost, Cost

from .model import (GlobalAttentionSpec, HDiTConfig, NeighborhoodAttentionSpec, NoAttentionSpec,
                    ShiftedWindowAttentionSpec, attention_label, attention_to_dict, parse_attention)


@dataclass
class HDiTCost(ClosedFormCost):
    """Per-image forward MACs (the paper's "GFLOP" x 1e9) and parameters of one configuration at one input size."""

    levels: list[dict[str, Any]] = field(default_factory=list)  # per level: tokens, layers, attention, GMACs


def _attention_macs(spec: Any, h: int, w: int, width: int) -> int:
    """MACs of the softmax attention itself (q.k and a.v) on an h x w token map, all heads."""
    n = h * w
    if isinstance(spec, GlobalAttentionSpec):
        return n * n * 2 * width
    if isinstance(spec, NeighborhoodAttentionSpec):
        return n * 2 * width * min(spec.kernel_size, h) * min(spec.kernel_size, w)
    if isinstance(spec, ShiftedWindowAttentionSpec):
        window = min(spec.window_size, h, w)
        return n * window * window * 2 * width
    return 0


def hdit_cost(config: HDiTConfig, input_size: Any = None) -> HDiTCost:
    """Parameters and per-image forward MACs of ``config`` at its input size (or ``input_size``: H or [H, W])."""
    cfg = config.validate()
    levels, mapping = cfg.levels(), cfg.mapping()
    if input_size is None:
        h, w = cfg.input_hw
    else:
        h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    ph, pw = cfg.patch_hw
    c_in, c_out = cfg.in_channels, cfg.out_channels or cfg.in_channels
    mw = mapping.width
    h, w = h // ph, w // pw
    w0 = levels[0].width

    params = c_in * ph * pw * w0 + 2 * mw * mw  # patch_in, time_in_proj, aug_in_proj
    macs = h * w * c_in * ph * pw * w0 + 2 * mw * mw
    if cfg.num_classes:
        params += (cfg.num_classes + 1) * mw
    if cfg.mapping_cond_dim:
        params += cfg.mapping_cond_dim * mw
        macs += cfg.mapping_cond_dim * mw
    params += 2 * mw + mapping.depth * (mw + 3 * mw * mapping.d_ff)  # norms, GEGLU blocks
    macs += mapping.depth * 3 * mw * mapping.d_ff

    rows = []
    for i, spec in enumerate(levels):
        wd, f = spec.width, spec.d_ff
        n = h * w
        layer_params = mw * wd + 3 * wd * f  # feed-forward: AdaRMSNorm linear, GEGLU up, down
        layer_macs = mw * wd + n * 3 * wd * f
        if not isinstance(spec.self_attn, NoAttentionSpec):
            heads = wd // spec.self_attn.d_head
            layer_params += mw * wd + 4 * wd * wd + heads  # AdaRMSNorm linear, qkv, out, per-head scale
            layer_macs += mw * wd + n * 4 * wd * wd + _attention_macs(spec.self_attn, h, w, wd)
        count = spec.depth * (2 if i < len(levels) - 1 else 1)
        params += count * layer_params
        macs += count * layer_macs
        rows.append({"level": i, "tokens": [h, w], "layers": count, "width": wd,
                     "attention": attention_to_dict(spec.self_attn), "gmacs": round(count * layer_macs / 1e9, 3)})
        if i < len(levels) - 1:
            nxt = levels[i + 1].width
            params += 2 * 4 * wd * nxt + 1  # merge, split and its lerp factor
            macs += 2 * (n // 4) * 4 * wd * nxt
            h, w = h // 2, w // 2
    n0 = rows[0]["tokens"][0] * rows[0]["tokens"][1]
    params += w0 + w0 * c_out * ph * pw  # out_norm, patch_out
    macs += n0 * w0 * c_out * ph * pw
    return HDiTCost(macs=macs, params=params, levels=rows)


def hdit_counter(model: nn.Module) -> Cost:
    """``dtx.costs`` counter of a built HDiT (meta device is fine): the closed form of ``hdit_cost`` as MACs and
    real FLOPs, with HDiT's own rows (input size, token grid and MACs per level, training GFLOPs)."""
    cfg = model.config
    cost = hdit_cost(cfg)
    levels = "; ".join(f"{r['tokens'][0]}x{r['tokens'][1]} tokens, {attention_label(parse_attention(r['attention']))}"
                       f", {r['gmacs']:g} Gflops" for r in cost.levels)
    return Cost(params=cost.params, trainable_params=cost.params, macs=cost.macs, flops=2 * cost.macs,
                method=ANALYTIC,
                extra={"input_size": list(cfg.input_hw), "levels": levels,
                       "train_gflops_per_image": round(6 * cost.macs / 1e9, 2)})
