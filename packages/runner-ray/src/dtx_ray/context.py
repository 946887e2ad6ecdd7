"""``RayContext``: the training loop's ``RunContext`` on a Ray Train worker (rank, device, DDP/FSDP, reports, resume).

Ranks, devices and model wrapping come from ``ray.train``; ``report`` forwards metrics and the main rank's checkpoint
to ``ray.train.report`` (a barrier, called equally on every rank): by default a pointer to the run folder's checkpoint,
so that each checkpoint is stored once; with ``full_copies`` (an explicit Ray storage, such as a bucket that a
restarted worker on another node reads) the whole folder. Resuming takes the newer of Ray's last
reported checkpoint and the run folder's newest valid one, chosen on rank 0 so every rank restores the same state;
rank 0 also writes the reported metrics to TensorBoard when a writer is installed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from dtx.checkpoint import RUN_CHECKPOINTS, step_of, verify
from dtx.errors import CheckpointError, ConfigError
from dtx.training.context import all_reduce_mean, find_resume_checkpoint

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp", "none"]
RESTORE_DIR = "ray_restore"  # where checkpoints from remote Ray storage are downloaded inside the run folder
POINTER_PREFIX = "dtx-ray-pointer-"  # temporary folders holding a pointer while Ray copies it into its storage
POINTER = "dtx-checkpoint.json"  # what Ray stores of a checkpoint whose only full copy is in the run folder


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray refuses tensors in metrics; scalars become Python numbers and paths strings."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out


def _step_or_minus_one(path: Path) -> int:
    try:
        return step_of(path)
    except CheckpointError:
        return -1


class RayContext:
    """One Ray Train worker's view of the run; construct it inside the function that ``TorchTrainer`` runs."""

    def __init__(self, out_dir: str | Path, strategy: Strategy = "ddp", resume: bool = True,
                 require_resume: bool = False, tensorboard_dir: str | Path | None = None,
                 full_copies: bool = False) -> None:
        import ray.train
        import ray.train.torch

        if strategy not in ("ddp", "fsdp", "none"):
            raise ConfigError(f"unknown parallel strategy {strategy!r}; choose ddp, fsdp or none")
        train_ctx = ray.train.get_context()
        self.rank = train_ctx.get_world_rank()
        self.world_size = train_ctx.get_world_size()
        self.local_rank = train_ctx.get_local_rank()
        self.is_main = self.rank == 0
        self.device = ray.train.torch.get_device()
        self.out_dir = Path(out_dir)
        self.strategy = strategy
        self.resume = resume
        self.require_resume = require_resume
        self.full_copies = full_copies
        self._tensorboard = None
        if tensorboard_dir is not None and self.is_main:
            from .tensorboard import TensorBoardLogger

            self._tensorboard = TensorBoardLogger(tensorboard_dir)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to this worker's device and, with more than one worker, wrap in DDP (default) or shard in place with
        FSDP2 (each transformer block a unit; gloo on CPU, NCCL on GPU; checkpoints stay full: see
        ``dtx.training.sharding``)."""
        import ray.train.torch

        if self.strategy == "fsdp" and _distributed():
            from dtx.training.sharding import shard_model

            return shard_model(model.to(self.device))
        return ray.train.torch.prepare_model(model, parallel_strategy=None if self.strategy == "none"
                                             else self.strategy)

    def prepare_loader(self, loader: Any) -> Any:
        """The loop already shards batches by rank; Ray's wrapper only adds asynchronous host-to-GPU copies."""
        import ray.train.torch
        from torch.utils.data import DataLoader

        if isinstance(loader, DataLoader) and self.device.type == "cuda":
            return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=True)
        return loader

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """``ray.train.report`` with the main rank's checkpoint (under its ``step_XXXXXXXX`` name): a pointer to the
        run folder's copy, or with ``full_copies`` the whole folder."""
        import ray.train

        metrics = _plain_metrics(metrics)
        if checkpoint_dir is None:
            ray.train.report(metrics)
        elif self.full_copies or Path(checkpoint_dir).resolve().parent != self._home():
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                             checkpoint_dir_name=Path(checkpoint_dir).name)
        else:
            with tempfile.TemporaryDirectory(prefix=POINTER_PREFIX) as tmp:
                (Path(tmp) / POINTER).write_text(json.dumps({"checkpoint": str(Path(checkpoint_dir).resolve())}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=Path(checkpoint_dir).name)
        if self._tensorboard is not None:
            self._tensorboard.log(metrics)

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint every rank restores: the newer of Ray's and the run folder's (Ray's on a tie), or None."""
        if not (self.resume or self.require_resume):
            return None
        choice = self._pick_checkpoint() if self.is_main else None
        if _distributed():
            box = [str(choice) if choice is not None else None]
            dist.broadcast_object_list(box, src=0)
            choice = Path(box[0]) if box[0] is not None else None
        if choice is None and self.require_resume:
            raise CheckpointError(f"--resume given but neither Ray storage nor {self.out_dir / 'checkpoints'} "
                                  f"holds a valid checkpoint")
        return choice

    def _pick_checkpoint(self) -> Path | None:
        candidates = [p for p in (self._ray_checkpoint(), find_resume_checkpoint(self.out_dir)) if p is not None]
        if not candidates:
            return None
        return max(candidates, key=_step_or_minus_one)  # max keeps the first (Ray's) on a tie

    def _ray_checkpoint(self) -> Path | None:
        """Ray's last reported checkpoint as a local folder (downloaded into the run folder from remote storage)."""
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            path = Path(checkpoint.path)
        else:
            path = self.out_dir / RESTORE_DIR / Path(checkpoint.path).name
            if verify(path) is not None:
                checkpoint.to_directory(str(path))
        if path.name.startswith(POINTER_PREFIX) and not path.exists():
            return None  # Ray Train's local mode hands back the reported folder itself: a pointer already removed
        if (path / POINTER).is_file():
            path = self._follow_pointer(path / POINTER)
            if path is None:
                return None
        reason = verify(path)
        if reason is not None:
            log.warning("ignoring Ray checkpoint %s: %s", path, reason)
            return None
        return path

    def _home(self) -> Path:
        return (self.out_dir / RUN_CHECKPOINTS).resolve()

    def _follow_pointer(self, pointer: Path) -> Path | None:
        """The run-folder checkpoint a Ray pointer names; only one inside this run's checkpoints folder counts."""
        try:
            target = Path(json.loads(pointer.read_text())["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring Ray checkpoint pointer %s: %s", pointer, exc)
            return None
        home = self._home()
        if target.parent != home or target.is_symlink():
            log.warning("ignoring Ray checkpoint pointer %s: %s is not a checkpoint of %s", pointer, target, home)
            return None
        return target

    def close(self) -> None:
        """Flush what this worker writes besides checkpoints (TensorBoard events); the runner calls it at the end."""
        if self._tensorboard is not None:
            self._tensorboard.close()

    def barrier(self) -> None:
        if _distributed():
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(t)
