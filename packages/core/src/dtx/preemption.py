"""Graceful stop on SIGTERM/SIGINT: the signal only sets a flag, and the training loop checkpoints and exits between
steps. A second signal of the same kind falls through to the previous handler (a second Ctrl-C interrupts at once)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

_active: list["StopOnSignal"] = []


class StopOnSignal:
    """Context manager that turns the given signals into ``stop_requested() == True`` and restores the old handlers.

    Outside the main thread (where Python cannot install handlers) it installs nothing and never requests a stop.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def stop_requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received == sig:  # asked twice: behave as if we were not here
            previous = self._previous.get(sig, signal.SIG_DFL)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(sig)
            return
        self.received = sig
        log.warning("received %s: will save a checkpoint and stop after the current step "
                    "(send it again to stop immediately)", sig.name)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            handler: Callable[[int, FrameType | None], None] = self._handle
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, handler)
        else:
            log.debug("not in the main thread: SIGTERM/SIGINT are left to the default handlers")
        _active.append(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()
        if self in _active:
            _active.remove(self)


def stop_on_signals(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> StopOnSignal:
    """``with stop_on_signals() as guard: ... if guard.stop_requested(): save and break``."""
    return StopOnSignal(signals)


def stop_requested() -> bool:
    """True once any active :class:`StopOnSignal` in this process has caught a signal."""
    return any(g.stop_requested() for g in _active)
