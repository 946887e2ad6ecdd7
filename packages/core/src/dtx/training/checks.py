"""Rules between the config, the data and the model, checked when the run is built and before anything is written:
labels against ``num_classes`` and the null class, and every sampling setting of the periodic and final grids
(classes or prompts the model reads, guidance, ``guide_channels``, the sampler and its options' types and ranges),
so no error waits until after training has written checkpoints; and, on resume, what the checkpoint's run meant
(data classes, data description, objective) against this run's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..conditioning import ConditioningStage
from ..data.info import DataInfo
from ..errors import ConfigError
from .config import SampleConfig, TrainConfig, config_dict

#: the parts of a sampling request a recipe's ``sample`` section sets (``sample.classes`` ...)
SAMPLE_PARTS = ("classes", "prompts", "negative_prompt")
#: ``DataInfo`` fields a resumed run must share with its checkpoint (the VAE folder may move: its path is not one)
RESUME_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(DataInfo) if f.name != "vae")


def check_labels(info: DataInfo, model: nn.Module) -> None:
    """Every data label must be a class of the model and never its null (unconditional) class."""
    if not info.num_classes:
        return
    classes = getattr(model, "num_classes", None)
    null = getattr(model, "null_class", None)
    if classes is not None and 0 < int(classes) < info.num_classes:
        raise ConfigError(f"bad value for config key 'model.options.num_classes': the data has {info.num_classes} "
                          f"classes (labels 0..{info.num_classes - 1}) but the model has {int(classes)}"
                          + (f"; label {int(null)} would train as the null class" if null is not None else ""))
    if null is not None and 0 <= int(null) < info.num_classes:
        raise ConfigError(f"bad value for config key 'model.options.num_classes': the model's null class {int(null)} "
                          f"is also a data label (the data has {info.num_classes} classes)")


def check_sampling(cfg: TrainConfig, stage: ConditioningStage, info: DataInfo) -> None:
    """Dry-run the sampling request and guidance plan of ``cfg.sample`` (what the grids will use), naming the key."""
    from .sampling import request_of

    s = cfg.sample
    request = request_of(s)
    problem = stage.request_problem(request, {part: f"sample.{part}" for part in SAMPLE_PARTS})
    if problem is not None:
        raise ConfigError(f"bad value for config key {problem[0]!r}: {problem[1]}")
    key = "sample.classes" if s.classes else "sample.prompts" if s.prompts else "sample"
    try:
        stage.request_fields(request, s.n_per_class)
    except ConfigError as exc:
        raise ConfigError(f"bad value for config key {key!r}: {exc}") from None
    key = "sample.guidance" if s.guidance else "sample.guidance_scales" if s.guidance_scales else "sample.cfg"
    try:
        stage.guidance_steps(s.cfg, s.guidance, s.guidance_scales)
    except ConfigError as exc:
        raise ConfigError(f"bad value for config key {key!r}: {exc}") from None
    channels = info.channels
    if s.guide_channels is not None and s.guide_channels > channels:
        raise ConfigError(f"bad value for config key 'sample.guide_channels': {s.guide_channels} is more than the "
                          f"{channels} channels the model samples")


def check_sampler(sample: SampleConfig, kind: str) -> None:
    """``sample.sampler`` is a sampler of the objective's ``kind`` and ``sample.sampler_options`` are options it
    takes, each of its type and in its range (``eta=.inf`` would draw NaN grids, ``eta=abc`` fail after training)."""
    from ..diffusion.sampler_api import check_options
    from .objectives import sampler_entry

    check_options(sample.sampler, sampler_entry(sample.sampler, kind), sample.sampler_options,
                  "sample.sampler_options")
    if sample.timestep_spacing != "sections" and kind != "gaussian":
        from ..errors import ConfigError

        raise ConfigError(f"sample.timestep_spacing: {sample.timestep_spacing!r} chooses timesteps of a Gaussian "
                          f"(DDPM) chain; this run's objective is {kind}")
    if sample.cache is not None:  # the name, and its options by building one (nothing runs)
        from ..errors import ConfigError
        from ..layers.step_cache import CacheStats
        from .sampling import cache_factory

        try:
            cache_factory(sample.cache)(CacheStats(), **sample.cache_options)
        except TypeError as exc:
            raise ConfigError(f"bad value for config key 'sample.cache_options': {exc}") from None


def check_run(cfg: TrainConfig, info: DataInfo, model: nn.Module, stage: ConditioningStage) -> None:
    """All cross-field rules of a run (see the module docstring)."""
    check_labels(info, model)
    check_sampling(cfg, stage, info)


def check_bucket_shapes(model: nn.Module, shapes: list[tuple[int, ...]], channels: int) -> None:
    """Every bucket shape (in the model's input space) passes one forward of a zero sample, else a ConfigError
    naming the shape and what the model said, before anything is written."""
    import torch

    from ..costs import example_inputs
    from ..errors import DtxError

    (x, noise), conditions = example_inputs(model, 1)
    for shape in shapes:
        sample = torch.zeros(1, *shape[:-2], channels, *shape[-2:], dtype=x.dtype, device=x.device)
        try:
            with torch.no_grad():
                model(sample, noise, **conditions)
        except (DtxError, RuntimeError) as exc:
            size = "x".join(str(v) for v in shape)
            raise ConfigError(f"bad value for config key 'data.buckets.shapes': {type(model).__name__} cannot take "
                              f"the {size} bucket ({exc})") from None


def data_classes(dataset: Any) -> list[str] | None:
    """A dataset's class names in label order (its ``classes``), or None when it names none."""
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None


def _changes(saved: dict[str, Any], now: dict[str, Any], prefix: str) -> list[str]:
    """``KEY was A, is now B`` for every key in both mappings whose value differs."""
    return [f"{prefix}{k} was {saved[k]!r}, is now {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]


def _class_changes(saved: list[str], now: list[str]) -> list[str]:
    if len(saved) != len(now):
        return [f"{len(saved)} classes {saved[:8]} became {len(now)} {now[:8]}"]
    return [f"label {i} was {a!r}, is now {b!r}" for i, (a, b) in enumerate(zip(saved, now)) if a != b]


def check_resume(state: dict[str, Any], path: Path, cfg: TrainConfig, info: DataInfo,
                 classes: list[str] | None) -> None:
    """A resumed run must mean what its checkpoint's run meant: the same data classes in label order (a renamed
    class folder would permute the labels), the same data description and the same objective. Otherwise a
    ``ConfigError`` naming what changed, raised before anything is written; what a checkpoint does not record
    (older ones) is not compared."""
    found: list[tuple[str, list[str], str]] = []  # (what differs, the changes, what to restore)
    saved_classes = state.get("data_classes")
    if isinstance(saved_classes, list) and classes is not None:
        found.append(("data classes differ", _class_changes(list(saved_classes), classes), "data"))
    if isinstance(state.get("data_info"), dict):
        saved_info, now_info = dataclasses.asdict(DataInfo.from_dict(state["data_info"])), dataclasses.asdict(info)
        found.append(("data differ", _changes({k: saved_info[k] for k in RESUME_INFO_FIELDS},
                                              {k: now_info[k] for k in RESUME_INFO_FIELDS}, "data "), "data"))
    saved_objective = (state.get("config") or {}).get("objective")
    if isinstance(saved_objective, dict):
        found.append(("objective differs", _changes(saved_objective, config_dict(cfg)["objective"], "objective."),
                      "objective config"))
    for what, changes, original in found:
        if changes:
            raise ConfigError(f"{what} from the checkpoint's ({path}): {'; '.join(changes[:5])}; use a new --out "
                              f"or the original {original}")
