"""The ``dtx`` command line. Subcommands come from plugins (``dtx_register_commands``); core provides
``models`` here and ``plugins`` in ``dtx.commands.plugins``. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from . import plugins
from .errors import DtxError, PluginError, one_line


def configure_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="only models of this family")
    p.add_argument("--no-params", action="store_true", help="skip building models to count parameters")
    p.add_argument("--json", action="store_true")


def run_models(args: argparse.Namespace) -> int:
    import torch

    from .models import count_parameters, create_model

    rows = []
    for name, entry in sorted(plugins.host().table("model").items()):
        if args.family is not None and entry.meta.get("family") != args.family:
            continue
        params = None
        if not args.no_params:
            with torch.device("meta"):
                try:  # by plugin:name, so a name two plugins register is still listed (as the one in use)
                    params = count_parameters(create_model(f"{entry.plugin}:{name}"))
                except Exception:  # architectures without defaults for every option
                    params = None
        rows.append({"name": name, "family": entry.meta.get("family", ""), "plugin": entry.plugin,
                     "params": params, "description": entry.meta.get("description", "")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models registered; install a backbone, e.g. pip install dtx-backbone-dit")
    for r in rows:
        p = f"{r['params'] / 1e6:9.2f}M" if r["params"] is not None else "        -"
        print(f"{r['name']:<20} {p}  {r['family']:<8} {r['plugin']:<8} {r['description']}")
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
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
        print(f"dtx: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dtx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("dtx: error: out of memory; reduce the batch size or model size", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("DTX_DEBUG"):
            raise
        if "out of memory" in str(exc).lower():
            print("dtx: error: out of memory (try a smaller batch size, activation checkpointing, "
                  "or bf16 autocast)", file=sys.stderr)
            return 1
        print(f"dtx: error: {type(exc).__name__}: {one_line(exc)} (set DTX_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
