"""Fine-tuning from any loadable checkpoint: the recipe's ``finetune:`` section, the base weights it starts from
(class tables grown when the data has more classes), LoRA or full training, and which tensors a run saves.

``finetune.from`` names anything ``dtx.load_model`` reads (a run, a dtx folder, an official checkpoint, a diffusers
folder). ``method: full`` trains every parameter (minus ``freeze``); ``method: lora`` freezes the base and trains
adapters on ``lora.targets`` (plus ``train_also``). A LoRA run saves only what it trains, and rebuilds the rest from
``finetune.from`` when it resumes or samples.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from torch import nn

from .adapters import LoraSpec, add_lora, has_lora, is_adapter_key
from .errors import CheckpointError
from .interface import unwrap
from .models import count_parameters


@dataclass
class FinetuneConfig:
    """``from`` (stored as ``source``): the checkpoint to start from, read with ``weights`` (ema or raw) and, when
    its tensors cannot tell, ``format``; ``method`` full or lora; ``train_also`` / ``freeze``: parameter-name globs
    trained in full besides the adapters / kept frozen."""

    source: Optional[str] = None
    weights: Literal["ema", "raw"] = "ema"
    format: Optional[str] = None
    method: Literal["full", "lora"] = "full"
    lora: LoraSpec = field(default_factory=LoraSpec)
    train_also: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    #: recipe spellings of fields whose names Python reserves
    aliases: ClassVar[dict[str, str]] = {"from": "source"}

    def validate(self) -> "FinetuneConfig":
        from .config import check

        check(self.source is not None or (self.method == "full" and not self.train_also),
              "finetune.from", f"method {self.method!r} needs a checkpoint to start from")
        self.lora.validate()
        return self


@dataclass
class FinetuneReport:
    """What the start of a fine-tuning run did, for the log."""

    source: str
    method: str
    grown: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    optimizer_bytes: int = 0  # AdamW's two moments per trained element

    def summary(self) -> str:
        lines = [f"finetune: from {self.source} ({self.method}); {self.trainable:,} of {self.total:,} parameters "
                 f"trained ({100 * self.trainable / max(self.total, 1):.2f}%); optimizer state "
                 f"{self.optimizer_bytes / 2**20:.2f} MiB"]
        if self.adapted:
            lines.append(f"finetune: LoRA on {len(self.adapted)} linear layers ({self.adapted[0]}, ...)")
        lines += [f"finetune: {g}" for g in self.grown]
        return "\n".join(lines)


def load_base(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Copy ``cfg.source``'s weights into ``model`` (same architecture; class tables may grow); returns what grew."""
    from .models import LoadOptions, load_base_weights

    return load_base_weights(model, str(cfg.source), LoadOptions(weights=cfg.weights, format=cfg.format))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def prepare(model: nn.Module, cfg: FinetuneConfig, *, load_weights: bool = True) -> FinetuneReport | None:
    """Set ``model`` up as ``cfg`` asks, in place: base weights (unless ``load_weights`` is false: a full run
    resuming from its own checkpoint), adapters, which parameters train. None when there is nothing to fine-tune."""
    if cfg.source is None:
        return None
    report = FinetuneReport(str(cfg.source), cfg.method)
    if load_weights or cfg.method == "lora":  # a LoRA run's checkpoints hold only what it trains
        report.grown = load_base(model, cfg)
    if cfg.method == "lora":
        report.adapted = add_lora(model, cfg.lora)
    for name, p in unwrap(model).named_parameters():
        if _matches(name, cfg.train_also):
            p.requires_grad_(True)
        if _matches(name, cfg.freeze):
            p.requires_grad_(False)
    root = unwrap(model)
    report.trainable, report.total = count_parameters(root, trainable_only=True), count_parameters(root)
    report.optimizer_bytes = sum(2 * p.numel() * p.element_size() for p in root.parameters() if p.requires_grad)
    if report.trainable == 0:
        raise CheckpointError("finetune: no parameter is left to train (check finetune.freeze and the targets)")
    return report


def saved_keys(model: nn.Module) -> set[str] | None:
    """The state-dict keys a run's checkpoints hold: for a LoRA model the adapters and the trained parameters, else
    None (everything)."""
    if not has_lora(model):
        return None
    root = unwrap(model)
    trained = {n for n, p in root.named_parameters() if p.requires_grad}
    return {k for k in root.state_dict() if k in trained or is_adapter_key(k)}


def resolve_source(cfg: FinetuneConfig) -> None:
    """``cfg.source`` as an absolute path when it names an existing file or folder, so the stored run config finds
    it from any working directory."""
    if cfg.source is not None and Path(cfg.source).exists():
        cfg.source = str(Path(cfg.source).resolve())
