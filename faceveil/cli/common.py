"""What every command module shares: the parser groups they register into, argument types, the flags many commands
have, and how a command prints and writes its results. Each module of faceveil.cli has `register(groups)`; the
groups ("root", "models", "eval", "bench", "train") are made on first use, so `--help` lists the commands in the
order the modules register them (MODULES)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path

# The command modules, in the order their commands appear in `faceveil --help` and in each group's help.
MODULES = ("models", "evaluate", "protect", "verify", "bench", "apf", "person", "serve", "advcloak", "robustness",
           "report")
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
        self[name] = group.add_subparsers(dest=f"{name}_command", required=True)
        return self[name]


def register_all(groups: Groups) -> None:
    for module in MODULES:
        importlib.import_module(f"faceveil.cli.{module}").register(groups)


# ----------------------------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def smoothing_size(text: str) -> int:
    """argparse type: a TI kernel size, 0 (off) or an odd whole number."""
    if not text.strip().isdigit() or (int(text) > 0 and int(text) % 2 == 0):
        raise argparse.ArgumentTypeError(f"expected 0 or an odd whole number, got {text!r}")
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


def add_report_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="HTML",
                        help="also write a self-contained HTML report (pictures and plots inside the file)")


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


def write_outputs(doc: dict, json_out: str | Path | None, report: str | Path | None, kind: str = "eval") -> dict:
    """Write a command's document as JSON and as an HTML report of that kind, each only if asked."""
    if json_out:
        from faceveil.io.results import write_json_atomic

        write_json_atomic(json_out, doc)
    if report:
        from faceveil.report import write_report

        write_report(report, kind, doc)
    return doc


def finish_batch(report, kind: str, args: argparse.Namespace) -> int:
    """After a photo job: the HTML report if asked (also after Ctrl-C: the photos done so far), and the exit status
    (130 interrupted, 2 when a file failed, else 0)."""
    if getattr(args, "report", None):
        from faceveil.report import write_report

        write_report(args.report, kind, report.to_dict(), progress=not args.quiet)
    if report.interrupted:
        return 130
    return 2 if any(r.status == "error" for r in report.results) else 0


def print_judge_table(results, judges: list[str], only=None) -> None:
    """Before/after: per face, each judge's similarity original -> protected; '*' = still recognised. `only`: a
    test of the face rows to print (apply prints its masked faces)."""
    lines = ["| file | face | status | " + " | ".join(judges) + " |", "|" + "---|" * (3 + len(judges))]
    for r in results:
        faces = [f for f in (r.details or {}).get("faces") or [{}] if only is None or only(f)] or [{}]
        for face in faces:
            cells = []
            for j in judges:
                v = face.get(j)
                cells.append(f"{v['score']:.3f}{'*' if v['matches'] else ''}" if v else "")
            lines.append(f"| {Path(r.file).name} | {face.get('face', '')} | {r.status} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print("score = similarity original -> protected (cosine; -L2 for dlib); * = the judge still matches them")
