"""`faceveil eval identification --protocol opom`: the OPOM person-mask protocol (dispatched from faceveil.cli)."""

from __future__ import annotations

import argparse

from faceveil.errors import FaceveilError


def eval_identification(args: argparse.Namespace) -> int:
    raise FaceveilError("the opom protocol is not built yet")
