"""Rules between the config, the data and the model, checked when the run is built and before anything is written:
labels against ``num_classes`` and the null class, and every sampling setting of the periodic and final grids
(classes or prompts the model reads, guidance, ``guide_channels``, the sampler and its options' types and ranges),
so no error waits until after training has written checkpoints."""

from __future__ import annotations

from torch import nn

from ..conditioning import ConditioningStage, SampleRequest
from ..data.info import DataInfo
from ..errors import ConfigError
from .config import TrainConfig

#: the parts of a sampling request a recipe's ``sample`` section sets (``sample.classes`` ...)
SAMPLE_PARTS = ("classes", "prompts", "negative_prompt")


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
    s = cfg.sample
    request = SampleRequest(classes=list(s.classes), prompts=list(s.prompts), negative_prompt=s.negative_prompt)
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


def check_sampler(cfg: TrainConfig, kind: str) -> None:
    """``sample.sampler`` is a sampler of the objective's ``kind`` and ``sample.sampler_options`` are options it
    takes, each of its type and in its range (``eta=.inf`` would draw NaN grids, ``eta=abc`` fail after training)."""
    from ..diffusion.sampler_api import check_options
    from .objectives import sampler_entry

    s = cfg.sample
    check_options(s.sampler, sampler_entry(s.sampler, kind), s.sampler_options, "sample.sampler_options")


def check_run(cfg: TrainConfig, info: DataInfo, model: nn.Module, stage: ConditioningStage) -> None:
    """All cross-field rules of a run (see the module docstring)."""
    check_labels(info, model)
    check_sampling(cfg, stage, info)
