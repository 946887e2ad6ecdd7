"""Run metrics: ``metrics.jsonl`` (one JSON object per line, rewound on resume) and the ``loss.png`` plot.

A line every ``log_every`` steps holds ``loss``, the mean training loss over the steps since the line before (what
the progress bar shows and the run's final summary repeats), and ``batch_loss``, the newest step's own batch loss
(noisier: one batch, one draw of noise levels); both names mean the same in the final summary.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write, atomic_write_text, naming_file, open_no_follow, refuse_link


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main rank only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; never through a symbolic link (a dangling one would create a file outside the run)."""
        if self.enabled:
            fd = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with naming_file(self.path), open(fd, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from) and torn lines."""
        if not self.enabled:
            return
        refuse_link(self.path)
        if not self.path.is_file():
            return
        kept = [json.dumps(r) + "\n" for r in read_records(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(kept))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``: one JSON object per line whose ``step`` is an integer and whose ``loss``
    is a number or null. A torn last line (a process killed mid-write) is dropped; any other malformed line is a
    ``DataError`` naming the file and the line, as every reader of the file (resume, the loss plot) sees it."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if number == len(lines):  # no newline after it: torn by a kill mid-write
                continue
            raise DataError(f"{path} line {number}: not a JSON object (fix or remove the line)") from None
        if not (isinstance(record, dict) and isinstance(record.get("step", 0), int)
                and not isinstance(record.get("step", 0), bool)
                and (record.get("loss") is None or _is_number(record["loss"]))):
            raise DataError(f"{path} line {number}: not a metrics record (an object with an integer step and a "
                            f"numeric or null loss); fix or remove the line")
        records.append(record)
    return records


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """``loss.png``: logged loss against step (log scale), from ``metrics.jsonl``."""
    if not metrics_path.is_file():
        return None
    rows = [r for r in read_records(metrics_path) if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
