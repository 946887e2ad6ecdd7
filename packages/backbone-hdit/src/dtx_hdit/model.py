"""HDiT, the Hourglass Diffusion Transformer (Crowson et al., ICML 2024), in pixel space, with k-diffusion's
``image_transformer_v2`` state-dict layout so its checkpoints load as they are.

Read top to bottom: helpers, the configuration (attention and level specs), layers (level specs become layers in
one place, ``build_level``), the model, presets. Internals are channels-last [B, H, W, C]; every Linear is bias-free;
the output projections are zero-initialised, so a fresh model outputs exactly 0. Neighborhood and global attention
go through ``dtx.attention`` (NATTEN on CUDA; on CPU the core's exact pure-PyTorch paths, which train).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import nn

from dtx.attention import attention, neighborhood_attention
from dtx.config import check
from dtx.errors import ConfigError, ShapeError
from dtx.layers import (AdaRMSNorm, AxialRoPE, FourierFeatures, Linear, LinearGEGLU, RMSNorm, apply_rotary,
                        check_label_range, make_axial_pos, recomputed)


# -- helpers -----------------------------------------------------------------------------------------------------

def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def zero_init(layer: Linear) -> Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def merge_tokens(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """Channels-last pixel-unshuffle ``... (h nh) (w nw) e -> ... h w (nh nw e)``."""
    *b, h, w, e = x.shape
    x = x.reshape(*b, h // nh, nh, w // nw, nw, e).transpose(-4, -3)
    return x.reshape(*b, h // nh, w // nw, nh * nw * e)


def split_tokens(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """The inverse pixel-shuffle ``... h w (nh nw e) -> ... (h nh) (w nw) e``."""
    *b, h, w, c = x.shape
    x = x.reshape(*b, h, w, nh, nw, c // (nh * nw)).transpose(-4, -3)
    return x.reshape(*b, h * nh, w * nw, c // (nh * nw))


def downscale_pos(pos: torch.Tensor) -> torch.Tensor:
    """[h, w, 2] positions -> [h/2, w/2, 2]: each merged token sits at the mean of its 2x2 children."""
    h, w, e = pos.shape
    return pos.reshape(h // 2, 2, w // 2, 2, e).mean(dim=(1, 3))


def scale_for_cosine_sim(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                         eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k each divided by their norm and multiplied by sqrt(scale), so that q.k = scale * cos(q, k); in fp32."""
    dtype = functools.reduce(torch.promote_types, (q.dtype, k.dtype, scale.dtype, torch.float32))
    sqrt_scale = scale.to(dtype).sqrt()
    scale_q = sqrt_scale * torch.rsqrt(q.to(dtype).pow(2).sum(-1, keepdim=True) + eps)
    scale_k = sqrt_scale * torch.rsqrt(k.to(dtype).pow(2).sum(-1, keepdim=True) + eps)
    return q * scale_q.to(q.dtype), k * scale_k.to(k.dtype)


@functools.lru_cache(maxsize=32)
def _window_mask(n_h: int, n_w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """[n_h * n_w, 1, ws², ws²] attend-mask of shifted windows (k-diffusion's): the windows of the first row and
    column hold tokens rolled in from the far border; those attend only to tokens of their own side."""
    pos = torch.arange(window, device=device)
    side = (pos < shift)  # inside a first-row/column window: rolled in from the opposite border
    first_h = (torch.arange(n_h, device=device) == 0)[:, None] & side[None]  # [n_h, ws]
    first_w = (torch.arange(n_w, device=device) == 0)[:, None] & side[None]  # [n_w, ws]
    same_h = first_h[:, :, None] == first_h[:, None, :]  # [n_h, ws(q), ws(k)]
    same_w = first_w[:, :, None] == first_w[:, None, :]
    mask = same_h[:, None, :, None, :, None] & same_w[None, :, None, :, None, :]  # [n_h, n_w, qh, qw, kh, kw]
    return mask.reshape(n_h * n_w, 1, window * window, window * window)


def shifted_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, shift: int,
                             scale: float = 1.0) -> torch.Tensor:
    """Window attention on heads-last [B, H, W, heads, D]: roll by ``shift``, attend within ws x ws windows (masked
    where the roll wrapped the border), roll back. ``window`` must divide H and W."""
    b, h, w, nh, _ = q.shape
    n_h, n_w = h // window, w // window

    def windows(t: torch.Tensor) -> torch.Tensor:
        if shift:
            t = torch.roll(t, shifts=(shift, shift), dims=(1, 2))
        t = t.reshape(b, n_h, window, n_w, window, nh, t.shape[-1]).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b * n_h * n_w, nh, window * window, t.shape[-1])

    mask = None
    if shift:
        mask = _window_mask(n_h, n_w, window, shift, q.device)
        mask = mask.expand(b, *mask.shape).reshape(b * n_h * n_w, 1, *mask.shape[-2:])
    out = attention(windows(q), windows(k), windows(v), mask=mask, scale=scale)
    out = out.reshape(b, n_h, n_w, nh, window, window, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, h, w, nh, -1)
    return torch.roll(out, shifts=(-shift, -shift), dims=(1, 2)) if shift else out


# -- configuration: attention and level specs -------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalAttentionSpec:
    d_head: int = 64


@dataclass(frozen=True)
class NeighborhoodAttentionSpec:
    d_head: int = 64
    kernel_size: int = 7


@dataclass(frozen=True)
class ShiftedWindowAttentionSpec:
    d_head: int = 64
    window_size: int = 8


@dataclass(frozen=True)
class NoAttentionSpec:
    pass


AttentionSpec = Union[GlobalAttentionSpec, NeighborhoodAttentionSpec, ShiftedWindowAttentionSpec, NoAttentionSpec]
#: k-diffusion's JSON ``type`` of each spec and the name of its size field
_ATTN_TYPES: dict[str, tuple[type, str | None]] = {
    "global": (GlobalAttentionSpec, None), "neighborhood": (NeighborhoodAttentionSpec, "kernel_size"),
    "shifted-window": (ShiftedWindowAttentionSpec, "window_size"), "none": (NoAttentionSpec, None),
}
_SPEC_TYPES = {cls: name for name, (cls, _) in _ATTN_TYPES.items()}


def parse_attention(value: Any) -> AttentionSpec:
    """An attention spec from k-diffusion's JSON form (``{"type": "neighborhood", "d_head": 64, "kernel_size": 7}``),
    a short string (``"global"``, ``"neighborhood"``, ``"neighborhood:7"``, ``"shifted-window:8"``, ``"none"``;
    d_head 64) or a spec instance."""
    if isinstance(value, tuple(_SPEC_TYPES)):
        return value
    if isinstance(value, str):
        kind, _, size = value.partition(":")
        fields: dict[str, Any] = {"type": kind.strip()}
        if size:
            fields["size"] = size
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise ConfigError(f"an attention spec is a dict with 'type' or a string such as 'neighborhood:7', "
                          f"got {value!r}")
    kind = fields.pop("type", None)
    if kind not in _ATTN_TYPES:
        raise ConfigError(f"attention type {kind!r} is not one of {', '.join(_ATTN_TYPES)}")
    cls, size_key = _ATTN_TYPES[kind]
    if "size" in fields:
        if size_key is None:
            raise ConfigError(f"attention type {kind!r} takes no size, got {value!r}")
        fields[size_key] = fields.pop("size")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"attention type {kind!r} has no field {', '.join(unknown)}; fields: {sorted(allowed)}")
    try:
        return cls(**{k: int(v) for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad attention spec {value!r}: {exc}") from None


def attention_to_dict(spec: AttentionSpec) -> dict[str, Any]:
    """k-diffusion's JSON form of an attention spec."""
    return {"type": _SPEC_TYPES[type(spec)], **dataclasses.asdict(spec)}


def attention_label(spec: AttentionSpec) -> str:
    """Short human form, e.g. ``neighborhood k7``, ``shifted-window w8``, ``global``, ``none``."""
    fields = attention_to_dict(spec)
    size = fields.get("kernel_size") or fields.get("window_size")
    return fields["type"] + (f" {'k' if 'kernel_size' in fields else 'w'}{size}" if size else "")


@dataclass(frozen=True)
class LevelSpec:
    """One resolution of the hourglass: ``depth`` layers (on each side, except the innermost level)."""

    depth: int
    width: int
    d_ff: int
    self_attn: AttentionSpec
    dropout: float = 0.0
    checkpointing: bool = False


@dataclass(frozen=True)
class MappingSpec:
    depth: int
    width: int
    d_ff: int
    dropout: float = 0.0


def _per_level(value: Any, n: int, key: str) -> list[Any]:
    """A scalar broadcast to every level, or a per-level list of length n."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        check(len(values) == n, key, f"has {len(values)} entries for {n} levels")
        return values
    return [value] * n


def _is_int_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclass
class HDiTConfig:
    """Architecture of one HDiT; the defaults are the paper's ImageNet-256 model (557M, patch 4, 256x256 RGB).

    Per-level lists: ``depths``, ``widths``, ``d_ffs`` (None: 3 x width), ``self_attns`` (None: k-diffusion's
    default, neighborhood attention with kernel 7 on every level but the last, global on the last), ``dropout``
    (one value or one per level), ``grad_checkpointing`` (one bool or one per level).
    """

    input_size: Any = 256  # image side, or [height, width]
    patch_size: Any = 4  # int or [ph, pw]
    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels
    depths: list[int] = field(default_factory=lambda: [2, 2, 16])
    widths: list[int] = field(default_factory=lambda: [384, 768, 1536])
    d_ffs: list[int] | None = None
    self_attns: list[Any] | None = None
    dropout: Any = 0.0
    mapping_width: int = 256
    mapping_depth: int = 2
    mapping_d_ff: int | None = None  # None: 3 x mapping_width
    mapping_dropout: float = 0.0
    mapping_cond_dim: int = 0
    num_classes: int = 1000  # real classes; the table has one more row, the null class (0: unconditional)
    grad_checkpointing: Any = False

    @property
    def input_hw(self) -> tuple[int, int]:
        return _pair(self.input_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def granularity(self) -> tuple[int, int]:
        """Input sides must be multiples of these: the patch times 2 per merge."""
        ph, pw = self.patch_hw
        f = 2 ** (len(self.depths) - 1)
        return ph * f, pw * f

    def levels(self) -> list[LevelSpec]:
        n = len(self.widths)
        d_ffs = list(self.d_ffs) if self.d_ffs is not None else [3 * w for w in self.widths]
        if self.self_attns is None:
            attns: list[AttentionSpec] = [NeighborhoodAttentionSpec() for _ in range(n - 1)] + [GlobalAttentionSpec()]
        else:
            attns = [parse_attention(a) for a in self.self_attns]
        dropouts = _per_level(self.dropout, n, "dropout")
        ckpt = _per_level(self.grad_checkpointing, n, "grad_checkpointing")
        return [LevelSpec(int(d), int(w), int(f), a, float(p), bool(c))
                for d, w, f, a, p, c in zip(self.depths, self.widths, d_ffs, attns, dropouts, ckpt)]

    def mapping(self) -> MappingSpec:
        d_ff = self.mapping_d_ff if self.mapping_d_ff is not None else 3 * self.mapping_width
        return MappingSpec(self.mapping_depth, self.mapping_width, d_ff, self.mapping_dropout)

    def validate(self) -> "HDiTConfig":
        size, patch = self.input_size, self.patch_size
        for key, value in (("input_size", size), ("patch_size", patch)):
            check(isinstance(value, int) or (_is_int_list(value) and len(value) == 2), key,
                  f"must be an int or [height, width], got {value!r}")
        for key in ("depths", "widths"):
            check(_is_int_list(getattr(self, key)) and len(getattr(self, key)) >= 1, key,
                  f"must be a non-empty list of ints, got {getattr(self, key)!r}")
        n = len(self.widths)
        check(len(self.depths) == n, "depths", f"has {len(self.depths)} entries for {n} widths")
        check(all(d >= 1 for d in self.depths), "depths", f"must all be >= 1, got {self.depths}")
        check(all(w >= 1 for w in self.widths), "widths", f"must all be >= 1, got {self.widths}")
        if self.d_ffs is not None:
            check(_is_int_list(self.d_ffs) and len(self.d_ffs) == n and all(f >= 1 for f in self.d_ffs), "d_ffs",
                  f"must be {n} positive ints (or null for 3 x width), got {self.d_ffs!r}")
        if self.self_attns is not None:
            check(isinstance(self.self_attns, Sequence) and not isinstance(self.self_attns, str)
                  and len(self.self_attns) == n, "self_attns",
                  f"must list {n} attention specs, got {self.self_attns!r}")
        h, w = self.input_hw
        ph, pw = self.patch_hw
        check(ph >= 1 and pw >= 1, "patch_size", f"must be >= 1, got {patch!r}")
        gh, gw = self.granularity
        check(h >= gh and w >= gw and h % gh == 0 and w % gw == 0, "input_size",
              f"{h}x{w} is not divisible by the patch {ph}x{pw} times 2^{n - 1} for the {n - 1} merges")
        check(self.in_channels >= 1, "in_channels", f"must be >= 1, got {self.in_channels}")
        check(self.out_channels is None or self.out_channels >= 1, "out_channels",
              f"must be >= 1, got {self.out_channels}")
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        check(self.mapping_cond_dim >= 0, "mapping_cond_dim", f"must be >= 0, got {self.mapping_cond_dim}")
        check(self.mapping_width >= 2 and self.mapping_width % 2 == 0, "mapping_width",
              f"must be even (Fourier features are cos and sin halves), got {self.mapping_width}")
        check(self.mapping_depth >= 0, "mapping_depth", f"must be >= 0, got {self.mapping_depth}")
        check(0.0 <= self.mapping_dropout < 1.0, "mapping_dropout", f"must be in [0, 1), got {self.mapping_dropout}")
        mapping = self.mapping()
        check(mapping.d_ff >= 1, "mapping_d_ff", f"must be >= 1, got {mapping.d_ff}")
        for i, level in enumerate(self.levels()):
            check(0.0 <= level.dropout < 1.0, "dropout", f"level {i}: must be in [0, 1), got {level.dropout}")
            spec = level.self_attn
            if isinstance(spec, NoAttentionSpec):
                continue
            check(spec.d_head >= 8 and spec.d_head % 8 == 0 and level.width % spec.d_head == 0, "self_attns",
                  f"level {i}: d_head {spec.d_head} must be a multiple of 8 (axial RoPE) dividing width {level.width}")
            if isinstance(spec, NeighborhoodAttentionSpec):
                check(spec.kernel_size >= 1, "self_attns", f"level {i}: kernel_size must be >= 1")
            if isinstance(spec, ShiftedWindowAttentionSpec):
                check(spec.window_size >= 1, "self_attns", f"level {i}: window_size must be >= 1")
        return self


# -- layers ------------------------------------------------------------------------------------------------------

class SelfAttentionBlock(nn.Module):
    """AdaRMSNorm -> qkv -> cosine-similarity attention (learned per-head scale, init 10) with axial RoPE on half
    of each head -> zero-initialised output projection, plus the residual. ``spec`` picks the kernel: global,
    neighborhood (border-clamped k x k windows) or shifted window (shift on odd layer indices)."""

    def __init__(self, d_model: int, spec: AttentionSpec, cond_features: int, dropout: float = 0.0,
                 window_shift: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.d_head = spec.d_head
        self.n_heads = d_model // spec.d_head
        self.window_shift = window_shift
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.qkv_proj = Linear(d_model, d_model * 3, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0))
        self.pos_emb = AxialRoPE(spec.d_head, self.n_heads)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = zero_init(Linear(d_model, d_model, bias=False))
        self._broadcast: Callable[..., torch.Tensor] | None = None

    def set_broadcast(self, broadcast: Callable[..., torch.Tensor] | None) -> None:
        """Let ``broadcast(compute, x)`` give the attention branch's output (computed, or reused from an earlier
        sampling step: the ``pab`` cache); None: always compute. The residual is added either way."""
        self._broadcast = broadcast

    def extra_repr(self) -> str:
        return f"{attention_to_dict(self.spec)}, window_shift={self.window_shift}"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention with scale 1 (q, k are already cosine-scaled) on heads-last [B, H, W, heads, D]."""
        spec = self.spec
        b, h, w, nh, _ = q.shape
        if isinstance(spec, NeighborhoodAttentionSpec):
            backend = "torch" if q.device.type == "meta" else None  # NATTEN has no meta kernels (FLOP counting)
            return neighborhood_attention(q, k, v, spec.kernel_size, scale=1.0, backend=backend)
        if isinstance(spec, ShiftedWindowAttentionSpec):
            window = min(spec.window_size, h, w)
            if h % window or w % window:
                raise ShapeError(f"shifted-window attention: window {window} does not divide the {h}x{w} token map")
            shift = window // 2 if self.window_shift else 0
            return shifted_window_attention(q, k, v, window, shift, scale=1.0)
        q, k, v = (t.reshape(b, h * w, nh, -1).transpose(1, 2) for t in (q, k, v))
        return attention(q, k, v, scale=1.0).transpose(1, 2).reshape(b, h, w, nh, -1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self._broadcast is not None:
            return self._broadcast(lambda: self._branch(x, pos, cond), x) + x
        return self._branch(x, pos, cond) + x

    def _branch(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, cond)
        b, h, w, _ = x.shape
        q, k, v = self.qkv_proj(x).reshape(b, h, w, 3, self.n_heads, self.d_head).unbind(3)  # rows [q; k; v]
        q, k = scale_for_cosine_sim(q, k, self.scale[:, None])
        theta = self.pos_emb.theta(pos.float())  # [h, w, heads, d_head/4], fp32 whatever the model dtype
        q, k = apply_rotary(q, theta), apply_rotary(k, theta)
        x = self.attend(q, k, v).reshape(b, h, w, -1)
        return self.out_proj(self.dropout(x))


class FeedForwardBlock(nn.Module):
    """AdaRMSNorm -> GEGLU up-projection -> dropout -> zero-initialised down-projection, plus the residual."""

    def __init__(self, d_model: int, d_ff: int, cond_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(Linear(d_ff, d_model, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.up_proj(self.norm(x, cond)))) + x


class TransformerLayer(nn.Module):
    """``self_attn`` (absent for attention type "none") then ``ff``; each block checkpointed when enabled."""

    def __init__(self, self_attn: SelfAttentionBlock | None, ff: FeedForwardBlock) -> None:
        super().__init__()
        self.self_attn = self_attn  # None: a plain attribute, no state-dict keys
        self.ff = ff
        self.checkpointing = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            x = recomputed(self.self_attn, x, pos, cond, enabled=self.checkpointing)
        return recomputed(self.ff, x, cond, enabled=self.checkpointing)


class Level(nn.ModuleList):
    """The layers of one side of one resolution, run in sequence."""

    def __init__(self, layers: Sequence[TransformerLayer], spec: LevelSpec) -> None:
        super().__init__(layers)
        self.spec = spec
        self.set_checkpointing(spec.checkpointing)

    def set_checkpointing(self, enabled: bool) -> None:
        for layer in self:
            layer.checkpointing = bool(enabled)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, pos, cond)
        return x


def build_level(spec: LevelSpec, cond_features: int, first_index: int = 0) -> Level:
    """The layers of a level spec. ``first_index`` numbers the layers for the shifted-window alternation: a down
    level counts from 0, its up level from ``depth`` (k-diffusion's convention)."""
    layers = []
    for index in range(first_index, first_index + spec.depth):
        attn = spec.self_attn
        if isinstance(attn, NoAttentionSpec):
            self_attn = None
        else:
            shift = attn.window_size // 2 if isinstance(attn, ShiftedWindowAttentionSpec) and index % 2 else 0
            self_attn = SelfAttentionBlock(spec.width, attn, cond_features, spec.dropout, window_shift=shift)
        layers.append(TransformerLayer(self_attn, FeedForwardBlock(spec.width, spec.d_ff, cond_features, spec.dropout)))
    return Level(layers, spec)


class MappingFeedForwardBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(Linear(d_ff, d_model, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.up_proj(self.norm(x)))) + x


class MappingNetwork(nn.Module):
    """RMSNorm -> ``depth`` residual GEGLU blocks -> RMSNorm, on the summed conditioning embeddings."""

    def __init__(self, spec: MappingSpec) -> None:
        super().__init__()
        self.in_norm = RMSNorm(spec.width)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(spec.width, spec.d_ff, spec.dropout)
                                     for _ in range(spec.depth)])
        self.out_norm = RMSNorm(spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class TokenMerge(nn.Module):
    """Pixel-unshuffle by ``patch_size`` then a bias-free Linear (features ordered p_row, p_col, channel)."""

    def __init__(self, in_features: int, out_features: int, patch_size: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.h, self.w = patch_size
        self.proj = Linear(in_features * self.h * self.w, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(merge_tokens(x, self.h, self.w))


class TokenSplitWithoutSkip(nn.Module):
    """A bias-free Linear then pixel-shuffle by ``patch_size``."""

    def __init__(self, in_features: int, out_features: int, patch_size: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.h, self.w = patch_size
        self.proj = Linear(in_features, out_features * self.h * self.w, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_tokens(self.proj(x), self.h, self.w)


class TokenSplit(TokenSplitWithoutSkip):
    """Upsample, then ``lerp(skip, up, fac)``: the learnable ``fac`` (init 0.5) weights the upsampled branch."""

    def __init__(self, in_features: int, out_features: int, patch_size: tuple[int, int] = (2, 2)) -> None:
        super().__init__(in_features, out_features, patch_size)
        self.fac = nn.Parameter(torch.ones(1) * 0.5)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = super().forward(x)
        return torch.lerp(skip, x, self.fac.to(x.dtype))


# -- model -------------------------------------------------------------------------------------------------------

#: the leaf modules whose weights take weight decay (k-diffusion's ``apply_wd``); everything else does not
_DECAY_MODULES = ("qkv_proj", "out_proj", "up_proj", "down_proj", "proj", "linear")


def _sigma_vector(sigma: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, n)):
        raise ShapeError(f"HDiT expects sigma as a scalar or of shape [{n}], got {list(sigma.shape)}")
    return sigma.expand(n)


class HDiT(nn.Module):
    """Hourglass diffusion transformer on pixels: ``forward(x, sigma, y=None, aug_cond=None, mapping_cond=None)``
    -> [B, out_channels, H, W], the network F of EDM preconditioning (``dtx.diffusion.karras.Denoiser``).

    ``sigma`` is the raw noise level (c_noise = ln(sigma)/4 is applied inside, as in k-diffusion); ``y`` class labels
    in [0, num_classes], ``num_classes`` being the null class; ``aug_cond`` [B, 9] augmentation conditioning (zeros
    when None); ``mapping_cond`` [B, mapping_cond_dim]. Any input whose sides are multiples of the patch times
    2^merges runs: positions are recomputed per call.
    """

    channel_dim = 1  # [B, C, H, W]
    noise_input = "sigma"
    learn_sigma = False
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``)
    lora_groups = {
        "attention": [r"(down_levels\.\d+|mid_level|up_levels\.\d+)(\.\d+)?\.self_attn\.(qkv_proj|out_proj)"],
        "mlp": [r"(down_levels\.\d+|mid_level|up_levels\.\d+)(\.\d+)?\.ff\.(up_proj|down_proj)"],
        "adaln": [r"(down_levels\.\d+|mid_level|up_levels\.\d+)(\.\d+)?\.(self_attn|ff)\.norm\.linear"],
        "mapping": [r"mapping\.blocks\.\d+\.(up_proj|down_proj)"],
    }

    def __init__(self, config: HDiTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else HDiTConfig(**overrides)
        self.config = cfg.validate()
        levels, mapping = cfg.levels(), cfg.mapping()
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.num_classes = cfg.num_classes
        self.mapping_cond_dim = cfg.mapping_cond_dim
        self.level_specs = levels
        width = mapping.width
        self._warned: set[int] = set()

        self.patch_in = TokenMerge(cfg.in_channels, levels[0].width, cfg.patch_hw)
        self.time_emb = FourierFeatures(1, width)
        self.time_in_proj = Linear(width, width, bias=False)
        self.aug_emb = FourierFeatures(9, width)
        self.aug_in_proj = Linear(width, width, bias=False)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        self.mapping_cond_in_proj = (Linear(cfg.mapping_cond_dim, width, bias=False) if cfg.mapping_cond_dim
                                     else None)
        self.mapping = MappingNetwork(mapping)

        self.down_levels, self.up_levels = nn.ModuleList(), nn.ModuleList()
        for spec in levels[:-1]:
            self.down_levels.append(build_level(spec, width))
            self.up_levels.append(build_level(spec, width, first_index=spec.depth))
        self.mid_level = build_level(levels[-1], width)
        self.merges = nn.ModuleList([TokenMerge(a.width, b.width) for a, b in zip(levels[:-1], levels[1:])])
        self.splits = nn.ModuleList([TokenSplit(b.width, a.width) for a, b in zip(levels[:-1], levels[1:])])

        self.out_norm = RMSNorm(levels[0].width)
        self.patch_out = TokenSplitWithoutSkip(levels[0].width, self.out_channels, cfg.patch_hw)
        zero_init(self.patch_out.proj)

    # -- what the core reads -------------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample input shape the model was built for: (in_channels, H, W)."""
        return (self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        """Row of the class table that means "no class" (classifier-free guidance), or None if unconditional."""
        return self.num_classes if self.num_classes else None

    def example_conditions(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Conditions for one example forward pass (FLOP counting): labels and the mapping vector if used."""
        out: dict[str, torch.Tensor] = {}
        if self.num_classes:
            out["y"] = torch.zeros(batch, dtype=torch.long, device=device)
        if self.mapping_cond_dim:
            out["mapping_cond"] = torch.zeros(batch, self.mapping_cond_dim, device=device)
        return out

    def param_group_fn(self, name: str, param: nn.Parameter) -> dict[str, Any]:
        """k-diffusion's optimizer groups: weight decay only on the projection weights (qkv, out, up, down, merge,
        split, patch and AdaRMSNorm linears) -- not on norm scales, attention scales, lerp factors, the class table,
        ``time_in_proj``, ``aug_in_proj`` or ``mapping_cond_in_proj``; the mapping network and every AdaRMSNorm
        linear train at lr / 3."""
        parts = name.split(".")
        decays = parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in _DECAY_MODULES
        mapping = parts[0] == "mapping" or name.endswith(".norm.linear.weight")
        return {"weight_decay": decays, "lr_scale": 1 / 3 if mapping else 1.0}

    def set_grad_checkpointing(self, enable: bool = True, levels: Sequence[int] | None = None) -> None:
        """Recompute the attention and feed-forward blocks of the given levels (default: all) in the backward."""
        chosen = set(range(len(self.level_specs))) if levels is None else {int(i) for i in levels}
        for i, level in enumerate([*self.down_levels, self.mid_level]):
            if i in chosen:
                level.set_checkpointing(enable)
        for i, level in enumerate(self.up_levels):
            if i in chosen:
                level.set_checkpointing(enable)

    def set_recompute(self, every: int) -> None:
        """The core's recomputation switch: every ``every``-th layer in forward order (down levels, middle, up levels)
        recomputes its attention and feed-forward blocks in the backward (0: none, 1: all)."""
        if every < 0:
            raise ConfigError(f"recompute every {every} layers: must be >= 0 (0 none, 1 every layer)")
        layers = [layer for level in [*self.down_levels, self.mid_level, *self.up_levels] for layer in level]
        for i, layer in enumerate(layers):
            layer.checkpointing = every > 0 and i % every == 0

    # -- forward -------------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"HDiT expects [B, {self.in_channels}, H, W], got {list(x.shape)}")
        gh, gw = self.config.granularity
        if x.shape[2] % gh or x.shape[3] % gw:
            raise ShapeError(f"input size {x.shape[2]}x{x.shape[3]} is not a multiple of {gh}x{gw} (patch "
                             f"{self.config.patch_hw} times 2 per merge over {len(self.level_specs) - 1} merges)")

    def _check_level(self, i: int, h: int, w: int) -> None:
        """Warn once per level when its attention window is larger than its token map (then clamped to it)."""
        spec = self.level_specs[i].self_attn
        size = getattr(spec, "kernel_size", None) or getattr(spec, "window_size", None)
        if size is None or (size <= h and size <= w) or i in self._warned:
            return
        self._warned.add(i)
        kind = "neighborhood kernel" if isinstance(spec, NeighborhoodAttentionSpec) else "window"
        warnings.warn(f"HDiT level {i} ({h}x{w} tokens): {kind} {size} is larger than the token map, clamped to "
                      f"{min(size, h)}x{min(size, w)}", UserWarning, stacklevel=3)

    def mapping_embedding(self, sigma: torch.Tensor | float, n: int, device: torch.device,
                          y: torch.Tensor | None = None, aug_cond: torch.Tensor | None = None,
                          mapping_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector [B, mapping_width] fed to every AdaRMSNorm."""
        dtype = self.time_in_proj.weight.dtype
        c_noise = torch.log(_sigma_vector(sigma, n, device)) / 4
        emb = self.time_in_proj(self.time_emb(c_noise[:, None].to(dtype)))
        if aug_cond is None:
            aug_cond = torch.zeros(n, 9, device=device, dtype=dtype)
        elif aug_cond.shape != (n, 9):
            raise ShapeError(f"aug_cond must have shape [{n}, 9], got {list(aug_cond.shape)}")
        emb = emb + self.aug_in_proj(self.aug_emb(aug_cond.to(dtype)))  # a constant even without augmentation
        if self.class_emb is not None:
            if y is None:
                raise ShapeError(f"this HDiT has {self.num_classes} classes and needs labels y "
                                 f"(y={self.null_class} for unconditional outputs)")
            if y.shape != (n,) or y.dtype.is_floating_point:
                raise ShapeError(f"HDiT expects integer class labels y of shape [{n}], got {y.dtype} {list(y.shape)}")
            check_label_range(y, self.num_classes + 1, f" ({self.num_classes} = null)")
            emb = emb + self.class_emb(y)
        if self.mapping_cond_in_proj is not None:
            if mapping_cond is None or mapping_cond.shape != (n, self.mapping_cond_dim):
                got = None if mapping_cond is None else list(mapping_cond.shape)
                raise ShapeError(f"this HDiT needs mapping_cond of shape [{n}, {self.mapping_cond_dim}], got {got}")
            emb = emb + self.mapping_cond_in_proj(mapping_cond.to(dtype))
        elif mapping_cond is not None:
            raise ShapeError("this HDiT has no mapping condition (mapping_cond_dim=0) but mapping_cond was given")
        return self.mapping(emb)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor | None = None,
                aug_cond: torch.Tensor | None = None, mapping_cond: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        cond = self.mapping_embedding(sigma, x.shape[0], x.device, y, aug_cond, mapping_cond)
        x = self.patch_in(x.movedim(1, -1))
        pos = make_axial_pos(x.shape[1], x.shape[2], device=x.device)

        skips, poses = [], []
        for i, (level, merge) in enumerate(zip(self.down_levels, self.merges)):
            self._check_level(i, x.shape[1], x.shape[2])
            x = level(x, pos, cond)
            skips.append(x)
            poses.append(pos)
            x = merge(x)
            pos = downscale_pos(pos)
        self._check_level(len(self.level_specs) - 1, x.shape[1], x.shape[2])
        x = self.mid_level(x, pos, cond)
        for level, split, skip, pos in reversed(list(zip(self.up_levels, self.splits, skips, poses))):
            x = level(split(x, skip), pos, cond)

        x = self.patch_out(self.out_norm(x))
        return x.movedim(-1, 1)


# -- presets -----------------------------------------------------------------------------------------------------

_NA, _GLOBAL = "neighborhood:7", "global"

#: The paper's models (Table 7; patch 4, d_head 64, NA kernel 7) and k-diffusion's oxford-flowers config, each at
#: its own resolution. Mapping width 256 / depth 2 (k-diffusion's default) reproduces the published parameter
#: counts; ablation E (ImageNet-128) used width 768 and depth 1.
HDIT_PRESETS: dict[str, dict[str, Any]] = {
    "HDiT-ImageNet128": {"input_size": 128, "patch_size": 4, "depths": [2, 11], "widths": [384, 768],
                         "self_attns": [_NA, _GLOBAL], "mapping_width": 768, "mapping_depth": 1,
                         "num_classes": 1000},
    "HDiT-FFHQ1024": {"input_size": 1024, "patch_size": 4, "depths": [2, 2, 2, 2, 2],
                      "widths": [128, 256, 384, 768, 1024], "self_attns": [_NA, _NA, _NA, _GLOBAL, _GLOBAL],
                      "dropout": [0.0, 0.0, 0.0, 0.0, 0.1], "num_classes": 0},
    "HDiT-ImageNet256": {"input_size": 256, "patch_size": 4, "depths": [2, 2, 16], "widths": [384, 768, 1536],
                         "self_attns": [_NA, _NA, _GLOBAL], "num_classes": 1000},
    "HDiT-Flowers256": {"input_size": 256, "patch_size": 4, "depths": [2, 2, 4], "widths": [128, 256, 512],
                        "self_attns": [_NA, _NA, _GLOBAL], "dropout": 0.1, "num_classes": 0},
}
