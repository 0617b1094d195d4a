"""`--report FILE` and `faceveil report`: one self-contained HTML file (inline CSS, images and plots embedded as
data URIs, no scripts, no external requests) that people would rather look at than read.

Kinds:
- "protect" / "apply": payload = a batch report ({"results": [ItemResult dicts], ...}) with optional "command" and
  "settings" (see `batch_header`); per photo before/after, the amplified change, per face the judges' bars.
- "verify": payload = the `faceveil verify --json` document; the same plus the gallery rank and the transforms.
- "eval": payload = an `emit` document {"command", "settings", "rows"}; tables and plots.
Any payload may instead be {"documents": [doc, ...]} to put several runs of the same kind in one report.

How a command gets `--report` (in faceveil.cli.common): `add_report_flag(parser)` where its flags are defined, then
- an eval/bench command: `emit(command, settings, rows, args.json, report=args.report)`;
- a photo command: `run_batch(..., header=batch_header("apply", settings))`, then `finish_batch(report, "apply",
  args)`, which calls `write_report(args.report, "apply", report.to_dict())`.
Heavy imports (matplotlib, the image code) happen only when a report is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

KINDS = ("protect", "apply", "verify", "eval")
PHOTO_KINDS = ("protect", "apply")


def settings_dict(settings: Any) -> dict:
    """A settings dataclass (ProtectSettings, nested AttackConfig) as a JSON-ready dict."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(settings or {}).items()}


def batch_header(command: str, settings: Any) -> dict:
    """What heads a photo batch's report (run_batch's `header`): the command and its settings."""
    return {"command": command, "settings": settings_dict(settings)}


def write_report(path: str | Path, kind: str, payload: dict, progress: bool = False, *, originals: bool = False,
                 max_mode: int | None = None) -> Path:
    """Render the payload as one HTML file, written atomically. Returns the path.

    A photo report is meant to be shared: it shows only the protected pictures unless originals=True, and then says
    at its top that it holds the unprotected faces. max_mode caps the file's permission bits (a report is never
    more readable than the photos it shows)."""
    from faceveil.io.atomic import atomic_path, check_target
    from faceveil.report.render import render

    path = Path(path)
    check_target(path)
    html = render(kind, payload, progress, originals=originals)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, max_mode=max_mode) as temp:
        temp.write_text(html, encoding="utf-8", errors="replace")
    return path
