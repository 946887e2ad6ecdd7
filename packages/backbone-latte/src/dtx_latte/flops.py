"""Closed-form parameter and multiply-accumulate counts of a Latte, for every variant, injection and patch embedding.

MACs are per sample (one clip) and forward pass, counted as DiT's paper counts them: matmuls, convolutions and
attention (QK^T and AV), no elementwise work; real FLOPs are twice that. The adaLN linears run once per sequence, as
the official code repeats the condition per frame (spatial) or per position (temporal) before them, so Latte-XL/2
over 16 frames of 32x32 latents costs 1892.96 GMACs (derived from the code: DiT's MAC formula on Latte's layout; the
paper gives no FLOPs). ``latte_counter`` is the closed form behind the core's counter interface (``dtx.costs``,
``dtx flops``), registered with every Latte model.
"""

from __future__ import annotations


from torch import nn

from dtx.costs import ANALYTIC, ClosedFormCost, Cost, linear_params

from .blocks import AxisBlockSpec, FactorisedBlockSpec, SplitHeadBlockSpec
from .model import LatteConfig, block_layout

FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the t-MLP


LatteCost = ClosedFormCost  # per-sample forward MACs and parameters (frozen tables counted apart)




_linear = linear_params


def latte_cost(config: LatteConfig, frames: int | None = None, images: int = 0) -> LatteCost:
    """Parameters and per-sample forward MACs of ``config`` on a clip of ``frames`` frames (default ``num_frames``)
    with ``images`` appended images, at the configured latent size."""
    cfg = config.validate()
    d, p, c, s = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.stride
    out, m = cfg.out_channels, int(cfg.hidden_size * cfg.mlp_ratio)
    gh, gw = cfg.grid
    t = gh * gw  # tokens per frame
    nf = (cfg.num_frames if frames is None else frames) // s  # token frames of the clip (temporal sequence length)
    fs = nf + images  # spatial sequences per sample
    adaln = cfg.injection == "adaln"
    n_ctx = 0 if adaln else (2 if cfg.num_classes > 0 else 1)  # condition tokens of "tokens" injection

    # embeddings
    params = _linear(c * s * p * p, d) + _linear(FREQ_DIM, d) + _linear(d, d)
    frozen = t * d + (cfg.token_frames * d if cfg.temporal_pos == "absolute" else 0)
    if cfg.num_classes > 0:
        params += (cfg.num_classes + int(cfg.class_dropout_prob > 0)) * d
    macs = fs * t * c * s * p * p * d + FREQ_DIM * d + d * d

    def attention(seqs: int, length: int, width: int = d) -> int:
        """One MHA over ``seqs`` sequences of ``length`` tokens plus the condition tokens (keys/values only);
        ``width`` = the model width its heads span (half of it for one half of a split-head MHA)."""
        return seqs * 2 * length * (length + n_ctx) * width

    def projections(seqs: int, length: int) -> int:  # qkv on tokens and condition tokens, proj on tokens
        return seqs * (3 * (length + n_ctx) * d * d + length * d * d)

    attn_params, mlp_params = _linear(d, 3 * d) + _linear(d, d), _linear(d, m) + _linear(m, d)
    norm_params = 0 if adaln else 2 * d  # affine LayerNorm
    for spec in block_layout(cfg.variant, cfg.depth):
        if isinstance(spec, AxisBlockSpec):
            seqs, length = (fs, t) if spec.axis == "spatial" else (t, nf)
            params += attn_params + mlp_params + 2 * norm_params + (_linear(d, 6 * d) if adaln else 0)
            macs += projections(seqs, length) + attention(seqs, length) + seqs * length * 2 * d * m
            macs += 6 * d * d * seqs if adaln else 0
        elif isinstance(spec, FactorisedBlockSpec):
            params += 2 * attn_params + mlp_params + 3 * norm_params
            params += _linear(d, 6 * d) + _linear(d, 3 * d) if adaln else 0
            macs += projections(fs, t) + attention(fs, t) + projections(t, nf) + attention(t, nf)
            macs += fs * t * 2 * d * m + (6 * d * d * fs + 3 * d * d * t if adaln else 0)
        elif isinstance(spec, SplitHeadBlockSpec):
            params += attn_params + mlp_params + 2 * norm_params + (_linear(d, 6 * d) if adaln else 0)
            macs += fs * t * 4 * d * d + 3 * n_ctx * d * d * (fs + t)  # qkv + proj; qkv of both context sets
            macs += attention(fs, t, d // 2) + attention(t, nf, d // 2)
            macs += fs * t * 2 * d * m + (6 * d * d * fs if adaln else 0)
        else:  # pragma: no cover - a new spec needs its cost here
            raise TypeError(f"no cost for block spec {spec!r}")

    params += _linear(d, p * p * out) + (_linear(d, 2 * d) if adaln else 2 * d)
    macs += fs * t * d * p * p * out + (2 * d * d * fs if adaln else 0)
    if cfg.patch_embed == "tubelet":
        params += out * out * s + out
        macs += out * out * s * nf * t * p * p  # ConvTranspose3d: s taps per input voxel
    return LatteCost(macs=macs, params=params + frozen, frozen_params=frozen)


def latte_counter(model: nn.Module) -> Cost:
    """``dtx.costs`` counter of a built Latte (meta device is fine): the closed form of ``latte_cost`` for the clip
    the model declares (``input_shape``: ``num_frames`` frames, no appended images), as MACs and real FLOPs."""
    cfg = model.config
    cost = latte_cost(cfg)
    gh, gw = cfg.grid
    return Cost(params=cost.params, trainable_params=cost.trainable_params, macs=cost.macs, flops=2 * cost.macs,
                method=ANALYTIC,
                extra={"variant": cfg.variant, "injection": cfg.injection, "patch_embed": cfg.patch_embed,
                       "temporal_pos": cfg.temporal_pos, "input_size": list(cfg.input_hw),
                       "frames": cfg.num_frames, "token_frames": cfg.token_frames, "tokens_per_frame": gh * gw,
                       "frozen_params": cost.frozen_params,
                       "train_gflops_per_sample": round(3 * cost.real_gflops, 2)})
