"""Shared skip conditions: weights (fetched by ./setup.sh) and LFW (../shared/datasets/lfw or $FACEVEIL_LFW)."""

from __future__ import annotations

import pytest

from faceveil.datasets.lfw import default_lfw_root
from faceveil.io import weights

WEIGHTS_READY = all(r["present"] for r in weights.file_status())
needs_weights = pytest.mark.skipif(
    not WEIGHTS_READY, reason=f"weights missing under {weights.home()}: run ./setup.sh or `faceveil models fetch`"
)
LFW_ROOT = default_lfw_root()
# exit statuses of a photo job whose files were all written: 0, or 3 when a face is still recognised by some judge
WRITTEN = (0, 3)
needs_lfw = pytest.mark.skipif(
    LFW_ROOT is None, reason="LFW not found: set FACEVEIL_LFW or place it at ../shared/datasets/lfw beside the repo"
)
