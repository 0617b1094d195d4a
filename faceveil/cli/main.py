"""Command line: a thin layer that parses flags and calls into the package. Errors are one line, exit 2; bare
`faceveil` (or a bare command group) prints its help."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from faceveil.cli.common import Groups, OneLineParser, as_flags, register_all
from faceveil.errors import FaceveilError
from faceveil.runtime import prepare_process

DESCRIPTION = """Hide the people in your photos and videos from face recognition: faceveil adds an identity mask
to each face, then checks the saved file against several real face-recognition models. Everything runs on this
machine; nothing is uploaded.

Start with:
  faceveil demo                          protect the sample photos, into ./faceveil-demo/
  faceveil protect PHOTOS/ -o OUT/       protect a folder of photos and videos
  faceveil protect --help                the everyday options first"""


def build_parser() -> argparse.ArgumentParser:
    from faceveil import __version__

    parser = OneLineParser(prog="faceveil", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"faceveil {__version__}")
    register_all(Groups(parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (the commands import it lazily): its OpenMP runtime reads the wait policy once.
    prepare_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # bare `faceveil` (or a group without its command): the help
        _help_of(parser, args).print_help()
        return 0
    terminated, previous = _terminate_as_interrupt()
    try:
        return _run(args, parser, terminated)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, terminated: list) -> int:
    try:
        return int(args.func(args) or 0)
    except FaceveilError as exc:  # its message names parameters; the user typed flags
        print(f"faceveil: error: {as_flags(str(exc), parser, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceveil: interrupted", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # a bug, not bad input: still one line unless the user asks for the traceback
        if os.environ.get("FACEVEIL_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"faceveil: internal error: {type(exc).__name__}: {message} (set FACEVEIL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


def _help_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command group the user named (`faceveil models`), else the main one."""
    group = getattr(args, "command", None)
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if group in getattr(action, "choices", {}):
            return action.choices[group]
    return parser


class _Terminated(list):
    """Truthy once SIGTERM arrived."""


def _terminate_as_interrupt() -> tuple[_Terminated, object]:
    """SIGTERM (docker stop, systemd, kill) stops a command as Ctrl-C does: temp files removed, reports finished,
    exit status 143. Only in the main thread (where Python delivers signals). Returns the flag and the handler to
    restore."""
    terminated = _Terminated()
    if threading.current_thread() is not threading.main_thread():
        return terminated, None

    def handler(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, handler)
    return terminated, previous


if __name__ == "__main__":
    sys.exit(main())
