"""Sub-commands of the wings that came after the core CLI, one module per wing. Each module has
`register(groups)`, where groups maps "root", "eval", "bench" and "train" to argparse sub-parser actions, so that
`faceveil/cli.py` stays thin and each wing owns its own flags."""

from __future__ import annotations

import argparse
import importlib

WINGS = ("person", "apf", "serve", "advcloak", "robustness", "report")

Groups = dict[str, "argparse._SubParsersAction"]


def register_all(groups: Groups) -> None:
    for wing in WINGS:
        importlib.import_module(f"faceveil.cli.{wing}").register(groups)


def finish_batch(report, kind: str, args: argparse.Namespace) -> int:
    """After a photo job: the HTML report if asked (also after Ctrl-C: the photos done so far), and the exit status
    (130 interrupted, 2 when a file failed, else 0)."""
    if getattr(args, "report", None):
        from faceveil.report import write_report

        write_report(args.report, kind, report.to_dict(), progress=not args.quiet)
    if report.interrupted:
        return 130
    return 2 if any(r.status == "error" for r in report.results) else 0
