"""User-facing errors: one clear line that names the problem, and the CLI exit code that goes with it."""

from __future__ import annotations


class DtxError(Exception):
    """Base class of errors caused by user input (not bugs); the CLI prints the message alone and exits 2."""

    exit_code = 2


class ConfigError(DtxError, ValueError):
    """A configuration key, type or value is invalid."""


class UnknownNameError(DtxError, KeyError):
    """A registry lookup (model, sampler, plugin, ...) found nothing; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeError(DtxError, ValueError):
    """A tensor passed to the public API has the wrong shape, dtype or device."""


class CheckpointError(DtxError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit the architecture."""


class DataError(DtxError, ValueError):
    """A dataset is missing, empty or unreadable."""


class PluginError(DtxError, RuntimeError):
    """A plugin failed to load or registered something invalid."""


class TrainingError(DtxError, RuntimeError):
    """Training cannot go on (e.g. the loss kept being NaN/inf); earlier checkpoints are kept."""


def one_line(exc: BaseException) -> str:
    """An exception's message flattened to one line (the CLI prints every user error as one ``dtx: error:`` line)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class DiskFullError(DtxError, OSError):
    """A write did not fit on its device; the message names the folder and the space needed."""


class RunLockedError(DtxError, RuntimeError):
    """Another process is writing to the same run folder; the message names its PID."""
