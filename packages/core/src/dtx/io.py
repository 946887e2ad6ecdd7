"""Atomic file writes: every file dtx writes for a user (checkpoints, shards, models, grids, videos, metrics) appears
whole or not at all, so a process killed mid-write never leaves a torn file under the final name."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new or renamed files) to disk; a no-op where folders have no handles."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so the final rename is atomic); keeps the suffix so
    writers that choose a format by extension (PIL, imageio, numpy) still do."""
    path = Path(path)
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, fsync it, rename it over ``path`` and fsync the
    folder. The parent folder is created; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
