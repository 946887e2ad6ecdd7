"""TensorBoard scalars of a run, written by rank 0 beside ``metrics.jsonl`` (``<out>/tensorboard``).

Rank 0 writes rather than a Ray controller callback: the controller may sit on another node than the run folder, and
Ray's ``UserCallback`` has no end-of-run hook to flush the writer's last events. TensorBoard is optional: the writer
comes from ``torch.utils.tensorboard`` (needs ``tensorboard``) or ``tensorboardX``; with neither nothing is written.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any


def summary_writer_class() -> type | None:
    """A ``SummaryWriter`` class from whichever TensorBoard writer is installed, or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


class TensorBoardLogger:
    """Numeric metrics under ``train/<key>`` at their ``step``; the writer opens on first use, ``close`` flushes it."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writer: Any = None
        self._count = 0

    def log(self, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            cls = summary_writer_class()
            if cls is None:
                return
            self._writer = cls(str(self.logdir), flush_secs=10)
        self._count += 1
        step = int(metrics.get("step", self._count))
        for key, value in metrics.items():
            if key != "step" and isinstance(value, Real) and not isinstance(value, bool):
                self._writer.add_scalar(f"train/{key}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
