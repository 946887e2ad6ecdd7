"""What a GenTron makes of its text keywords before the blocks: checked captions with the learned null substituted,
the text part of the adaLN condition, the projected captions each block attends to, and ``TextCache``, that work
done once per sampling run (``prepare_conditions``) instead of once per step.

With two encoders (``context_dim_2``) even blocks attend to ``context`` and odd blocks to ``context_2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtx.errors import ShapeError
from dtx.layers import text_tokens

GenTron = nn.Module  # the model these functions serve (``dtx_gentron.model.GenTron``, which imports this module)


@dataclass
class Text:
    """Text of one forward pass, per clip: projected tokens [B, L, D] (raw inputs) or the cross-attention K/V of the
    blocks attending to it [B, blocks, L, 2D] (prepared inputs; one block's [B, L, 2D] after ``at``), key mask
    [B, L]."""

    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    kv: torch.Tensor | None = None

    def at(self, j: int) -> Text:
        """This text as the j-th block attending to it sees it."""
        return self if self.kv is None else Text(self.tokens, self.mask, self.kv[:, j])  # kv [B, L, 2D]


@dataclass
class TextCache:
    """The step-invariant text work of one batch (``prepare_conditions``): the text part of c ``cond`` [B, D] and
    the cross-attention K/V of the blocks attending to each text ``kv`` [B, blocks, L, 2D] with its key mask
    ``mask`` [B, L] (``_2``: the second encoder's, odd blocks). A memo of the batch's text keywords, never a
    replacement for them."""

    cond: torch.Tensor
    kv: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kv_2: torch.Tensor | None = None
    mask_2: torch.Tensor | None = None


def text_blocks(depth: int, two_texts: bool) -> list[range]:
    """Indices of the blocks attending to each text: all, or even/odd ones with two encoders."""
    return [range(0, depth, 2), range(1, depth, 2)] if two_texts else [range(depth)]


def caption(context: torch.Tensor | None, mask: torch.Tensor | None, null: torch.Tensor | None,
            text_null: torch.Tensor | None, width: int, b: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked caption tokens [B, L, width] and mask [B, L], the learned ``null`` caption substituted where
    ``text_null`` is True."""
    context, mask = text_tokens(context, mask, b, width, name)
    if text_null is not None and null is not None:
        if null.shape[0] != context.shape[1]:
            raise ShapeError(f"{name} has {context.shape[1]} tokens but the learned null caption has "
                             f"{null.shape[0]} (text_length)")
        drop = text_null.bool().view(b, 1, 1)
        context = torch.where(drop, null.to(context.dtype)[None], context)
        mask = mask | drop.view(b, 1)
    return context, mask


def encode_text(model: GenTron, b: int, context: torch.Tensor | None, context_mask: torch.Tensor | None,
                pooled: torch.Tensor | None, text_null: torch.Tensor | None, context_2: torch.Tensor | None,
                context_mask_2: torch.Tensor | None) -> tuple[torch.Tensor, list[Text | None]]:
    """The text part of c [B, D] (``pooled_embedder`` of the pooled text; without ``pooled``, of the tokens'
    masked mean) and the projected captions (None without cross-attention) from raw inputs."""
    cfg = model.config
    if context is None and pooled is not None and not cfg.cross_attention:
        return model.pooled_embedder(pooled), [None, None]  # [B, D]: adaLN-only needs the pooled text alone
    ctx, mask = caption(context, context_mask, model.null_context, text_null, cfg.context_dim, b, "context")
    if pooled is None or (text_null is not None and model.null_context is not None):
        weights = mask.to(ctx.dtype).unsqueeze(-1)  # [B, L, 1]
        mean = (ctx * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, C_txt]
        pooled = mean if pooled is None else torch.where(text_null.bool()[:, None], mean, pooled)
    if pooled.shape != (b, cfg.context_dim):
        raise ShapeError(f"pooled must be [{b}, {cfg.context_dim}], got {list(pooled.shape)}")
    texts: list[Text | None] = [None, None]
    if cfg.cross_attention:
        texts[0] = Text(model.y_proj(ctx), mask)  # [B, L, D]
        if cfg.context_dim_2:
            ctx2, mask2 = caption(context_2, context_mask_2, model.null_context_2, text_null, cfg.context_dim_2, b,
                                  "context_2")
            texts[1] = Text(model.y_proj_2(ctx2), mask2)  # [B, L2, D]
    return model.pooled_embedder(pooled), texts  # [B, D], captions


def prepare(model: GenTron, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (forward's text keywords) plus ``text_cache``: the text part of c and every block's cross-attention
    K/V, computed once."""
    rows = raw.get("context") if raw.get("context") is not None else raw.get("pooled")
    if rows is None:
        raise ShapeError(f"GenTron needs text: context [B, L, {model.config.context_dim}] (run a text conditioner)")
    keys = ("context", "context_mask", "pooled", "text_null", "context_2", "context_mask_2")
    text_cond, texts = encode_text(model, rows.shape[0], *(raw.get(k) for k in keys))
    parts: dict[str, torch.Tensor | None] = {}
    for suffix, text, blocks in zip(("", "_2"), texts, text_blocks(model.config.depth, texts[1] is not None)):
        if text is not None:
            kvs = [model.blocks[i].cross_attn.project_context(text.tokens) for i in blocks]  # each [B, L, 2D]
            parts["kv" + suffix] = torch.stack(kvs, dim=1)  # [B, blocks, L, 2D]
            parts["mask" + suffix] = text.mask  # [B, L]
    cache = TextCache(text_cond, **parts)  # type: ignore[arg-type]
    return {**{k: v for k, v in raw.items() if v is not None}, "text_cache": cache}


def cached_text(model: GenTron, b: int, cache: TextCache) -> list[Text | None]:
    """The blocks' texts from a checked ``TextCache`` (per-block K/V)."""
    cfg, d = model.config, model.config.hidden_size
    if cache.cond.shape != (b, d):
        raise ShapeError(f"text_cache.cond must be [{b}, {d}] (prepare_conditions of this batch), got "
                         f"{list(cache.cond.shape)}")
    texts: list[Text | None] = [None, None]
    if not cfg.cross_attention:
        return texts
    for j, blocks in enumerate(text_blocks(cfg.depth, bool(cfg.context_dim_2))):
        name = "text_cache.kv" + ("_2" if j else "")
        kv, mask = (cache.kv_2, cache.mask_2) if j else (cache.kv, cache.mask)
        if kv is None or kv.ndim != 4 or kv.shape[:2] != (b, len(blocks)) or kv.shape[3] != 2 * d:
            got = None if kv is None else list(kv.shape)
            raise ShapeError(f"{name} must be [{b}, {len(blocks)}, L, {2 * d}] (prepare_conditions), got {got}")
        if mask is not None and mask.shape != kv.shape[:1] + kv.shape[2:3]:
            raise ShapeError(f"{name} mask must be {[b, kv.shape[2]]}, got {list(mask.shape)}")
        texts[j] = Text(None, mask, kv)  # kv [B, blocks, L, 2D], mask [B, L]
    return texts
