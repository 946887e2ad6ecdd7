"""Pre-extracted VAE latents: safetensors shards written by ``dtx extract-latents`` and the dataset that reads them.

A shard ``shard_NNNNN.safetensors`` holds ``latents`` [n, C, h, w] (already multiplied by the VAE scale factor), or
[n, F, C, h, w] for video clips encoded frame by frame, ``labels`` [n] int64 and optionally ``latents_flipped`` (the
latents of the mirrored images). Its string metadata records the format, ``scale_factor``, ``shift_factor``, the
source folder, the VAE, the pixel ``image_size``, the posterior mode and the class names, and for clips ``frames``
and ``frame_interval``. Shards are read lazily through memory-mapped ``safe_open`` handles.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..errors import DataError
from ..file_headers import safetensors_header
from ..io import atomic_write
from .info import DataInfo

FORMAT = "dtx-latents/1"
SHARD_GLOB = "shard_*.safetensors"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write one shard atomically (``dtx.io.atomic_write``: temporary sibling, fsync, rename)."""
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))


REQUIRED_METADATA = ("scale_factor", "image_size")


def read_shard_metadata(path: Path) -> dict[str, Any]:
    """The metadata of one shard with JSON values decoded; ``DataError`` if it is not a dtx latent shard. The
    header is checked against the file first (``dtx.file_headers.safetensors_header``), so no declared size is trusted."""
    raw = safetensors_header(path).get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise DataError(f"{path} is not a dtx latent shard (format {raw.get('format')!r}, expected {FORMAT!r})")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            out[k] = v
    missing = [k for k in REQUIRED_METADATA if k not in out]
    if missing:
        raise DataError(f"latent shard {path} has no {missing[0]!r} metadata; rewrite it with `dtx extract-latents`")
    for key in ("scale_factor", "shift_factor"):
        if key in out and not (isinstance(out[key], (int, float)) and math.isfinite(out[key])
                               and (key != "scale_factor" or out[key] > 0)):
            raise DataError(f"latent shard {path}: {key} metadata must be a finite number, got {out[key]!r}")
    if not isinstance(out["image_size"], int) or out["image_size"] < 1:
        raise DataError(f"latent shard {path}: image_size metadata must be a positive integer")
    return out


class ShardedRows(Dataset):
    """Rows spread over safetensors shards, read lazily through one memory-mapped ``safe_open`` handle per shard:
    the indexing, length and pickling shared by every shard-backed dataset (latents here, text embeddings in
    dtx-ext-gentron). Subclasses set ``shards`` and call ``_set_sizes``; ``_row(i)`` gives a handle and a row."""

    shards: list[Path]

    def _set_sizes(self, sizes: list[int]) -> None:
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + int(n))
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open safetensors handles do not cross process boundaries
        return state

    def __len__(self) -> int:
        return self.offsets[-1]

    def _row(self, i: int) -> tuple[Any, int]:
        """The open shard holding row ``i`` (negative counts from the end) and the row's index in it."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        shard = bisect.bisect_right(self.offsets, i) - 1
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.shards[shard]), framework="pt")
        return self._handles[shard], i - self.offsets[shard]


class LatentFolderDataset(ShardedRows):
    """``{"x": scaled latent [C, h, w] (or [F, C, h, w] for clips), "y": class}`` from a folder of latent shards.

    ``image_size`` and ``channels`` describe ``x`` (the latent grid), ``frames`` its clip length (None for
    images); ``pixel_size`` is the size of the source images. With ``flip`` and shards that hold
    ``latents_flipped``, each item picks one of the two at random. ``info`` is the full ``DataInfo``.
    """

    is_latent = True

    def __init__(self, root: str | Path, flip: bool = True) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"latent folder not found: {self.root}")
        self.shards = sorted(self.root.glob(SHARD_GLOB))
        if not self.shards:
            raise DataError(f"no latent shards ({SHARD_GLOB}) in {self.root}; write them with `dtx extract-latents`")
        self.metadata = read_shard_metadata(self.shards[0])
        sizes, flips, shape = [], [], None
        for path in self.shards:
            meta = read_shard_metadata(path)
            for key in ("scale_factor", "shift_factor", "vae", "image_size", "classes", "frames"):
                if meta.get(key) != self.metadata.get(key):
                    raise DataError(f"latent shards in {self.root} disagree on {key}: {path.name} has "
                                    f"{meta.get(key)!r}, {self.shards[0].name} has {self.metadata.get(key)!r}")
            header = safetensors_header(path)
            for key in ("latents", *(("labels",) if self.metadata.get("classes") else ())):
                if key not in header:
                    raise DataError(f"latent shard {path} has no {key!r} tensor")
            s = list(header["latents"]["shape"])
            if "labels" in header and header["labels"]["shape"] != s[:1]:
                raise DataError(f"latent shard {path}: labels have shape {header['labels']['shape']}, "
                                f"latents {s}")
            flips.append("latents_flipped" in header and header["latents_flipped"]["shape"] == s)
            if shape is not None and s[1:] != shape:
                raise DataError(f"latent shard {path} has shape {s[1:]}, others {shape}")
            shape = s[1:]
            sizes.append(s[0])
        self._set_sizes(sizes)
        frames = self.metadata.get("frames")
        if len(shape) != (3 if frames is None else 4) or (frames is not None and shape[0] != frames):
            kind = "images: [n, C, h, w]" if frames is None else f"{frames}-frame clips: [n, {frames}, C, h, w]"
            raise DataError(f"latent shards in {self.root} have latents of shape [n, {', '.join(map(str, shape))}] "
                            f"but their metadata describe {kind}")
        self.frames: int | None = None if frames is None else int(frames)
        self.channels, self.height, self.width = (int(v) for v in shape[-3:])
        self.image_size = self.height
        self.latent_scale = float(self.metadata["scale_factor"])
        self.latent_shift = float(self.metadata.get("shift_factor") or 0.0)
        self.pixel_size = int(self.metadata["image_size"])
        self.vae = str(self.metadata.get("vae", ""))
        self.classes = list(self.metadata.get("classes") or [])
        self.num_classes = len(self.classes)
        self.flip = flip and all(flips)
        if self.num_classes:
            self._check_labels()

    def _check_labels(self) -> None:
        """Every stored label must name one of the shards' classes (a label past them would train as another
        class, or as the model's null class)."""
        for path in self.shards:
            with safe_open(str(path), framework="pt") as f:
                labels = f.get_tensor("labels")
            if labels.is_floating_point() or labels.ndim != 1:
                raise DataError(f"latent shard {path}: labels must be integers [n], got {labels.dtype} "
                                f"{list(labels.shape)}")
            if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
                raise DataError(f"latent shard {path} has label {int(labels.max())} (or {int(labels.min())}), "
                                f"outside its {self.num_classes} classes 0..{self.num_classes - 1}")

    @property
    def info(self) -> DataInfo:
        return DataInfo(channels=self.channels, height=self.height, width=self.width, frames=self.frames,
                        num_classes=self.num_classes, is_latent=True, latent_scale=self.latent_scale,
                        latent_shift=self.latent_shift, vae=self.vae or None,
                        vae_downsample=max(1, self.pixel_size // self.height),
                        fields=("y",) if self.num_classes else ())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f, j = self._row(i)
        key = "latents_flipped" if self.flip and torch.rand(()) < 0.5 else "latents"
        item = {"x": f.get_slice(key)[j:j + 1][0].float()}
        if self.num_classes:
            item["y"] = f.get_slice("labels")[j:j + 1][0].long()
        return item
