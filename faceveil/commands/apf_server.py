"""`faceveil` sub-commands of the APF server wing (serve, load test)."""

from __future__ import annotations

from faceveil.commands import Groups


def register(groups: Groups) -> None:
    """Adds this wing's sub-commands to the parser groups."""
