"""What every command module shares: the parser groups they register into, argument types, the flags many commands
have, and how a command prints and writes its results. Each module of faceveil.cli has `register(groups)`; the
groups ("root", "models", "eval", "bench", "train") are made on first use, so `--help` lists the commands in the
order the modules register them (MODULES)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

# The command modules, in the order their commands appear in `faceveil --help` and in each group's help.
MODULES = ("models", "evaluate", "goal", "protect", "verify", "bench", "apf", "person", "serve", "advcloak",
           "robustness", "report", "app")
GROUP_HELP = {
    "models": "the recogniser zoo: fetch, list, check",
    "eval": "evaluation protocols on a dataset",
    "bench": "speed benchmarks that write JSON",
    "train": "train the networks of APF and AdvCloak",
}


class Groups(dict):
    """The top-level sub-parsers ("root") and the command groups of GROUP_HELP, each added under root the first time
    a module asks for it."""

    def __init__(self, root: argparse._SubParsersAction) -> None:
        super().__init__(root=root)

    def __missing__(self, name: str) -> argparse._SubParsersAction:
        group = self["root"].add_parser(name, help=GROUP_HELP[name])
        self[name] = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", title="commands")
        return self[name]


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth saying (not None, not a switch: a switch's
    default is what its help says happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def register_all(groups: Groups) -> None:
    for module in MODULES:
        importlib.import_module(f"faceveil.cli.{module}").register(groups)


# ----------------------------------------------------------------------------------------------- argument types


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line (the command and what is wrong with which flag), exit status 2: the usage summary
    that argparse prints first is what --help is for."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_in(low: float, high: float, *, integer: bool = False, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high] ((low, high] with low_open; whole numbers with integer); the
    error names the range. nan, inf and out-of-range values are refused at parse time."""
    from faceveil.pipeline.presets import Range

    allowed = Range(low, high, integer=integer, low_open=low_open)

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not allowed.contains(value):
            raise argparse.ArgumentTypeError(f"expected {allowed.text()}, got {text!r}")
        return value

    parse.__name__ = "whole number" if integer else "number"  # argparse names the type in some messages
    return parse


def in_range(name: str) -> Callable[[str], float]:
    """argparse type of one of protect's settings (faceveil.pipeline.presets.PROTECT_RANGES)."""
    from faceveil.pipeline.presets import PROTECT_RANGES

    r = PROTECT_RANGES[name]
    return number_in(r.low, r.high, integer=r.integer, low_open=r.low_open)


positive_int = number_in(1, 2**31 - 1, integer=True)  # a count: at least 1
count_or_zero = number_in(0, 2**31 - 1, integer=True)  # a count that may be 0 (e.g. off)
seed_value = number_in(0, 2**32 - 1, integer=True)
finite_float = number_in(-1e12, 1e12)  # any ordinary number, never nan or inf
non_negative = number_in(0, 1e12)
positive = number_in(0, 1e12, low_open=True)
fraction = number_in(0, 1)
dropout_rate = number_in(0, 0.99)
ssim_target = number_in(0, 0.999)  # a visibility budget's face-area SSIM (0 = off)


def dropout_choice(text: str) -> float | str:
    """argparse type: a DFANet dropout rate in [0, 0.99], or "calibrated" (each surrogate at its own rate)."""
    if text.strip().lower() == "calibrated":
        return "calibrated"
    return dropout_rate(text)


port_number = number_in(0, 65535, integer=True)


def smoothing_size(text: str) -> int:
    """argparse type: a TI kernel size, 0 (off) or an odd whole number up to 63."""
    if not text.strip().isdigit() or (int(text) > 0 and int(text) % 2 == 0) or int(text) > 63:
        raise argparse.ArgumentTypeError(f"expected 0 or an odd whole number in [1, 63], got {text!r}")
    return int(text)


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def dataset_root(text: str):
    """--dataset lfw=PATH -> the LFW folder (checked)."""
    from faceveil.datasets.lfw import lfw_root
    from faceveil.errors import FaceveilError

    name, _, value = text.partition("=")
    if name != "lfw" or not value:
        raise FaceveilError(f"--dataset takes lfw=PATH, got {text!r}")
    return lfw_root(value)


class LazyHelp(str):
    """A help text written only when help is shown (argparse expands every help with `%`): for a help that lists
    what a heavy module holds, so that building the parser stays fast."""

    def __new__(cls, write: Callable[[], str]) -> LazyHelp:
        text = super().__new__(cls, "(listed with --help)")
        text.write = write
        return text

    def __mod__(self, params: object) -> str:
        return self.write().replace("%", "%%") % params


def add_report_flag(parser: argparse.ArgumentParser, photos: bool = False) -> None:
    parser.add_argument("--report", metavar="HTML",
                        help="also write a self-contained HTML report (pictures and plots inside the file)" +
                             ("; it shows only the protected pictures unless --report-originals" if photos else ""))
    if photos:
        add_report_originals_flag(parser)


def add_report_originals_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-originals", action="store_true",
                        help="the HTML report also shows the unprotected photos and face close-ups (the file then "
                             "says so at the top: do not share it)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """What a photo command does with outputs that exist, and with a video's sound."""
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_const", const="overwrite", dest="existing",
                          default="refuse", help="replace output files that exist already (default: such a file is "
                                                 "never touched and its input is reported as an error)")
    existing.add_argument("--skip-existing", action="store_const", const="skip", dest="existing",
                          help="skip inputs whose output exists already (resume an interrupted batch)")
    parser.add_argument("--drop-audio", action="store_true",
                        help="videos: write no sound track (kept by default; voices identify people too)")


def as_flags(message: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """A library error names parameters in backticks (`train_images`); the user of a command typed flags: each
    parameter that is an option of the command run is named as that option (--train-images)."""
    command = _command_parser(parser, args)
    flags = {a.dest: a.option_strings[-1] for a in command._actions if a.option_strings}
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)command that `args` ran, e.g. that of `eval identification`."""
    while True:
        group = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if group is None or getattr(args, group.dest, None) is None:
            return parser
        parser = group.choices[getattr(args, group.dest)]


# ----------------------------------------------------------------------------------------------- facts of the run


def threads() -> int:
    """torch's thread count (imported here, when a command runs: building the parser imports no torch)."""
    import torch

    return torch.get_num_threads()


def load_average() -> float:
    """The 1-minute load average: other work on the machine inflates timings."""
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------------------- output


def emit(command: str, settings: dict, rows: list[dict], json_out: str | Path | None,
         report: str | Path | None = None) -> dict:
    """Print the markdown table and write the JSON document and the HTML report (if asked). Returns the document."""
    from faceveil.io.results import markdown_table

    doc = {"command": command, "settings": settings, "rows": rows}
    print(markdown_table(rows))
    return write_outputs(doc, json_out, report)


def write_outputs(doc: dict, json_out: str | Path | None, report: str | Path | None, kind: str = "eval",
                  originals: bool = False) -> dict:
    """Write a command's document as JSON and as an HTML report of that kind, each only if asked (a photo report
    shows the original photos only with originals)."""
    if json_out:
        from faceveil.io.results import write_json_atomic

        write_json_atomic(json_out, doc)
    if report:
        from faceveil.report import write_report

        write_report(report, kind, doc, originals=originals)
    return doc


# Exit status of a photo job (protect, demo, apply): 0 every file written and no written face still recognised by a
# judge; 3 every file written but some face is still recognised by at least one judge (the verdict says which);
# 2 a file failed or the report could not be written; 130 / 143 interrupted (SIGINT / SIGTERM).
EXIT_STILL_RECOGNISED = 3


def finish_batch(report, kind: str, args: argparse.Namespace, stream=None) -> int:
    """After a photo job: the summary line (what was written, how many faces each verdict; named after the command
    run), the HTML report if asked (also after Ctrl-C: the photos done so far), and the exit status (see
    EXIT_STILL_RECOGNISED)."""
    if getattr(args, "report", None):
        from faceveil.report import write_report

        write_report(args.report, kind, report.to_dict(), progress=not args.quiet,
                     originals=getattr(args, "report_originals", False), max_mode=report.max_mode)
    print_conversions(report, table_stream(args))
    print(f"faceveil {getattr(args, 'command', None) or kind}: {report.tally.line()}", file=stream or sys.stdout)
    if report.report_error:
        from faceveil.pipeline.batch import printable

        print(f"faceveil: error: {printable(report.report_error)}", file=sys.stderr)
    if report.interrupted:
        print(f"faceveil: interrupted ({report.signal}): {report.summary()}", file=sys.stderr)
        return 143 if report.signal == "SIGTERM" else 130
    if any(r.status == "error" for r in report.results) or report.report_error:
        return 2
    return EXIT_STILL_RECOGNISED if report.still_recognised else 0


def print_conversions(report, stream) -> None:
    """One line per file written in another format than its input's (gif -> png, mov -> mp4, --format), on the
    table's stream (stderr under --json -, so that stdout stays the JSON document)."""
    from faceveil.pipeline.batch import printable

    for result in report.results:
        if getattr(result, "converted", None) and result.output:
            print(f"converted: {printable(Path(result.file).name)} -> {printable(Path(result.output).name)} "
                  f"({result.converted})", file=stream)


def check_report_targets(args: argparse.Namespace) -> None:
    """Before any work: --json and --report must name files that may be written (never a symbolic link to a file,
    never a folder; a stream such as /dev/stdout is written through, - is stdout)."""
    from faceveil.io.atomic import check_target

    for target in (getattr(args, "json", None), getattr(args, "report", None)):
        if target and target != "-":
            check_target(Path(target))


def table_stream(args: argparse.Namespace):
    """Where a photo command prints its table: stderr when the JSON report goes to stdout (--json -)."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def print_judge_table(results, judges: list[str], only=None, stream=None) -> None:
    """Before/after: per face, each judge's similarity original -> protected ('*' = still recognised) and the
    face's verdict in words; per file, its status ('written' for ok) and, with several faces, the photo's verdict.
    `only`: a test of the face rows to print (apply prints its masked faces)."""
    from faceveil.models import zoo
    from faceveil.pipeline.batch import printable
    from faceveil.pipeline.results import face_rows, photo_verdict

    lines = ["| file | face | status | " + " | ".join(judges) + " | verdict |", "|" + "---|" * (4 + len(judges))]
    for r in results:
        name, status = printable(Path(r.file).name), "written" if r.status == "ok" else r.status
        faces = [f for f in face_rows(r.details) if only is None or only(f)]
        if len(faces) != 1:  # the photo's own line: how many of its faces are protected, or why none was
            said = photo_verdict(faces, detail=False)[1] if faces else r.verdict or r.message
            lines.append(f"| {name} | | {status} |" + " |" * len(judges) + f" {printable(said)} |")
        for face in faces:
            cells = []
            for j in judges:
                v = face.get(j)
                cells.append(f"{v['score']:.3f}{'*' if v['matches'] else ''}" if v else "")
            lines.append(f"| {name} | {face.get('face', '')} | {status} | " + " | ".join(cells)
                         + f" | {face.get('verdict', '')} |")
        for other in (r.details or {}).get("not_faces", []) if only is None else []:  # refused: left alone
            lines.append(f"| {name} | - | {other['reason']} |" + " |" * (len(judges) + 1))
    out = stream or sys.stdout
    print("\n".join(lines), file=out)
    thresholds = ", ".join(f"{j} {zoo.threshold(j):.3f}" for j in judges)
    print("score = similarity original -> protected (cosine; -L2 for dlib: nearer 0 = more alike); "
          f"* = at or above the model's threshold, the model still recognises the face. Thresholds: {thresholds}",
          file=out)
