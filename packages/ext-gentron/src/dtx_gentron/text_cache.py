"""Pre-extracted text embeddings, so training need not run the text encoder.

``extract_text_embeddings`` encodes every item's caption once into shards ``shard_NNNNN.safetensors`` (the core's
latent-shard naming and atomic writes) holding ``x`` (as the dataset yields it), ``y`` when items carry labels,
``context`` [n, L, D] and ``pooled`` [n, D] in the storage ``dtype`` (float16 by default: half the disk, error
~1e-3 relative), ``context_mask`` [n, L] bool, and ``context_2``/``context_mask_2`` with a second encoder. Beside them,
``null.safetensors`` holds the empty caption's encoding (no batch axis) and ``text_embeddings.json`` (written last,
so a folder without it is incomplete) the ``TextConditioner`` options, the null mode, the count and the data info.

``TextEmbeddingShards`` yields ``x`` and the raw fields ``text_context``, ``text_mask``, ``text_pooled`` (+ ``_2``);
``PrecomputedTextConditioner`` passes them to the model as ``context``, ``context_mask``, ``pooled``. Its null is the
stored empty-caption encoding, or with ``null='learned'`` an all-False ``text_mask`` (no real caption has one: the
tokenizer adds special tokens), which ``encode`` turns into ``text_null``. Prompts at sampling time are encoded by a
``TextConditioner`` with the recorded options, built on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dtx.conditioning import Conditioner, Fields, SampleRequest
from dtx.data.info import DataInfo, data_info
from dtx.data.latents import SHARD_GLOB, ShardedRows, shard_name
from dtx.errors import ConfigError, DataError
from dtx.io import atomic_write, atomic_write_text

from .text import DTYPES, NULLS, TextConditioner, model_option

FORMAT = "dtx-text-embeddings/1"
METADATA = "text_embeddings.json"
NULL_FILE = "null.safetensors"
#: shard key -> raw field of TextEmbeddingShards items and PrecomputedTextConditioner
RAW = {"context": "text_context", "context_mask": "text_mask", "pooled": "text_pooled",
       "context_2": "text_context_2", "context_mask_2": "text_mask_2"}
#: options that change the stored embeddings, so must match the metadata
EMBEDDING_OPTIONS = ("encoder", "encoder_2", "max_length", "max_length_2", "pooling")


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": FORMAT}))


def _info_of(dataset: Any, x: torch.Tensor) -> DataInfo:
    """The source dataset's ``DataInfo`` (fields replaced later), or one read off ``x`` [C, H, W] / [F, C, H, W]."""
    try:
        return data_info(dataset)
    except ConfigError:
        if x.ndim not in (3, 4):
            raise DataError(f"dataset items have x of shape {list(x.shape)}; expected [C, H, W] or [F, C, H, W]")
        return DataInfo(channels=x.shape[-3], height=x.shape[-2], width=x.shape[-1],
                        frames=None if x.ndim == 3 else x.shape[0])


def _clear(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (nothing written) unless ``overwrite``, which removes earlier extraction files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"text-embedding output {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"text-embedding output folder {out} is not empty; choose an empty folder or pass "
                          f"overwrite=True")
    for path in [*out.glob(SHARD_GLOB), *out.glob(".tmp-*"), out / METADATA, out / NULL_FILE]:
        path.unlink(missing_ok=True)


def extract_text_embeddings(dataset: Any, conditioner: TextConditioner, out_dir: str | Path, shard_size: int = 1024,
                            batch_size: int = 64, overwrite: bool = False, dtype: str = "float16") -> Path:
    """Encode the ``text`` of every item of ``dataset`` (dicts with ``x`` and ``text``) into shards under
    ``out_dir``; returns the folder. ``dtype`` is the storage dtype of ``context`` and ``pooled``."""

    if dtype not in DTYPES:
        raise ConfigError(f"text-embedding dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"text-embedding {name} must be >= 1, got {value}")
    out = Path(out_dir).expanduser()
    _clear(out, overwrite)
    if len(dataset) == 0:
        raise DataError("cannot extract text embeddings of an empty dataset")
    store = DTYPES[dtype]
    device = next(conditioner.parameters()).device
    shards, info, has_y = [], None, False
    for k, start in enumerate(range(0, len(dataset), shard_size)):
        parts: dict[str, list[torch.Tensor]] = {}
        for b in range(start, min(len(dataset), start + shard_size), batch_size):
            items = [dataset[i] for i in range(b, min(len(dataset), start + shard_size, b + batch_size))]
            missing = [key for key in ("x", "text") if key not in items[0]]
            if missing:
                raise DataError(f"dataset items need fields x and text; item {b} has {', '.join(sorted(items[0]))}")
            x = torch.stack([torch.as_tensor(item["x"]) for item in items])
            info = info or _info_of(dataset, x[0])
            has_y = "y" in items[0]
            encoded = conditioner.encode({"text": [item["text"] for item in items]}, device)
            encoded.pop("text_null", None)  # captions of a dataset are never dropped
            batch = {"x": x, **{key: v.cpu() if v.dtype == torch.bool else v.to("cpu", store)
                                for key, v in encoded.items()}}
            if has_y:
                batch["y"] = torch.as_tensor([int(item["y"]) for item in items], dtype=torch.int64)
            for key, v in batch.items():
                parts.setdefault(key, []).append(v)
        shards.append(_save(out / shard_name(k), {key: torch.cat(v) for key, v in parts.items()}).name)
    empty = {key: v[0].to(store) if v.is_floating_point() else v[0]
             for key, v in conditioner.empty_encoding().items()}
    _save(out / NULL_FILE, empty)
    fields = tuple(RAW[key] for key in RAW if key in empty) + (("y",) if has_y else ())
    info = DataInfo(**{**info.to_dict(), "fields": fields,
                       "num_classes": info.num_classes if has_y else 0})
    meta = {"format": FORMAT, "conditioner": conditioner.options, "null": conditioner.null,
            "encoder_sources": [t.source for t in conditioner.towers], "max_length": conditioner.options["max_length"],
            "hidden_size": conditioner.hidden_size, "hidden_size_2": conditioner.hidden_size_2,
            "count": len(dataset), "shard_size": shard_size, "shards": shards, "dtype": dtype,
            "null_file": NULL_FILE, "info": info.to_dict()}
    atomic_write_text(out / METADATA, json.dumps(meta, indent=2) + "\n")
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a text-embedding folder; ``DataError`` if it is missing (an unfinished extraction)."""
    file = Path(path).expanduser() / METADATA
    if not file.is_file():
        raise DataError(f"no {METADATA} in {Path(path).expanduser()}: not a text-embedding folder, or its "
                        f"extraction did not finish (rerun extract_text_embeddings with overwrite=True)")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TextEmbeddingShards(ShardedRows):
    """``{"x", "text_context" [L, D], "text_mask" [L], "text_pooled" [D] (+ ``_2``), "y" when stored}`` from a
    folder written by ``extract_text_embeddings``; embeddings come back as float32. ``info`` names those fields."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser()
        self.metadata = read_metadata(self.root)
        self.shards = [self.root / name for name in self.metadata["shards"]]
        missing = [p.name for p in self.shards if not p.is_file()]
        if missing:
            raise DataError(f"text-embedding folder {self.root} lacks shard {missing[0]}")
        sizes = []
        for p in self.shards:
            with safe_open(str(p), framework="pt") as f:
                sizes.append(f.get_slice("x").get_shape()[0])
        self._set_sizes(sizes)
        if self.offsets[-1] != int(self.metadata["count"]):
            raise DataError(f"text-embedding folder {self.root} holds {self.offsets[-1]} items, its metadata says "
                            f"{self.metadata['count']}")
        self.info = DataInfo.from_dict(self.metadata["info"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f, j = self._row(i)
        item = {"x": f.get_slice("x")[j:j + 1][0]}
        for key in f.keys():
            if key in RAW:
                v = f.get_slice(key)[j:j + 1][0]
                item[RAW[key]] = v.float() if v.is_floating_point() else v
        if "y" in f.keys():
            item["y"] = f.get_slice("y")[j:j + 1][0]
        return item


class PrecomputedTextConditioner(Conditioner):
    """Stored embeddings ``text_context``, ``text_mask``, ``text_pooled`` (+ ``_2``) -> model keywords ``context``,
    ``context_mask``, ``pooled`` (+ ``_2``, + ``text_null`` with ``null='learned'``).

    ``path``: the folder of ``extract_text_embeddings``, whose metadata gives the encoder options and the null
    encoding; options given beside it must agree. Without ``path`` (sampling where the shards are absent) the
    encoder options must be given and the null is encoded by the encoder. Prompts and negative prompts are encoded
    by a ``TextConditioner`` of those options, built on first use.
    """

    def __init__(self, path: str | None = None, encoder: str | None = None, encoder_2: str | None = None,
                 max_length: int | None = None, max_length_2: int | None = None, pooling: str | None = None,
                 null: str | None = None, dtype: str = "float32") -> None:
        super().__init__()
        given = {"encoder": encoder, "encoder_2": encoder_2, "max_length": max_length,
                 "max_length_2": max_length_2, "pooling": pooling, "null": null}
        stored: dict[str, torch.Tensor] = {}
        if path is not None:
            meta = read_metadata(path)
            recorded = dict(meta["conditioner"])
            for key in EMBEDDING_OPTIONS:
                if given[key] is not None and given[key] != recorded.get(key):
                    raise ConfigError(f"text-embeddings option {key}={given[key]!r} disagrees with the embeddings in "
                                      f"{path} ({key}={recorded.get(key)!r}); leave it out or re-extract")
            options = {**recorded, **{k: v for k, v in given.items() if v is not None}}
            stored = load_file(str(Path(path).expanduser() / meta.get("null_file", NULL_FILE)))
        elif encoder is None:
            raise ConfigError("the text-embeddings conditioner needs option path (a folder written by "
                              "extract_text_embeddings) or encoder (to encode prompts and the null caption)")
        else:
            options = {k: v for k, v in given.items() if v is not None}
        options["dtype"] = dtype
        if options.get("null", "empty") not in NULLS:
            raise ConfigError(f"text-embeddings option null must be one of {NULLS}, got {options['null']!r}")
        self.path, self.options, self.null = path, options, options.get("null", "empty")
        two = options.get("encoder_2") is not None
        self.keys = tuple(k for k in RAW if two or not k.endswith("_2"))
        self.fields = tuple(RAW[k] for k in self.keys)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the stage to its device
        for key, value in stored.items():
            self.register_buffer(f"null_{key}", value, persistent=False)
        self._text: list[TextConditioner] = []  # a plain list: the lazily built encoder is no registered submodule

    def bind(self, model: nn.Module, info: DataInfo) -> None:
        """Check the model's ``context_dim`` (and ``context_dim_2``), when it declares one, fits the stored widths."""
        for key, name in (("context", "context_dim"), ("context_2", "context_dim_2")):
            want, have = model_option(model, name), getattr(self, f"null_{key}", None)
            if want is not None and have is not None and int(want) != have.shape[-1]:
                raise ConfigError(f"the model's {name}={want} does not match the text embeddings in {self.path} "
                                  f"(width {have.shape[-1]}, encoder {self.options.get('encoder')!r})")

    @property
    def default_dropout(self) -> float:
        return 0.1  # PixArt's caption dropout

    def text_conditioner(self) -> TextConditioner:
        """The ``TextConditioner`` of the recorded options (built on first use, frozen) for prompts."""
        if not self._text:
            conditioner = TextConditioner(**{k: v for k, v in self.options.items() if v is not None})
            self._text.append(conditioner.requires_grad_(False).eval())
        return self._text[0]

    def _raw(self, encoded: Mapping[str, torch.Tensor]) -> Fields:
        return {RAW[k]: encoded[k].cpu() for k in self.keys}

    def _empty(self) -> dict[str, torch.Tensor]:
        """The empty caption's encoding per shard key, without batch axis."""
        if hasattr(self, "null_context"):
            return {k: getattr(self, f"null_{k}").cpu().float() if k not in ("context_mask", "context_mask_2")
                    else getattr(self, f"null_{k}").cpu() for k in self.keys}
        return {k: v[0] for k, v in self.text_conditioner().empty_encoding().items()}

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            value = torch.as_tensor(raw[RAW[key]]).to(device)
            out[key] = value.bool() if key.startswith("context_mask") else value.float()
        if self.null == "learned":  # new tensors: the raw batch is not written to
            dropped = ~out["context_mask"].any(1)
            for key in self.keys:
                d = dropped.reshape(-1, *[1] * (out[key].ndim - 1))
                out[key] = out[key] | d if key.startswith("context_mask") else out[key].masked_fill(d, 0.0)
            out["text_null"] = dropped
        return out

    def null_fields(self, n: int) -> Fields:
        empty = self._empty()
        if self.null == "learned":  # the marker encode reads as "dropped": zero context, all-False masks
            return {RAW[k]: torch.zeros((n, *v.shape), dtype=v.dtype) for k, v in empty.items()}
        return {RAW[k]: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in empty.items()}

    def _encode_prompts(self, prompts: list[str]) -> Fields:
        text = self.text_conditioner()
        return self._raw(text.encode({"text": prompts}, self.anchor.device))

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        return [self._encode_prompts([str(p)]) for p in request.prompts] or None

    def request_parts(self) -> tuple[str, ...]:
        return ("prompts", "negative_prompt")

    def guidance_null(self, request: SampleRequest, n: int) -> Fields:
        """The negative prompt's encoding when the request has one, else the null condition."""
        if request.negative_prompt is not None:
            one = self._encode_prompts([str(request.negative_prompt)])
            return {k: v.expand(n, *v.shape[1:]).clone() for k, v in one.items()}
        return self.null_fields(n)


# -- `dtx extract-text` ------------------------------------------------------------------------------------------

def configure_parser(p: Any) -> None:
    """Arguments of ``dtx extract-text DATASET OUT``."""
    p.add_argument("dataset", help="a registered dataset whose items carry `text` (e.g. captioned-digits)")
    p.add_argument("output", help="folder for the shards (train with data.name=text-embeddings data.options.path=OUT)")
    p.add_argument("--data", nargs="*", metavar="KEY=VALUE", default=[], help="dataset options, e.g. split=train")
    p.add_argument("--text", nargs="*", metavar="KEY=VALUE", default=[],
                   help="options of the `text` conditioner, e.g. encoder=minilm max_length=20 (as the recipe's)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="storage dtype of the embeddings")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier extraction in OUTPUT")


def run(args: Any) -> int:
    """Encode every caption of the dataset once; print the folder and how to train on it."""
    from dtx.config import parse_options
    from dtx.data import build_dataset
    from dtx.options import check_options

    data_options, text_options = parse_options(args.data), parse_options(args.text)
    check_options("text conditioner", TextConditioner, text_options)
    dataset = build_dataset(args.dataset, **data_options)  # both checked before anything is written
    out = extract_text_embeddings(dataset, TextConditioner(**text_options), args.output, shard_size=args.shard_size,
                                  batch_size=args.batch_size, overwrite=args.overwrite, dtype=args.dtype)
    fragment = {"data": {"name": "text-embeddings", "options": {"path": str(out)}},
                "conditioning": {"conditioners": {"text": {"name": "text-embeddings", "options": {"path": str(out)}}}}}
    print(json.dumps({"out": str(out), "count": len(dataset), "dtype": args.dtype, "recipe": fragment}))
    return 0
