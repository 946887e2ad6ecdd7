"""Atomic file writes: every file dtx writes for a user (checkpoints, shards, models, grids, videos, metrics) appears
whole or not at all, so a process killed mid-write never leaves a torn file under the final name. The files of one
result (a sample grid and its archive) can land together (:func:`atomic_group`); no file is written through a
symbolic link, and a full disk names the file."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from .errors import DiskFullError


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


def umask() -> int:
    """This process's file-creation mask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a written file the mode ``open()`` gives new files (0o666 less the umask): some writers create private
    temporaries (safetensors' ``save_file`` makes 0600 files), which would leave weights unreadable to the group
    while ``config.yaml`` beside them is not."""
    os.chmod(path, 0o666 & ~umask())


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so the final rename is atomic); keeps the suffix so
    writers that choose a format by extension (PIL, imageio, numpy) still do."""
    path = Path(path)
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def refuse_link(path: str | os.PathLike) -> None:
    """Raise ``ConfigError`` naming ``path`` if it is a symbolic link: dtx never writes (or reads a run's own files)
    through one, since it could point anywhere, e.g. a run folder from elsewhere with ``.dtx-lock -> ~/.bashrc``."""
    from .errors import ConfigError

    if Path(path).is_symlink():
        raise ConfigError(f"{path} is a symbolic link; dtx does not write or read its files through links "
                          f"(replace it with a plain file or folder, or choose another output)")


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (``O_NOFOLLOW`` where the OS has it, so a link that
    appears after a check is refused too), with ``refuse_link``'s error."""
    refuse_link(path)
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_link(path)
        raise


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in a full-disk error raised while writing it: ``write()`` reports ENOSPC without a file name,
    and a temporary file's name would mean nothing to the user."""
    from .errors import DtxError

    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC and not isinstance(exc, DtxError):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


class _Group:
    """Finished temporaries waiting to be renamed over their final paths, and the folders made for them."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []
        self.made: list[Path] = []


_GROUP: contextvars.ContextVar[_Group | None] = contextvars.ContextVar("dtx_atomic_group", default=None)


@contextlib.contextmanager
def atomic_group() -> Iterator[None]:
    """Inside ``with atomic_group():`` each :func:`atomic_write` leaves its finished file under its temporary name;
    they are renamed into place together when the block ends without an error. On an error every temporary (and
    every folder made for them that stayed empty) is removed: the files of one result land together or not at all,
    and older files of the same names stay untouched."""
    group = _Group()
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group.pending:
            tmp.unlink(missing_ok=True)
        for folder in reversed(group.made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        _GROUP.reset(token)
    for tmp, path in group.pending:
        os.replace(tmp, path)
    for folder in dict.fromkeys(path.parent for _, path in group.pending):
        fsync_dir(folder)


def _make_parent(path: Path) -> list[Path]:
    """Create ``path``'s folder; returns the folders that had to be made, outermost first."""
    missing = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, fsync it, rename it over ``path`` and fsync the
    folder (inside :func:`atomic_group`: rename it when the group ends). The file gets the umask's default mode
    whatever mode ``write`` created it with; the parent folder is created; a symbolic link at ``path`` is refused; on
    any error the temporary file is removed and ``path`` is untouched, and a full disk names ``path``."""
    path = Path(path)
    refuse_link(path)
    group = _GROUP.get()
    made = _make_parent(path)
    if group is not None:
        group.made += made
    tmp = temp_path(path)
    try:
        with naming_file(path):
            write(tmp)
            set_default_mode(tmp)
            fsync_file(tmp)
        if group is not None:
            group.pending.append((tmp, path))
            return path
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


# -- limits on untrusted files ------------------------------------------------------------------------------------------

def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``folder`` (its nearest existing ancestor)."""
    import shutil

    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full_error(folder: str | os.PathLike, needed: int) -> "DiskFullError":
    """The one error for a write that does not fit: names the folder, the bytes needed and the bytes free."""
    from .errors import DiskFullError

    mb = 1 << 20
    return DiskFullError(f"no space left on device (needed {needed / mb:.1f} MB in {folder}, "
                         f"{free_bytes(folder) / mb:.1f} MB free)")


def check_free_space(folder: str | os.PathLike, needed: int) -> None:
    """Raise ``DiskFullError`` before writing ``needed`` bytes into ``folder`` when they cannot fit."""
    if free_bytes(folder) < needed:
        raise disk_full_error(folder, needed)


MAX_TEXT_BYTES = 64 << 20  # a text file dtx reads whole (a prompts file)


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a regular file a user named (``what``: the option, e.g. ``--prompts-file``), at most
    ``MAX_TEXT_BYTES``; a missing path, a folder or device (``/dev/zero``), a larger file or one that is not UTF-8
    is a ConfigError naming the option and the file."""
    from .errors import ConfigError

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} not found")
    if not path.is_file():
        kind = "a folder, not a regular file" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{what} {path} is {kind}; name a text file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_TEXT_BYTES} bytes")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None


def check_output_path(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """Refuse a path dtx is to write a file (``folder``: a folder) at that cannot be one: an existing folder (an
    existing file), or a path under a file; a ConfigError naming ``what`` (the option), checked before anything is
    loaded or written."""
    from .errors import ConfigError

    path = Path(path)
    if not folder and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; name a file")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} lies under {parent}, which is a file, not a folder")
            return
