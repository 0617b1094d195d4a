"""faceveil: offline adversarial identity masks (TIP-IM, OPOM, APF, AdvCloak) over a verified recogniser zoo.

The public API (faceveil.api) is loaded on first use, so `import faceveil` imports no torch and changes nothing:

    import faceveil
    faceveil.protect("me.jpg").save("me-protected.jpg")
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("faceveil")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_API = ("protect", "protect_files", "Protector", "enroll", "apply", "apply_files", "verify", "ImageResult",
        "sample_photos", "detect_faces", "DetectedFace", "load_pixels", "video_info")
_SUBPACKAGES = ("methods", "models")

__all__ = [*_API, "PersonMask", *_SUBPACKAGES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("faceveil.api"), name)
    if name == "PersonMask":
        return importlib.import_module("faceveil.pipeline.maskfile").PersonMask
    if name in _SUBPACKAGES:
        return importlib.import_module(f"faceveil.{name}")
    raise AttributeError(f"module 'faceveil' has no attribute {name!r}")
