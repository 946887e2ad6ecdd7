"""The ``dtx`` command line. Subcommands come from plugins (``dtx_register_commands``); the core's own are in
``dtx.commands`` (registered by ``dtx.builtin``). User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, Sequence

from . import plugins
from .errors import DtxError, PluginError, one_line


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one-line ``DtxError``s (exit 2) instead of usage text + SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DtxError(f"{message} (see `{self.prog} --help`)")


def _broken_command(name: str, plugin: str, error: str):
    def run(args: argparse.Namespace) -> int:
        raise PluginError(f"command {name!r} of plugin {plugin!r} failed to set up: {error}")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtx", description="dtx: diffusion transformers")
    parser.add_argument("--version", action="version", version=f"dtx {__import__('dtx').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in sorted(plugins.host().table("command").items()):
        configure = entry.obj
        run = entry.meta.get("run") or (entry.meta.get("args") or (None,))[0]
        p = sub.add_parser(name, help=entry.meta.get("help", ""), description=entry.meta.get("help", ""))
        try:
            configure(p)
        except Exception as exc:  # one plugin's broken parser must not take the whole CLI down
            error = plugins._short_error(exc)
            record = next((r for r in plugins.host() if r.name == entry.plugin), None)
            if record is not None:
                record.error = f"in command {name!r}: {error}" + (f"; {record.error}" if record.error else "")
            run = _broken_command(name, entry.plugin, error)
        p.set_defaults(_run=run)
    return parser


class _LineTracker:
    """Wraps stderr to know whether the last thing written (a progress bar redrawn with ``\\r``, a forwarded log)
    left the cursor mid-line, so that an error line can start on a line of its own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if text:
            self.at_line_start = text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _error(stderr: _LineTracker, message: str) -> None:
    """Print ``dtx: error: message`` as one line that starts a line."""
    stderr.write(("" if stderr.at_line_start else "\n") + f"dtx: error: {message}\n")
    stderr.flush()


def _is_device_oom(exc: BaseException) -> bool:
    """An accelerator allocation failure, by type (torch raises ``torch.OutOfMemoryError``), never by message."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(oom, type) and isinstance(exc, oom)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (``DtxError``, a full disk) prints one ``dtx: error:`` line and returns 2; any
    other exception is an internal failure: one line naming its type, return 1 (``DTX_DEBUG=1`` re-raises it)."""
    original = sys.stderr
    stderr = _LineTracker(original)
    sys.stderr = stderr  # type: ignore[assignment]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0
        return int(args._run(args) or 0)
    except SystemExit as exc:  # --help / --version, or a command that exits itself
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except DtxError as exc:
        _error(stderr, one_line(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write(("" if stderr.at_line_start else "\n") + "dtx: interrupted\n")
        return 130
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            _error(stderr, f"no space left on device writing {exc.filename or 'a file'}")
            return 2
        if os.environ.get("DTX_DEBUG"):
            raise
        _error(stderr, f"{type(exc).__name__}: {one_line(exc)} (set DTX_DEBUG=1 for the traceback)")
        return 1
    except MemoryError:
        _error(stderr, "out of host memory (MemoryError); reduce the batch size or model size")
        return 1
    except Exception as exc:
        if os.environ.get("DTX_DEBUG"):
            raise
        if _is_device_oom(exc):
            _error(stderr, f"out of GPU memory ({one_line(exc)[:200]}); try a smaller batch size, activation "
                           f"checkpointing or bf16 autocast")
            return 1
        _error(stderr, f"{type(exc).__name__}: {one_line(exc)} (set DTX_DEBUG=1 for the traceback)")
        return 1
    finally:
        if sys.stderr is stderr:
            sys.stderr = original


if __name__ == "__main__":
    sys.exit(main())
