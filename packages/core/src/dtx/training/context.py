"""What the training loop needs from the process it runs in: rank, device, model/loader wrapping, reporting, resume.

``LocalContext`` is the single-process context behind ``dtx train --runner local``; the Ray runner provides its own
class with the same attributes and methods (``RunContext``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError


@runtime_checkable
class RunContext(Protocol):
    """One worker's view of a run.

    ``prepare_loader`` receives a loader whose sampler already yields this rank's shard (the loop shards by rank
    itself so that resuming is exact); a context may wrap it, e.g. to move batches to its device.
    ``report`` is called the same number of times on every worker, with the checkpoint folder on the main rank.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    out_dir: Path

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def prepare_loader(self, loader: Any) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None: ...

    def resume_checkpoint(self) -> Path | None: ...

    def barrier(self) -> None: ...

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor: ...


def find_resume_checkpoint(out_dir: Path, require: bool = False) -> Path | None:
    """Newest checkpoint under ``out_dir/checkpoints`` that passes every check; with ``require``, none is an error.
    Checkpoints that are all unusable are an error too: starting over would overwrite the run they belong to."""
    from ..checkpoint import RUN_CHECKPOINTS, CheckpointManager

    root = Path(out_dir) / RUN_CHECKPOINTS
    manager = CheckpointManager(root)
    latest = manager.latest() if root.is_dir() else None
    if latest is None and manager.skipped:
        reasons = "; ".join(f"{p.name}: {reason}" for p, reason in manager.skipped[:3])
        more = f" and {len(manager.skipped) - 3} more" if len(manager.skipped) > 3 else ""
        raise CheckpointError(f"{root} holds {len(manager.skipped)} checkpoint(s) but none is usable "
                              f"({reasons}{more}); nothing was changed: repair or move them, or use another --out")
    if latest is None and require:
        raise CheckpointError(f"--resume given but {root} holds no valid checkpoint")
    return latest


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the default process group, or ``t`` itself when there is none."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / dist.get_world_size()
    return t


def default_device(use_gpu: bool | None = None) -> torch.device:
    """CUDA when available (and not switched off), else CPU."""
    if use_gpu is not False and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LocalContext:
    """A single process, no process group: identity wrapping, reports kept in memory."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_main = True

    def __init__(self, out_dir: str | Path, device: torch.device | str | None = None, resume: bool = True,
                 require_resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.resume = resume
        self.require_resume = require_resume
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.reports.append({**metrics, "checkpoint": str(checkpoint_dir) if checkpoint_dir else None})

    def resume_checkpoint(self) -> Path | None:
        if not self.resume and not self.require_resume:
            return None
        return find_resume_checkpoint(self.out_dir, require=self.require_resume)

    def barrier(self) -> None:
        return None

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t
