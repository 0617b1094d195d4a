"""The batch runner behind every command: expand inputs, process each item, report as it goes.

One bad file never stops the rest: any exception from the callback becomes an 'error' result with a one-line
message. Results stream to a report file as each item finishes (.jsonl: one JSON object a line, appended;
.json: the whole report, rewritten atomically; "-": the whole report on stdout at the end); a callback that
finishes later items early (photos optimised together) hands them over through `take_finished`, so that every
written photo has its row as soon as it is written. A report file that cannot be written (a full disk) is
warned about once and never stops the batch. Ctrl-C or SIGTERM (docker stop, systemd) stops the run, removes
half-written outputs (the atomic writers' temp files) and returns the partial report with interrupted=True.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.paths import IMAGE_EXTS, VIDEO_EXTS, is_video_path, output_path_for, safe_resolve
from faceveil.pipeline.results import FaceTally, face_rows, photo_verdict, with_verdict

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
    output: Path | None = None  # where its output goes, relative to the output folder (set by a plan)
    note: str = ""  # what the report says about its output (e.g. renamed: another input has the same name)

    def output_path(self, out_dir: Path | str, fmt: str = "same") -> Path:
        """Where this item's output goes: the planned name, else the same name under out_dir, sub-folders below
        root kept."""
        if self.output is not None:
            return Path(out_dir) / self.output
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
    # a written file's verdict ("ok" only says it was written): protected = no checked face is recognised by any
    # judge (None: nothing checked), verdict = the same in plain words (results.photo_verdict)
    protected: bool | None = None
    verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchReport:
    results: list[ItemResult] = field(default_factory=list)
    interrupted: bool = False
    not_done: list[str] = field(default_factory=list)  # items never finished (after an interrupt)
    report_path: Path | None = None
    header: dict[str, Any] = field(default_factory=dict)  # what ran, e.g. {"command", "settings"}: first in JSON
    signal: str | None = None  # SIGINT or SIGTERM when interrupted
    report_error: str | None = None  # the report file could not be written (e.g. a full disk)
    max_mode: int | None = None  # permission bits the report files may have at most (those of the inputs)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(result.status for result in self.results)
        return {status: counted.get(status, 0) for status in STATUSES}

    @property
    def failed(self) -> bool:
        return self.interrupted or self.counts["error"] > 0 or self.report_error is not None

    @property
    def tally(self) -> FaceTally:
        """The written files' faces by verdict (the summary line at the end of a batch)."""
        tally = FaceTally()
        for result in self.results:
            if result.status == "ok":
                tally.add(face_rows(result.details), video="frames" in (result.details or {}))
        return tally

    @property
    def still_recognised(self) -> bool:
        """Some written face is still recognised by at least one judge."""
        return self.tally.recognised > 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        tail = f"; interrupted, {len(self.not_done)} not done" if self.interrupted else ""
        return f"{len(self.results)} file(s): {counts or 'nothing done'}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header,
            "results": [result.to_dict() for result in self.results],
            "summary": self.counts, "verdict": self.tally.to_dict(), "interrupted": self.interrupted,
            "not_done": self.not_done,
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
    excluded = safe_resolve(exclude) if exclude is not None else None
    items: list[BatchItem] = []
    seen: set[Path] = set()
    for raw in inputs:
        for item in _expand_one(Path(raw), recursive, kinds):
            resolved = safe_resolve(item.path)  # a link loop is kept as an item: it fails alone, in its turn
            if resolved in seen or (excluded is not None and resolved.is_relative_to(excluded)):
                continue
            seen.add(resolved)
            items.append(item)
    if not items:
        names = ", ".join(str(raw) for raw in inputs) or "(no inputs)"
        raise FaceveilError(f"no images or videos found in {names}")
    return items


def _expand_one(path: Path, recursive: bool, kinds: frozenset[str]) -> list[BatchItem]:
    if path.is_file() or (path.is_symlink() and not path.exists()):  # a broken link or a loop: its own error row
        return [BatchItem(path, None, "video" if is_video_path(path) else "image")]
    if not path.is_dir():
        raise FaceveilError(f"{path}: no such file or folder")
    exts = frozenset().union(*(_KIND_EXTS[kind] for kind in kinds))
    files = _walk(path) if recursive else sorted(p for p in path.iterdir() if p.is_file() or p.is_symlink())
    return [
        BatchItem(f, path, "video" if is_video_path(f) else "image")
        for f in files
        if f.suffix.lower() in exts and not f.name.startswith(".")
    ]


def _walk(top: Path) -> list[Path]:
    """Every file below top; linked folders are not followed (no loops), linked files are listed."""
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
    max_mode: int | None = None,
) -> BatchReport:
    """Run `process` on every item and return the report (partial, interrupted=True, after Ctrl-C or SIGTERM).
    `header` (e.g. the command and its settings) heads the JSON report, so that it says how its files were made;
    max_mode caps the report file's permission bits.

    process(item) returns None (status 'ok') or a mapping with any of: status ('ok' | 'no_face' | 'skipped'),
    message, faces, output, details, converted, seconds. A process with `set_progress(advance)` is given a function
    to call with its work in progress in items' worth (the bar moves per optimisation step or video frame; None at
    the end). Exceptions are caught per item: SkipItem -> 'skipped', any other -> 'error'. A process with a
    `take_finished()` method hands over (path, outcome) pairs of later items it has already finished.
    """
    items = list(items)
    by_path = {item.path: item for item in items}
    report = BatchReport(report_path=Path(report_path) if report_path is not None else None, header=header or {},
                         max_mode=max_mode)
    writer = _ReportWriter(report)
    done: set[Path] = set()

    def record(result: ItemResult) -> None:
        done.add(Path(result.file))
        report.results.append(result)
        writer.add(result, report)
        _announce(result, quiet, on_result)

    def record_finished() -> None:
        for path, outcome in _take_finished(process):
            if path in by_path and path not in done:
                record(_outcome_result(by_path[path], outcome))

    # the bar counts files, and moves within a file as the job reports its steps (optimisation steps, video frames)
    bar = tqdm(total=len(items), desc=desc, unit="file", file=sys.stderr, disable=quiet or not _is_tty(sys.stderr),
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def advance(worth: float) -> None:
        """The job's work in progress, in files' worth, on top of the files done."""
        if not bar.disable:
            bar.n = round(min(len(done) + worth, len(items)), 3)
            bar.refresh()

    listen = getattr(process, "set_progress", None)
    if listen is not None:
        listen(advance)
    with _interrupts() as caught:
        try:
            for item in items:
                if item.path in done:
                    continue
                record(_run_one(item, process))
                record_finished()
                bar.set_postfix({"files": f"{len(done)}/{len(items)}", **report.counts}, refresh=False)
                advance(0.0)
                if caught.signal is not None:  # an interrupt that something below swallowed
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            report.interrupted = True
            report.signal = caught.signal or "SIGINT"
            atomic.remove_live_temp_files()
            record_finished()  # photos written before the interrupt keep their rows
            report.not_done = [str(item.path) for item in items if item.path not in done]
        finally:
            if listen is not None:
                listen(None)
            bar.close()
            writer.finish(report)
    return report


def _take_finished(process: Process) -> list[tuple[Path, Outcome | BaseException]]:
    take = getattr(process, "take_finished", None)
    return list(take()) if take is not None else []


def _outcome_result(item: BatchItem, outcome: Outcome | BaseException) -> ItemResult:
    """A report row for an outcome (or exception) that a process finished ahead of the run."""

    def raise_or_return(_: BatchItem) -> Outcome:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return _run_one(item, raise_or_return)


class _Caught:
    signal: str | None = None


@contextlib.contextmanager
def _interrupts() -> Iterator[_Caught]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while the batch runs, and are remembered: an interrupt that a
    library swallows (e.g. during a compile) still stops the run at the next item."""
    caught = _Caught()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        caught.signal = signal.Signals(signum).name
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_one(item: BatchItem, process: Process) -> ItemResult:
    """The item's row; its seconds are the wall time of the call, or the outcome's own `seconds` (a job that works
    on several items at once books each its share, so that the rows add up to the batch)."""
    start = time.perf_counter()
    given = None
    try:
        outcome = process(item)
        given = (outcome or {}).get("seconds")
        result = _result_from(item, outcome)
    except SkipItem as exc:
        result = ItemResult(str(item.path), "skipped", _one_line(exc, with_type=False))
    except FaceveilError as exc:
        result = ItemResult(str(item.path), "error", _one_line(exc, with_type=False))
    except Exception as exc:  # one bad file never stops the rest
        result = ItemResult(str(item.path), "error", _one_line(exc, with_type=True))
    result.seconds = round(float(given) if given is not None else time.perf_counter() - start, 3)
    if item.note:
        result.message = "; ".join(m for m in (item.note, result.message) if m)
    return result


def _result_from(item: BatchItem, outcome: Outcome) -> ItemResult:
    outcome = dict(outcome or {})
    status = str(outcome.get("status", "ok"))
    if status not in STATUSES:
        return ItemResult(str(item.path), "error", f"callback returned unknown status {status!r}")
    output = outcome.get("output")
    details = outcome.get("details")
    result = ItemResult(
        file=str(item.path), status=status, message=str(outcome.get("message", "")),
        faces=int(outcome.get("faces", 0) or 0), output=str(output) if output is not None else None,
        details=details, converted=outcome.get("converted"),
    )
    if status == "ok":
        rows = face_rows(details)
        if rows:  # every face row gets its verdict, whichever job made it
            details = result.details = {**details, "faces": [{**with_verdict(row), **row} for row in rows]}
        result.protected, result.verdict = photo_verdict(face_rows(details))
        if not rows and "frames" in (details or {}):
            result.verdict = "written; the faces of a video are not checked by the models"
    return result


def _one_line(exc: BaseException, *, with_type: bool) -> str:
    text = " ".join(str(exc).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _announce(result: ItemResult, quiet: bool, on_result: Callable[[ItemResult], None] | None) -> None:
    if on_result is not None:
        on_result(result)
    if result.status == "error" and not quiet:  # a message that names the file already is printed as it is
        line = result.message if result.message.startswith(result.file) else f"{result.file}: {result.message}"
        tqdm.write(f"faceveil: {printable(line)}", file=sys.stderr)


def printable(text: str) -> str:
    """Text that any terminal or UTF-8 file takes: a file name that is not UTF-8 (its bytes kept by Python as
    surrogates) gets a replacement character instead of crashing the print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _ReportWriter:
    """Streams results: .jsonl gets a line per item (flushed); other names get the whole report rewritten; "-" gets
    the whole report on stdout at the end. A write that fails (a full disk, a vanished folder) is warned about once
    and tried again at the next item and at the end; the batch itself goes on."""

    def __init__(self, report: BatchReport) -> None:
        path = self.path = report.report_path
        self.stdout = path is not None and str(path) == "-"
        self.lines = path is not None and not self.stdout and path.suffix.lower() == ".jsonl"
        # a whole-report JSON into a stream (a pipe, /dev/stdout) is written once, at the end
        self.at_end = self.stdout or (path is not None and not self.lines and atomic.is_stream(path))
        self.max_mode = report.max_mode
        self._handle: IO[str] | None = None
        self._pending: list[ItemResult] = []  # .jsonl rows not written yet (after a failed write)
        self._warned = False
        if path is None or self.stdout:
            return
        atomic.check_target(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FaceveilError(f"cannot write the report {path}: {exc.strerror or exc}") from exc
        if self.lines:
            self._open_lines(report)
        elif not self.at_end:
            self._write_json(report, strict=True)  # the start must succeed; a failure later is only a warning

    def _open_lines(self, report: BatchReport) -> None:
        assert self.path is not None
        try:
            stream = atomic.is_stream(self.path)
            self._handle = open(self.path, "w", encoding="utf-8")  # closed in finish()
            if not stream and self.max_mode is not None:
                os.chmod(self.path, os.stat(self.path).st_mode & 0o777 & self.max_mode)
        except OSError as exc:
            raise FaceveilError(f"cannot write the report {self.path}: {exc.strerror or exc}") from exc

    def add(self, result: ItemResult, report: BatchReport) -> None:
        if self._handle is not None:
            self._pending.append(result)
            self._flush_lines(report)
        elif self.path is not None and not self.at_end:
            self._write_json(report)

    def finish(self, report: BatchReport) -> None:
        if self._handle is not None:
            self._flush_lines(report)
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        elif self.stdout:
            sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
            sys.stdout.flush()
        elif self.path is not None:
            self._write_json(report)

    def _flush_lines(self, report: BatchReport) -> None:
        assert self._handle is not None
        try:
            text = "".join(json.dumps(r.to_dict()) + "\n" for r in self._pending)
            self._handle.write(text)
            self._handle.flush()
        except OSError as exc:
            self._failed(report, exc)
            return
        self._pending.clear()
        report.report_error = None

    def _write_json(self, report: BatchReport, strict: bool = False) -> None:
        assert self.path is not None
        try:
            with atomic.atomic_path(self.path, max_mode=self.max_mode) as temp:
                temp.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        except (OSError, FaceveilError) as exc:
            if strict:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise FaceveilError(f"cannot write the report {self.path}: {reason}") from None
            self._failed(report, exc)
            return
        report.report_error = None

    def _failed(self, report: BatchReport, exc: BaseException) -> None:
        reason = getattr(exc, "strerror", None) or str(exc)
        report.report_error = f"cannot write the report {self.path}: {reason}"
        if not self._warned:
            self._warned = True
            tqdm.write(f"faceveil: warning: {printable(report.report_error)}; the batch goes on and the report is "
                       "tried again after each file", file=sys.stderr)
