"""Machine-readable results, the same for every `eval` and `bench` command: the document
{"command": ..., "settings": {...}, "rows": [{...}, ...]} written as JSON, and the same rows as a markdown table.
Pure functions: the command line (faceveil.cli.common.emit) prints and writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faceveil.io.atomic import atomic_path

# Rates are fractions in [0, 1]; these keys are printed with 4 decimals, times with 2.
_RATE_KEYS = {"accuracy", "rank1_t", "rank5_t", "rank1_ut", "rank5_ut", "top1_psr", "top5_psr", "asr", "ssim",
              "threshold", "mmd", "retained", "fraction", "cosine_mean", "cosine_min", "clean_rank1",
              "clean_top1", "clean_top5", "mm_top1_psr", "mm_top5_psr", "top1_psr_std", "top5_psr_std",
              "mm_top1_psr_std", "mm_top5_psr_std"}


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"  # tiny figures (converter differences) keep their magnitude
        return f"{value:.4f}" if key in _RATE_KEYS else f"{value:.2f}"
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    if isinstance(value, dict):  # e.g. a bench row's seconds per stage: small parts of a whole, 3 decimals
        return " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {_cell(k, v)}" for k, v in value.items())
    return "" if value is None else str(value)


format_cell = _cell  # the public name, for other renderers of the same rows (the HTML report)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp, open(temp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
