"""`faceveil report RESULT.json... -o report.html`: an HTML report from results files written by `--json`
(protect/apply batch reports, verify, and any eval/bench documents, which merge into one report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faceveil.cli.common import Groups, add_report_originals_flag
from faceveil.errors import FaceveilError


def _cmd_report(args: argparse.Namespace) -> int:
    from faceveil.report import write_report
    from faceveil.report.render import combine

    inputs = [Path(p) for p in args.results]
    out = Path(args.output)
    if out.exists() and any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        raise FaceveilError(f"{out} is one of the results files: choose another output name")
    kind, payload = combine(inputs)
    write_report(out, kind, payload, progress=not args.quiet, originals=args.report_originals)
    print(f"faceveil: {kind} report written to {out} ({out.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
    return 0


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser("report", help="HTML report from results files written by --json")
    p.add_argument("results", nargs="+", metavar="RESULT.json",
                   help="results files: one protect/apply/verify report, or eval JSONs (several merge)")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="the report file to write")
    add_report_originals_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_report)
