"""The recogniser zoo: one registry (zoo.py), one loader per weight format (loaders/), each proven equal to its
original runtime (references.py). `load` and `available` import torch only when called."""

from __future__ import annotations

from typing import Any


def load(name: str) -> Any:
    """The recogniser `name` (a zoo.Recogniser: aligned RGB crops in [0, 1] -> embeddings), loaded once."""
    from faceveil.models import zoo

    return zoo.load(name)


def available() -> list[str]:
    from faceveil.models import zoo

    return list(zoo.SPECS)
