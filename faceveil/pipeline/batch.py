"""The batch runner behind every command: expand inputs, process each item, report as it goes.

One bad file never stops the rest: any exception from the callback becomes an 'error' result with a one-line
message. Results stream to a report file as each item finishes (.jsonl: one JSON object a line, appended;
.json: the whole report, rewritten atomically). Ctrl-C stops the run, removes half-written outputs (the atomic
writers' temp files) and returns the partial report with interrupted=True.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.paths import IMAGE_EXTS, VIDEO_EXTS, is_video_path, output_path_for

__all__ = [
    "STATUSES", "BatchItem", "BatchReport", "ItemResult", "SkipItem", "expand_inputs", "run_batch",
]

STATUSES = ("ok", "no_face", "error", "skipped")
_MAX_MESSAGE = 300
_KIND_EXTS = {"image": IMAGE_EXTS, "video": VIDEO_EXTS}


class SkipItem(FaceveilError):
    """Raise from a callback to record the item as 'skipped' with this message."""


@dataclass(frozen=True)
class BatchItem:
    """One input file; root is the folder it was found in (None for a file named on the command line)."""

    path: Path
    root: Path | None = None
    kind: str = "image"  # "image" | "video"

    def output_path(self, out_dir: Path | str, fmt: str = "same") -> Path:
        """Where this item's output goes: same name under out_dir, sub-folders below root kept."""
        return output_path_for(self.path, out_dir, fmt, relative_to=self.root)


@dataclass
class ItemResult:
    """What happened to one item; `to_dict` is the report record."""

    file: str
    status: str
    message: str = ""
    faces: int = 0
    seconds: float = 0.0
    output: str | None = None
    details: dict[str, Any] | None = None  # per-face figures from the command (similarities, timings, ...)
    converted: str | None = None  # the output's type differs from the input's: "gif -> png: why"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchReport:
    results: list[ItemResult] = field(default_factory=list)
    interrupted: bool = False
    not_done: list[str] = field(default_factory=list)  # items never finished (after an interrupt)
    report_path: Path | None = None
    header: dict[str, Any] = field(default_factory=dict)  # what ran, e.g. {"command", "settings"}: first in JSON

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(result.status for result in self.results)
        return {status: counted.get(status, 0) for status in STATUSES}

    @property
    def failed(self) -> bool:
        return self.interrupted or self.counts["error"] > 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        tail = f"; interrupted, {len(self.not_done)} not done" if self.interrupted else ""
        return f"{len(self.results)} file(s): {counts or 'nothing done'}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header,
            "results": [result.to_dict() for result in self.results],
            "summary": self.counts, "interrupted": self.interrupted, "not_done": self.not_done,
        }


# ------------------------------------------------------------------------------------------------- inputs


def expand_inputs(
    inputs: Iterable[Path | str],
    *,
    recursive: bool = False,
    kinds: Iterable[str] = ("image", "video"),
    exclude: Path | str | None = None,
) -> list[BatchItem]:
    """Files as given, folders expanded to their image/video files (sorted; hidden files skipped).

    exclude: a folder (usually the output folder) whose files are never taken as inputs.
    """
    kinds = frozenset(kinds)
    if not kinds <= _KIND_EXTS.keys():
        raise ValueError(f"kinds must be among {sorted(_KIND_EXTS)}, got {sorted(kinds)}")
    excluded = Path(exclude).resolve() if exclude is not None else None
    items: list[BatchItem] = []
    seen: set[Path] = set()
    for raw in inputs:
        for item in _expand_one(Path(raw), recursive, kinds):
            resolved = item.path.resolve()
            if resolved in seen or (excluded is not None and resolved.is_relative_to(excluded)):
                continue
            seen.add(resolved)
            items.append(item)
    if not items:
        names = ", ".join(str(raw) for raw in inputs) or "(no inputs)"
        raise FaceveilError(f"no images or videos found in {names}")
    return items


def _expand_one(path: Path, recursive: bool, kinds: frozenset[str]) -> list[BatchItem]:
    if path.is_file():
        return [BatchItem(path, None, "video" if is_video_path(path) else "image")]
    if not path.is_dir():
        raise FaceveilError(f"{path}: no such file or folder")
    exts = frozenset().union(*(_KIND_EXTS[kind] for kind in kinds))
    files = _walk(path) if recursive else sorted(p for p in path.iterdir() if p.is_file())
    return [
        BatchItem(f, path, "video" if is_video_path(f) else "image")
        for f in files
        if f.suffix.lower() in exts and not f.name.startswith(".")
    ]


def _walk(top: Path) -> list[Path]:
    found: list[Path] = []
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / name for name in sorted(files))
    return found


# ------------------------------------------------------------------------------------------------- running

Outcome = Mapping[str, Any] | None
Process = Callable[[BatchItem], Outcome]


def run_batch(
    items: Iterable[BatchItem],
    process: Process,
    *,
    report_path: Path | str | None = None,
    quiet: bool = False,
    desc: str = "faceveil",
    on_result: Callable[[ItemResult], None] | None = None,
    header: dict[str, Any] | None = None,
) -> BatchReport:
    """Run `process` on every item and return the report (partial, interrupted=True, after Ctrl-C). `header`
    (e.g. the command and its settings) heads the JSON report, so that it says how its files were made.

    process(item) returns None (status 'ok') or a mapping with any of: status ('ok' | 'no_face' | 'skipped'),
    message, faces, output, details, converted. Exceptions are caught per item: SkipItem -> 'skipped', any other
    -> 'error'.
    """
    items = list(items)
    report = BatchReport(report_path=Path(report_path) if report_path is not None else None, header=header or {})
    writer = _ReportWriter(report)
    bar = tqdm(items, desc=desc, unit="file", file=sys.stderr, disable=quiet or not _is_tty(sys.stderr))
    try:
        for item in bar:
            result = _run_one(item, process)
            report.results.append(result)
            writer.add(result, report)
            _announce(result, quiet, on_result)
            bar.set_postfix(report.counts, refresh=False)
    except KeyboardInterrupt:
        report.interrupted = True
        atomic.remove_live_temp_files()
        report.not_done = [str(item.path) for item in items[len(report.results):]]
    finally:
        bar.close()
        writer.finish(report)
    return report


def _run_one(item: BatchItem, process: Process) -> ItemResult:
    start = time.perf_counter()
    try:
        result = _result_from(item, process(item))
    except SkipItem as exc:
        result = ItemResult(str(item.path), "skipped", _one_line(exc, with_type=False))
    except FaceveilError as exc:
        result = ItemResult(str(item.path), "error", _one_line(exc, with_type=False))
    except Exception as exc:  # one bad file never stops the rest
        result = ItemResult(str(item.path), "error", _one_line(exc, with_type=True))
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _result_from(item: BatchItem, outcome: Outcome) -> ItemResult:
    outcome = dict(outcome or {})
    status = str(outcome.get("status", "ok"))
    if status not in STATUSES:
        return ItemResult(str(item.path), "error", f"callback returned unknown status {status!r}")
    output = outcome.get("output")
    return ItemResult(
        file=str(item.path), status=status, message=str(outcome.get("message", "")),
        faces=int(outcome.get("faces", 0) or 0), output=str(output) if output is not None else None,
        details=outcome.get("details"), converted=outcome.get("converted"),
    )


def _one_line(exc: BaseException, *, with_type: bool) -> str:
    text = " ".join(str(exc).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _announce(result: ItemResult, quiet: bool, on_result: Callable[[ItemResult], None] | None) -> None:
    if on_result is not None:
        on_result(result)
    if result.status == "error" and not quiet:
        tqdm.write(f"faceveil: {result.file}: {result.message}", file=sys.stderr)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _ReportWriter:
    """Streams results: .jsonl gets a line per item (flushed); other names get the whole report rewritten."""

    def __init__(self, report: BatchReport) -> None:
        path = self.path = report.report_path
        self.lines = path is not None and path.suffix.lower() == ".jsonl"
        self._handle: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.lines:
                self._handle = open(path, "w", encoding="utf-8")  # closed in finish()
            else:
                self._write_json(report)

    def add(self, result: ItemResult, report: BatchReport) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(result.to_dict()) + "\n")
            self._handle.flush()
        elif self.path is not None:
            self._write_json(report)

    def finish(self, report: BatchReport) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self.path is not None:
            self._write_json(report)

    def _write_json(self, report: BatchReport) -> None:
        assert self.path is not None
        with atomic.atomic_path(self.path) as temp:
            temp.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
