"""The conditioning stage: raw batch fields (class labels, captions, flags) become model keyword arguments.

A batch is ``x`` plus condition fields. Each field is read by exactly one *conditioner* (or listed in
``conditioning.ignore``), so nothing a dataset yields is silently dropped. Conditioners come from the ``conditioner``
registry and own three things: encoding raw fields to model keywords (reserved names ``y`` [B] class labels,
``context`` [B, L, D], ``context_mask`` [B, L] bool with True = attend, ``pooled`` [B, D]), their *null* condition
(used both for condition dropout in training and for the unconditional terms of guidance), and reading a
``SampleRequest`` (``--classes``, ``--prompt``, flags) at sampling time.

Conditioners with weights (text encoders) are frozen: they run under ``no_grad``, live outside the model, and so are
never in the optimizer, the EMA or the training checkpoint; the run's config records their registered names and
options, from which ``dtx sample`` rebuilds them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from . import plugins
from .data.info import DataInfo
from .errors import ConfigError, ShapeError
from .options import check_options

RESERVED = ("y", "context", "context_mask", "pooled")
#: most samples one request may ask for (subjects x samples per subject): ``--n-per-class 100000000000`` is refused
#: before any label or noise tensor is allocated
MAX_SAMPLES = 1 << 20
Fields = dict[str, Any]
#: what each part of a ``SampleRequest`` asks for, in words (``flags.NAME``: "the flag 'NAME'")
REQUEST_NOUNS = {"classes": "class labels", "prompts": "text prompts", "negative_prompt": "a negative prompt"}


# -- configuration --------------------------------------------------------------------------------------------------

@dataclass
class ConditionerConfig:
    """One conditioner of a recipe: a registered ``name``, its ``options`` and its training ``dropout`` probability
    (None: the conditioner's default, e.g. 10% for class labels of a model with a null class)."""

    name: str = "class-label"
    options: dict[str, Any] = field(default_factory=dict)
    dropout: Optional[float] = None


@dataclass
class GuidanceStep:
    """One term of nested classifier-free guidance: the conditioners it switches on and its scale."""

    keys: list[str] = field(default_factory=list)
    scale: float = 1.0


@dataclass
class ConditioningConfig:
    """``conditioners`` by key (empty: the registered default conditioner of each field the data yields) and the
    data fields deliberately left unused."""

    conditioners: dict[str, ConditionerConfig] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)


@dataclass
class SampleRequest:
    """What a user asks ``dtx sample`` (or a periodic grid) for; each conditioner reads the part it understands."""

    classes: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: Optional[str] = None
    flags: dict[str, bool] = field(default_factory=dict)


# -- the conditioner contract ---------------------------------------------------------------------------------------

class Conditioner(nn.Module, abc.ABC):
    """Base class: subclasses set ``fields`` and implement ``encode``, ``null_fields`` and ``subjects``.

    ``encode`` maps raw fields of n samples to model keywords; ``null_fields(n)`` gives the raw fields that mean
    "no condition"; ``subjects(request)`` lists the raw fields of each distinct thing a user asked for (a class, a
    prompt), or None when the request does not concern this conditioner.
    """

    fields: tuple[str, ...] = ()

    def bind(self, model: nn.Module, info: DataInfo) -> None:
        """Learn what the model and data need (e.g. the model's null class); called once before use."""

    @property
    def default_dropout(self) -> float:
        return 0.0

    @property
    def has_null(self) -> bool:
        return True

    @abc.abstractmethod
    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Model keywords of the raw fields of n samples."""

    @abc.abstractmethod
    def null_fields(self, n: int) -> Fields:
        """Raw fields of n samples that mean "no condition"."""

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        return None

    def request_parts(self) -> tuple[str, ...] | None:
        """The parts of a ``SampleRequest`` this conditioner reads (``classes``, ``prompts``, ``negative_prompt``,
        ``flags.NAME``), so that a part no conditioner reads is refused instead of ignored; None: not declared (a
        subclass overriding ``subjects`` or ``guidance_null`` may read any part), which leaves requests unchecked."""
        cls = type(self)
        reads = cls.subjects is not Conditioner.subjects or cls.guidance_null is not Conditioner.guidance_null
        return None if reads else ()

    def default_fields(self, n: int) -> Fields:
        """Raw fields when a request names nothing for this conditioner (default: the null condition)."""
        return self.null_fields(n)

    def guidance_null(self, request: SampleRequest, n: int) -> Fields:
        """The raw fields of the unconditional guidance term (a negative prompt, for text)."""
        return self.null_fields(n)


class ClassLabelConditioner(Conditioner):
    """Integer class labels ``y`` [B] -> keyword ``y``; the null condition is the model's ``null_class``."""

    fields = ("y",)

    def __init__(self) -> None:
        super().__init__()
        self.null_class: int | None = None
        self.num_classes = 0

    def bind(self, model: nn.Module, info: DataInfo) -> None:
        null = getattr(model, "null_class", None)
        self.null_class = None if null is None else int(null)
        self.num_classes = int(getattr(model, "num_classes", 0) or info.num_classes)

    @property
    def default_dropout(self) -> float:
        return 0.1 if self.null_class is not None else 0.0  # DiT's 10% label dropout

    @property
    def has_null(self) -> bool:
        return self.null_class is not None

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        y = torch.as_tensor(raw["y"])
        if y.ndim != 1 or y.is_floating_point():
            raise ShapeError(f"class labels must be integers of shape [B], got {y.dtype} {list(y.shape)}")
        return {"y": y.to(device=device, dtype=torch.long)}

    def null_fields(self, n: int) -> Fields:
        if self.null_class is None:
            raise ConfigError("this model has no null class (train it with class dropout), so labels cannot be "
                              "dropped or guided; use --cfg 1 / conditioning dropout 0")
        return {"y": torch.full((n,), self.null_class, dtype=torch.long)}

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        if not self.num_classes:
            return None
        chosen = list(request.classes) or list(range(min(self.num_classes, 10)))
        bad = [c for c in chosen if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ConfigError(f"class {bad[0]} is out of range: this model has {self.num_classes} classes "
                              f"(0..{self.num_classes - 1})")
        return [{"y": torch.tensor([int(c)])} for c in chosen]

    def request_parts(self) -> tuple[str, ...]:
        return ("classes",) if self.num_classes else ()


class FlagConditioner(Conditioner):
    """A per-sample boolean ``field`` passed to the model under the same name; the null value is ``null``.

    ``dtx sample --flag NAME`` sets it for every sample (e.g. GenTron's motion-free mask).
    """

    def __init__(self, field: str = "flag", null: bool = True, default: bool = False) -> None:
        super().__init__()
        self.fields = (field,)
        self.null, self.default = bool(null), bool(default)

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        name = self.fields[0]
        return {name: torch.as_tensor(raw[name]).to(device=device, dtype=torch.bool).reshape(-1)}

    def null_fields(self, n: int) -> Fields:
        return {self.fields[0]: torch.full((n,), self.null)}

    def default_fields(self, n: int) -> Fields:
        return {self.fields[0]: torch.full((n,), self.default)}

    def subjects(self, request: SampleRequest) -> list[Fields] | None:
        name = self.fields[0]
        return [{name: torch.tensor([bool(request.flags[name])])}] if name in request.flags else None

    def request_parts(self) -> tuple[str, ...]:
        return (f"flags.{self.fields[0]}",)


# -- raw-field helpers ----------------------------------------------------------------------------------------------

def batch_size_of(raw: Mapping[str, Any]) -> int:
    sizes = {len(v) for v in raw.values()}
    if len(sizes) != 1:
        raise ShapeError(f"condition fields differ in batch size: { {k: len(v) for k, v in raw.items()} }")
    return sizes.pop()


def where_fields(mask: torch.Tensor, null: Fields, raw: Mapping[str, Any]) -> Fields:
    """Per sample: ``null`` where ``mask`` is True, else ``raw`` (tensors and lists alike)."""
    out: Fields = {}
    for key, value in raw.items():
        alt = null[key]
        if isinstance(value, torch.Tensor):
            m = mask.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(m, torch.as_tensor(alt, dtype=value.dtype, device=value.device), value)
        else:
            out[key] = [a if bool(d) else v for v, a, d in zip(value, alt, mask)]
    return out


def concat_fields(parts: Sequence[Fields]) -> Fields:
    out: Fields = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for p in values for v in p]
    return out


def repeat_fields(raw: Fields, k: int) -> Fields:
    """Each sample repeated ``k`` times in place (a, a, b, b ...)."""
    out: Fields = {}
    for key, value in raw.items():
        out[key] = value.repeat_interleave(k, dim=0) if isinstance(value, torch.Tensor) else \
            [v for v in value for _ in range(k)]
    return out


def _request_noun(part: str) -> str:
    return REQUEST_NOUNS.get(part) or f"the flag {part.partition('.')[2]!r}"


def _request_label(part: str, names: Mapping[str, str]) -> str:
    """The option that sets a request part: ``names[part]``, or for one flag ``names["flags"] NAME``."""
    kind, _, name = part.partition(".")
    return names[part] if part in names else f"{names.get(kind, kind)} {name}"


# -- the stage -------------------------------------------------------------------------------------------------------

@dataclass
class Member:
    """One configured conditioner of the stage."""

    key: str
    name: str
    conditioner: Conditioner
    dropout: float
    options: dict[str, Any]


def build_conditioner(name: str, options: Mapping[str, Any]) -> tuple[str, Conditioner]:
    """A registered conditioner by name, built with ``options`` (unknown options named in one error)."""
    entry = plugins.get("conditioner", name)
    check_options(f"conditioner {entry.name!r}", entry.obj, options)
    conditioner = entry.obj(**options)
    if not isinstance(conditioner, Conditioner):
        raise ConfigError(f"conditioner {entry.name!r} of plugin {entry.plugin!r} did not build a "
                          f"dtx.conditioning.Conditioner (got {type(conditioner).__name__})")
    return entry.name, conditioner


def default_conditioner(field_name: str) -> str | None:
    """The registered conditioner that declares itself the default for a data field."""
    for name, entry in sorted(plugins.host().table("conditioner").items()):
        if field_name in tuple(entry.meta.get("default_for", ())):
            return name
    return None


class ConditioningStage:
    """The configured conditioners of a run: training keywords with dropout, and guidance condition sets."""

    def __init__(self, members: Sequence[Member], ignore: Sequence[str] = ()) -> None:
        self.members = list(members)
        self.ignore = tuple(ignore)
        for m in self.members:
            m.conditioner.requires_grad_(False).eval()

    @classmethod
    def build(cls, cfg: ConditioningConfig, model: nn.Module, info: DataInfo) -> "ConditioningStage":
        """Conditioners for the fields ``info`` says the data yields; every field must be used or ignored."""
        specs = dict(cfg.conditioners)
        if not specs:
            for f in info.fields:
                if f in cfg.ignore:
                    continue
                name = default_conditioner(f)
                if name is None:
                    raise ConfigError(f"the data yields condition field {f!r} but no installed conditioner is its "
                                      f"default; name one under conditioning.conditioners or list it in "
                                      f"conditioning.ignore")
                specs[f] = ConditionerConfig(name=name)
        members = []
        for key, spec in specs.items():
            name, conditioner = build_conditioner(spec.name, spec.options)
            conditioner.bind(model, info)
            dropout = conditioner.default_dropout if spec.dropout is None else float(spec.dropout)
            if not 0.0 <= dropout < 1.0:
                raise ConfigError(f"conditioning.conditioners.{key}.dropout must be in [0, 1), got {dropout}")
            if dropout > 0 and not conditioner.has_null:
                raise ConfigError(f"conditioning.conditioners.{key}.dropout={dropout} needs a null condition, "
                                  f"which {name!r} does not have for this model")
            members.append(Member(key, name, conditioner, dropout, dict(spec.options)))
        stage = cls(members, cfg.ignore)
        stage._check_fields(info)
        return stage

    def _check_fields(self, info: DataInfo) -> None:
        read: dict[str, str] = {}
        for m in self.members:
            for f in m.conditioner.fields:
                if f in read:
                    raise ConfigError(f"data field {f!r} is read by two conditioners: {read[f]!r} and {m.key!r}")
                read[f] = m.key
        if info.fields:
            missing = sorted(set(read) - set(info.fields))
            if missing:
                raise ConfigError(f"conditioner {read[missing[0]]!r} reads field {missing[0]!r}, but the data "
                                  f"yields only: {', '.join(info.fields) or 'no condition fields'}")
        unused = [f for f in info.fields if f not in read and f not in self.ignore]
        if unused:
            raise ConfigError(f"the data yields condition field {unused[0]!r} that no conditioner reads; add a "
                              f"conditioner for it or list it in conditioning.ignore")

    # -- describe ------------------------------------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        return [m.key for m in self.members]

    def describe(self) -> list[dict[str, Any]]:
        """What a checkpoint records: each conditioner's key, registered name, plugin, options and dropout."""
        return [{"key": m.key, "name": m.name, "plugin": plugins.get("conditioner", m.name).plugin,
                 "options": m.options, "dropout": m.dropout} for m in self.members]

    def to(self, device: torch.device | str) -> "ConditioningStage":
        for m in self.members:
            m.conditioner.to(device)
        return self

    def member(self, key: str) -> Member:
        for m in self.members:
            if m.key == key:
                return m
        raise ConfigError(f"no conditioner {key!r} in this run; its conditioners: {', '.join(self.keys) or 'none'}")

    # -- training --------------------------------------------------------------------------------------------------

    def fields_of(self, batch: Mapping[str, Any]) -> Fields:
        """The condition fields of a batch that the stage reads (``x`` and ignored fields left out)."""
        wanted = [f for m in self.members for f in m.conditioner.fields]
        missing = [f for f in wanted if f not in batch]
        if missing:
            raise ConfigError(f"the batch has no field {missing[0]!r} (fields: {', '.join(sorted(batch))})")
        return {f: batch[f] for f in wanted}

    @torch.no_grad()
    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Model keywords of raw fields, every conditioner frozen; two conditioners may not write one keyword."""
        kwargs: dict[str, torch.Tensor] = {}
        for m in self.members:
            out = m.conditioner.encode({f: raw[f] for f in m.conditioner.fields}, device)
            clash = set(out) & set(kwargs)
            if clash:
                raise ConfigError(f"conditioner {m.key!r} writes model keyword(s) {sorted(clash)} already written")
            kwargs.update(out)
        return kwargs

    def drop(self, raw: Mapping[str, Any], generator: torch.Generator | None) -> Fields:
        """Condition dropout for classifier-free guidance: each conditioner's fields are replaced by its null
        condition for a random ``dropout`` fraction of the samples (independently per conditioner)."""
        out = dict(raw)
        if not self.members:
            return out
        n = batch_size_of(raw)
        for m in self.members:
            u = torch.rand(n, generator=generator)  # drawn for every member, so adding dropout changes no other draw
            if m.dropout > 0:
                own = {f: out[f] for f in m.conditioner.fields}
                out.update(where_fields(u < m.dropout, m.conditioner.null_fields(n), own))
        return out

    def training_kwargs(self, batch: Mapping[str, Any], device: torch.device,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return self.encode(self.drop(self.fields_of(batch), generator), device)

    # -- sampling --------------------------------------------------------------------------------------------------

    def request_fields(self, request: SampleRequest, per_subject: int) -> tuple[Fields, int]:
        """Raw fields for ``per_subject`` samples of each requested subject, and the total count.

        Conditioners listing subjects (classes, prompts) must agree on their number; the others get their defaults.
        """
        listed = {m.key: m.conditioner.subjects(request) for m in self.members}
        counts = {k: len(v) for k, v in listed.items() if v is not None}
        if len(set(counts.values())) > 1:
            raise ConfigError(f"the request names different numbers of subjects per conditioner: {counts}")
        k = next(iter(counts.values()), 1)
        n = k * per_subject
        if n > MAX_SAMPLES:
            raise ConfigError(f"{per_subject} samples for each of {k} subject(s) is {n} samples, over the "
                              f"{MAX_SAMPLES} one request may ask for")
        parts: list[Fields] = []
        for m in self.members:
            subjects = listed[m.key]
            parts.append(repeat_fields(concat_fields(subjects), per_subject) if subjects is not None
                         else m.conditioner.default_fields(n))
        raw: Fields = {}
        for p in parts:
            raw.update(p)
        return raw, n

    def request_reads(self, part: str) -> bool:
        """Whether some conditioner of this model reads ``part`` of a request (``classes``, ``prompts``, ...)."""
        return any(part in (m.conditioner.request_parts() or ()) for m in self.members)

    def request_problem(self, request: SampleRequest, names: Mapping[str, str]) -> tuple[str, str] | None:
        """(option, what is wrong) for the first part of ``request`` that no conditioner of this model reads
        (``--prompt`` for a class model, ``--classes`` for a text model, a flag it has no field for), saying what
        the model takes; None when every part is read. ``names`` maps a part (``classes``, ``prompts``,
        ``negative_prompt``, ``flags``, or ``flags.NAME`` for one flag) to the option or config key that sets it."""
        parts = [m.conditioner.request_parts() for m in self.members]
        if any(p is None for p in parts):
            return None
        read = list(dict.fromkeys(part for p in parts for part in p or ()))
        asked = [part for part, value in (("classes", request.classes), ("prompts", request.prompts),
                                          ("negative_prompt", request.negative_prompt is not None)) if value]
        asked += [f"flags.{name}" for name in request.flags]
        for part in asked:
            if part not in read:
                takes = ", ".join(f"{_request_noun(p)} ({_request_label(p, names)})" for p in read)
                noun = _request_noun(part)
                return _request_label(part, names), (f"this model takes {takes}, not {noun}" if takes else
                                                     f"this model is unconditional: it takes no {noun}")
        return None

    def guidance_steps(self, cfg_scale: float, steps: Sequence[GuidanceStep] = (),
                       scales: Mapping[str, float] | None = None) -> list[GuidanceStep]:
        """Explicit ``steps``; else one term per entry of ``scales`` (registered conditioner name -> scale, e.g.
        GenTron's ``motion``: 1.2) followed by a classic-CFG term at ``cfg_scale`` switching on every other
        conditioner that has a null condition (none at ``cfg_scale`` 1)."""
        if steps:
            known = set(self.keys)
            for s in steps:
                bad = [k for k in s.keys if k not in known]
                if bad:
                    raise ConfigError(f"guidance names conditioner {bad[0]!r}; this run has: {', '.join(self.keys)}")
            return list(steps)
        first = []
        for name, scale in (scales or {}).items():
            keys = [m.key for m in self.members if m.name == name]
            if not keys:
                raise ConfigError(f"a guidance scale is set for conditioner {name!r}, which this run does not use "
                                  f"(it has: {', '.join(m.name for m in self.members) or 'none'})")
            first.append(GuidanceStep(keys=keys, scale=float(scale)))
        if cfg_scale == 1.0:
            return first
        taken = {k for s in first for k in s.keys}
        keys = [m.key for m in self.members if m.conditioner.has_null and m.key not in taken]
        if not keys:
            raise ConfigError("classifier-free guidance needs a conditioner with a null condition (a model trained "
                              "with condition dropout); use --cfg 1")
        return first + [GuidanceStep(keys=keys, scale=float(cfg_scale))]

    def condition_sets(self, request: SampleRequest, raw: Fields, steps: Sequence[GuidanceStep],
                       device: torch.device, start: int = 0,
                       stop: int | None = None) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
        """Nested guidance condition sets for samples ``start:stop``: set 0 has every guided conditioner null, set i
        switches on the conditioners of steps 1..i; the scales are the steps' scales."""
        sub = {k: v[start:stop] for k, v in raw.items()}
        n = batch_size_of(sub) if sub else (stop or 0) - start
        guided = [k for s in steps for k in s.keys]
        sets = []
        for i in range(len(steps) + 1):
            on = {k for s in steps[:i] for k in s.keys}
            fields = dict(sub)
            for m in self.members:
                if m.key in guided and m.key not in on:
                    fields.update(m.conditioner.guidance_null(request, n))
            sets.append(self.encode(fields, device))
        return sets, [float(s.scale) for s in steps]
