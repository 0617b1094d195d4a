"""Which detections are faces: MTCNN's detections confirmed by BlazeFace (faceveil.detect.confirm), wired here
because detect and models are sibling wings that may not import each other."""

from __future__ import annotations

from faceveil.detect.confirm import FaceConfirmer

_DEFAULT: FaceConfirmer | None = None


def default_confirmer() -> FaceConfirmer:
    """A process-wide confirmer over the process-wide BlazeFace (weights loaded on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        from faceveil.models.blazeface import default_blazeface

        _DEFAULT = FaceConfirmer(default_blazeface())
    return _DEFAULT
