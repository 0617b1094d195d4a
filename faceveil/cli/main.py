"""Command line: a thin layer that parses flags and calls into the package. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from faceveil.cli.common import Groups, OneLineParser, as_flags, register_all
from faceveil.errors import FaceveilError
from faceveil.runtime import prepare_process


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="faceveil", description=__doc__)
    register_all(Groups(parser.add_subparsers(dest="command", required=True)))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (the commands import it lazily): its OpenMP runtime reads the wait policy once.
    prepare_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FaceveilError as exc:  # its message names parameters; the user typed flags
        print(f"faceveil: error: {as_flags(str(exc), parser, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceveil: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless the user asks for the traceback
        if os.environ.get("FACEVEIL_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"faceveil: internal error: {type(exc).__name__}: {message} (set FACEVEIL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
