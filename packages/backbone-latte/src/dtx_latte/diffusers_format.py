"""Latte (dtx-backbone-latte) and diffusers: why ``dtx convert --to diffusers`` refuses these models.

diffusers has one Latte class, ``LatteTransformer3DModel``: Latte-1's text-to-video layout (Variant 1 order with
PixArt-alpha's adaLN-single blocks, cross-attention to T5 captions and a caption projection; diffusers'
``latte_transformer_3d.py``). dtx
holds that model as dtx-ext-gentron's ``PixArt`` architecture with ``num_frames`` (preset ``Latte-1``), which loads
from and exports to diffusers. The models of this package are the class-conditional/unconditional Latte of
``models/latte.py`` and the paper's other variants, which that layout cannot hold; the reasons are given here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dtx.errors import ConfigError

from .model import Latte

FORMAT = "diffusers-latte"


def refusal(model: Latte) -> str:
    """Why diffusers' LatteTransformer3DModel cannot hold ``model``."""
    cfg = model.config
    reasons = []
    if cfg.variant != 1:
        kind = {2: "late fusion", 3: "factorised attention", 4: "split-head attention"}[cfg.variant]
        reasons.append(f"variant {cfg.variant} ({kind}) is not diffusers' block order: LatteTransformer3DModel "
                       f"zips one spatial and one temporal block (Variant 1) and has no other")
    if cfg.injection == "adaln":
        reasons.append("its blocks are adaLN-Zero, with a modulation MLP per block on t (+ class label); "
                       "LatteTransformer3DModel has adaLN-single (one shared t_block plus a learned table per "
                       "block) and no class-label embedding, so per-block modulation weights have no place there")
    else:
        reasons.append("its conditioning is injected as tokens; LatteTransformer3DModel conditions through "
                       "adaLN-single and caption cross-attention")
    if cfg.patch_embed != "uniform" or cfg.temporal_pos != "absolute" or cfg.spatial_pos != "absolute":
        reasons.append("tubelet patches / rotary positions do not exist in diffusers' Latte")
    return ("diffusers' LatteTransformer3DModel cannot hold this Latte: " + "; ".join(reasons)
            + ". For a Latte diffusers can load, train dtx-ext-gentron's 'Latte-1' preset (the PixArt architecture "
              "with num_frames > 0)")


def detect(path: Path, obj: Any) -> bool:
    """Never a reader: LatteTransformer3DModel folders load through dtx-ext-gentron's diffusers-pixart format."""
    return False


def load(path: Path, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """Unreachable (``detect`` is never true); present because every format registers a reader."""
    raise ConfigError(f"{path}: LatteTransformer3DModel folders are read by dtx-ext-gentron (diffusers-pixart)")


def export(model: nn.Module, facts: dict[str, Any], out: Path) -> list[str] | None:
    """Refuse every Latte of this package with the reasons; None for other families."""
    if not isinstance(model, Latte):
        return None
    raise ConfigError(refusal(model))
