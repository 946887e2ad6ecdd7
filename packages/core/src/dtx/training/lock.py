"""One writer per run folder: an exclusive OS lock on ``RUN/.dtx-lock`` held for the whole run.

The lock is ``flock`` (``msvcrt.locking`` on Windows) on an open file, so the kernel releases it when the holder
exits in any way, SIGKILL included: a stale lock file never blocks. The holder writes its PID and host into the file,
and a second writer fails at once with a ``RunLockedError`` naming them. A run folder that the lock itself created
and that holds nothing else is removed again, so a run rejected before writing anything leaves no trace.

Only a new or empty folder or a dtx run folder is claimed (another folder's files, e.g. a model folder's
``config.yaml``, would be overwritten), and the lock file is never opened through a symbolic link.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ..checkpoint import RUN_CHECKPOINTS
from ..errors import ConfigError, RunLockedError
from ..io import open_no_follow

LOCK_FILE = ".dtx-lock"
#: folders a runner creates in the run folder before the training loop takes the lock (the ray runner's storage and
#: TensorBoard logs): alone they do not make a folder someone else's
RUNNER_ENTRIES = ("ray", "tensorboard")


def check_run_folder(folder: str | os.PathLike) -> None:
    """A run folder is new, empty or one that ``dtx train`` used (it has ``.dtx-lock`` or ``checkpoints/``); any
    other folder is refused before anything is written, so that its own files are never overwritten."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name not in RUNNER_ENTRIES or not p.is_dir())
    if not entries or LOCK_FILE in entries or (folder / RUN_CHECKPOINTS).is_dir():
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(f"run folder {folder} is not empty ({shown}) and is not a dtx run folder (no {LOCK_FILE} or "
                      f"{RUN_CHECKPOINTS}/); dtx train would write config.yaml, metrics.jsonl and checkpoints into "
                      f"it: use a new or empty folder")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunLock:
    """``with RunLock(out):`` holds the run folder's lock; ``enabled=False`` (non-main ranks) does nothing."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True) -> None:
        self.folder, self.enabled = Path(folder), enabled
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def holder(self) -> str:
        """What the holder wrote into the lock file ("pid 123 on host, since ..."), or a placeholder."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process (PID not yet written)"

    def acquire(self) -> None:
        if not self.enabled:
            return
        check_run_folder(self.folder)
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except ConfigError:
            self._remove_if_created()
            raise
        if not _try_lock(fd):
            os.close(fd)
            raise RunLockedError(f"run folder {self.folder} is in use by {self.holder()}; wait for that run to end "
                                 f"or use another --out")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the lock
        if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """Remove the run folder again if this lock created it and it stayed empty."""
        if self._created:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
