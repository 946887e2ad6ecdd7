"""The class labels of the still images of Latte's image-video joint training (Vchitect/Latte's latte_img.py).

A joint-training batch carries ``y_image`` [B, k]: the classes of the k still frames appended to each clip
(``moving-digits`` with ``use_image_num = k``). Latte gives each image frame its own class embedding in the spatial
condition, so the labels go to the model as its keyword ``y_image``; the null condition is the model's null class,
as for ``y`` (``dtx.conditioning.ClassLabelConditioner``), dropped per sample (all k labels together).

Sampling generates clips only (``DataInfo.frames`` counts the clip's frames, without the images), and the model
refuses ``y_image`` for a clip without appended images. So at sampling time the conditioner yields "no images":
labels of shape ``[n, 0]``, for which ``encode`` passes no keyword (the model then conditions on ``y`` alone).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from dtx.conditioning import Conditioner, Fields, SampleRequest
from dtx.data.info import DataInfo
from dtx.errors import ConfigError, ShapeError


def use_image_num_of(model: nn.Module) -> int:
    """The model's ``use_image_num``: from ``model.config`` when it has one, else the attribute, else 0."""
    config = getattr(model, "config", None)
    k = getattr(config, "use_image_num", None) if config is not None else None
    if k is None and isinstance(config, Mapping):
        k = config.get("use_image_num")
    if k is None:
        k = getattr(model, "use_image_num", 0)
    return int(k or 0)


class ImageLabelConditioner(Conditioner):
    """Integer labels ``y_image`` [B, k] of the joint-training images -> model keyword ``y_image``.

    ``bind`` reads the model's ``null_class`` (the null condition; 10% dropout by default when there is one),
    ``num_classes`` and ``use_image_num`` (k). Training batches carry ``[B, k]``; at sampling time (requests,
    defaults, guidance) the fields are ``[n, 0]`` and ``encode`` passes nothing: sampled clips have no images.
    """

    fields = ("y_image",)

    def __init__(self) -> None:
        super().__init__()
        self.null_class: int | None = None
        self.num_classes = 0
        self.use_image_num = 0

    def bind(self, model: nn.Module, info: DataInfo) -> None:
        null = getattr(model, "null_class", None)
        self.null_class = None if null is None else int(null)
        self.num_classes = int(getattr(model, "num_classes", 0) or info.num_classes)
        self.use_image_num = use_image_num_of(model)

    @property
    def default_dropout(self) -> float:
        return 0.1 if self.null_class is not None else 0.0

    @property
    def has_null(self) -> bool:
        return self.null_class is not None

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        y = torch.as_tensor(raw["y_image"])
        if y.ndim != 2 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ShapeError(f"image labels y_image must be integers of shape [B, k], got {y.dtype} "
                             f"{list(y.shape)}")
        if y.shape[1] == 0:  # sampling: clips without appended images, so no image labels for the model
            return {}
        if self.use_image_num and y.shape[1] != self.use_image_num:
            raise ShapeError(f"image labels y_image carry {y.shape[1]} labels per sample, but the model was built "
                             f"with use_image_num={self.use_image_num}")
        return {"y_image": y.to(device=device, dtype=torch.long)}

    def null_fields(self, n: int) -> Fields:
        if self.null_class is None:
            raise ConfigError("this model has no null class (train it with class dropout), so image labels cannot "
                              "be dropped or guided; use --cfg 1 / conditioning dropout 0")
        return {"y_image": torch.full((n, self.use_image_num), self.null_class, dtype=torch.long)}

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        """None: a request names clip classes (``y``), and sampled clips carry no images to label."""
        return None

    def request_parts(self) -> tuple[str, ...]:
        return ()

    def default_fields(self, n: int) -> Fields:
        return {"y_image": torch.zeros((n, 0), dtype=torch.long)}

    def guidance_null(self, request: SampleRequest, n: int) -> Fields:
        return self.default_fields(n)
