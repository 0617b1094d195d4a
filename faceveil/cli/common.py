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
