"""The command line: parse flags, call the library, print. Nothing below faceveil.cli parses flags or prints."""

from faceveil.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
