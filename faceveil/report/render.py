"""Payload -> HTML document, per kind; and the loading and merging of result files for `faceveil report`."""

from __future__ import annotations

import json
from pathlib import Path

from faceveil.errors import FaceveilError
from faceveil.report import KINDS, PHOTO_KINDS
from faceveil.report import html as H

TITLES = {"protect": "Photo protection report", "apply": "Photo protection report (person mask)",
          "verify": "Protection check", "eval": "Evaluation report"}


ORIGINALS_WARNING = ("This report contains the UNPROTECTED photos and close-ups of the unprotected faces "
                     "(--report-originals). Do not share it: anyone with this file can recognise the people in it.")
PROTECTED_ONLY_NOTE = ("This report shows only the protected pictures; the original photos and faces are not in "
                       "this file.")


def render(kind: str, payload: dict, progress: bool = False, *, originals: bool = False) -> str:
    if kind not in KINDS:
        raise FaceveilError(f"unknown report kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(payload, dict):
        raise FaceveilError(f"a {kind} report needs a JSON object, got {type(payload).__name__}")
    footer = ""
    if kind in PHOTO_KINDS:
        from faceveil.report.photos import protect_body

        lede, body = protect_body(payload, progress, originals=originals)
    elif kind == "verify":
        from faceveil.report.photos import verify_body

        lede, body = verify_body(payload, progress, originals=originals)
    else:
        from faceveil.report.evals import eval_body

        lede, body = eval_body(payload)
    if kind in PHOTO_KINDS or kind == "verify":
        if originals:
            body = H.banner("bad", ORIGINALS_WARNING) + body
            footer = ORIGINALS_WARNING
        else:
            footer = PROTECTED_ONLY_NOTE
    return H.page("faceveil", TITLES[kind], lede, body, footer)


def kind_of(doc: dict, source: str) -> str:
    """What a results file is: a photo batch report, a verify document or an eval/bench document."""
    if not isinstance(doc, dict):
        raise FaceveilError(f"{source}: not a faceveil results file (a JSON object is expected)")
    command = str(doc.get("command") or "")
    if command == "verify":
        return "verify"
    if "results" in doc:
        return command if command in PHOTO_KINDS else "protect"
    if "rows" in doc:
        return "eval"
    raise FaceveilError(f"{source}: not a faceveil results file (no 'rows' or 'results'); give the JSON files "
                        "that faceveil's commands write")


def load_document(path: Path) -> dict:
    """One results file: JSON, or JSON lines (the streamed `protect --json X.jsonl`, one item result a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FaceveilError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceveilError(f"{path}: cannot read: {exc}") from None
    try:
        if path.suffix.lower() == ".jsonl":
            doc = {"results": [json.loads(line) for line in text.splitlines() if line.strip()]}
        else:
            doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FaceveilError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(doc, dict):
        doc["_base"] = str(path.resolve().parent)  # relative photo paths are looked up beside the file too
    return doc


def combine(paths: list[Path]) -> tuple[str, dict]:
    """(kind, payload) of several results files of the same kind; evaluation files of any commands merge."""
    docs = [load_document(p) for p in paths]
    kinds = [kind_of(d, str(p)) for d, p in zip(docs, paths, strict=True)]
    distinct = set(kinds)
    if len(distinct) > 1 and not distinct <= set(PHOTO_KINDS):
        listing = ", ".join(f"{p.name} ({k})" for p, k in zip(paths, kinds, strict=True))
        raise FaceveilError(f"cannot mix kinds of results in one report: {listing}; make one report per kind")
    kind = kinds[0]
    return kind, (docs[0] if len(docs) == 1 else {"documents": docs})
