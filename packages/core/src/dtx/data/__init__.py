"""Datasets for training: a registry-backed ``build_dataset`` and a generic ``collate``.

Every item is a dict: ``x`` is a float tensor ``[C, H, W]`` (or ``[F, C, H, W]`` for video clips) holding pixels in
[-1, 1] or already-scaled latents, and ``y`` a scalar int64 class (absent for unconditional data); later datasets may
add keys such as ``text``. Every built-in dataset describes itself with ``info`` (a ``DataInfo``; ``data_info(ds)``
also derives one for third-party datasets) and still exposes the older ``num_classes`` (0 if none), ``channels`` and
``image_size`` (of ``x``), ``is_latent`` and, when latent, ``latent_scale``.

Loaders wrap their dataset in ``CarryErrors`` and batch with ``collate_carrying``: a user error raised in a DataLoader
worker process then reaches the main process as it was raised (``raise_carried``), one line, instead of torch's
re-raised copy whose message holds the worker's whole traceback.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .. import plugins
from ..errors import ConfigError, DataError, DtxError, ShapeError
from ..options import check_options
from .info import DataInfo, data_info


def build_dataset(name: str, **options: Any) -> Dataset:
    """Build the dataset registered as ``name`` (``digits``, ``image-folder``, ``latent-folder``, ``video-folder``)."""
    entry = plugins.get("dataset", name)
    factory = entry.obj
    check_options(f"dataset {entry.name!r}", factory, options)
    try:
        return factory(**options)
    except DtxError:
        raise
    except TypeError as exc:
        raise ConfigError(f"cannot build dataset {entry.name!r} with {options}: {exc}") from exc


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return plugins.names("dataset")


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of item dicts key by key: tensors and numbers become batched tensors, anything else a list."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    keys = list(batch[0])
    for item in batch[1:]:
        if set(item) != set(keys):
            raise DataError(f"items in one batch have different keys: {sorted(keys)} vs {sorted(item)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ShapeError(f"cannot batch {key!r}: items have different shapes {sorted(shapes)}")
            out[key] = torch.stack(values)
        elif isinstance(values[0], numbers.Number):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


@dataclass
class Carried:
    """A user error raised while a batch was built, in place of the batch."""

    error: DtxError


class CarryErrors(Dataset):
    """``dataset`` whose items return a user error (``DtxError``) as a ``Carried`` instead of raising it, so that it
    crosses from a DataLoader worker to the main process unchanged."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except DtxError as exc:
            return Carried(exc)


def collate_carrying(batch: Sequence[Any]) -> Any:
    """``collate`` for a ``CarryErrors`` dataset: the first carried error (or collate's own) stands for the batch."""
    carried = next((item for item in batch if isinstance(item, Carried)), None)
    if carried is not None:
        return carried
    try:
        return collate(batch)
    except DtxError as exc:
        return Carried(exc)


def raise_carried(batch: Any) -> Any:
    """The batch, or the user error carried in its place raised as it was (no worker traceback in its message)."""
    if isinstance(batch, Carried):
        raise batch.error
    return batch


__all__ = ["CarryErrors", "DataInfo", "build_dataset", "collate", "collate_carrying", "data_info", "list_datasets",
           "raise_carried"]
