"""The ``gradreg`` command line. Every input error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from . import __version__

# subcommand → module in gradreg.commands (each has HELP, add_arguments, run)
COMMANDS = ("train", "sweep", "attack", "eval", "transfer", "lrc", "analyze", "reproduce", "demo", "list")


def _available() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for name in COMMANDS:
        try:
            found[name] = importlib.import_module(f"gradreg.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"gradreg.commands.{name}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradreg", description=(
        "Adversarially robust training by input-gradient regularization (DataGrad, Lyu, GN/SGR, "
        "ARR/TRADES, operator norm), with the attacks and evaluation to judge it."))
    parser.add_argument("--version", action="version", version=f"gradreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available().items():
        p = sub.add_parser(name, help=getattr(module, "HELP", None), description=getattr(module, "HELP", None))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .registry import UnknownNameError
    from .runs import NotARunError

    return (ConfigError, UnknownNameError, NotARunError, CheckpointError, FileNotFoundError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gradreg command line; returns its exit status (a user's error: one line on stderr
    and status 2). Leaves a process group only if this command joined it (torchrun's ranks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # recorded in results files
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return _dispatch(args)


def entry() -> None:
    """The ``gradreg`` command and ``python -m gradreg``: :func:`main`, then the exit. A torchrun
    rank leaves through :func:`gradreg.distributed.leave` (no interpreter finalization), with
    its own status even when its command raised; :func:`main` itself always returns or raises,
    so a program that calls it goes on."""
    from . import distributed

    try:
        code = main()
    except Exception:
        if not distributed.was_active():
            raise
        traceback.print_exc()  # what Python would print, before the rank leaves with status 1
        code = 1
    if distributed.was_active():
        distributed.leave(code)
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; a user's error becomes one line on stderr and an exit status. A
    normal return leaves the process group (every rank got there); an error does not."""
    from . import distributed
    from .trainer import NonFiniteError, TrainingInterrupted

    try:
        code = int(args._run(args) or 0)
        distributed.shutdown()
        return code
    except TrainingInterrupted as err:
        print(f"gradreg: {err}", file=sys.stderr)
        return 130
    except NonFiniteError as err:
        print(f"gradreg: error: {err}", file=sys.stderr)
        return 3
    except _user_errors() as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"gradreg: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    entry()
