"""Protection methods: one registry (registry.py), one contract per kind (base.py), each method a small file or
sub-package composed from the shared attack core (faceveil.attacks)."""

from __future__ import annotations

from faceveil.methods.registry import MethodEntry, entry, names


def available(kind: str | None = None) -> list[MethodEntry]:
    """Every registered method (of one kind: image, person or end-cloud), with its paper and a one-line summary."""
    return [entry(name) for name in (names(kind) if kind else names())]


__all__ = ["MethodEntry", "available", "entry", "names"]
