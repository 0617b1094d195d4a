"""`faceveil protect --engine ray`: the photos of a run protected by a pool of Ray actors, one Protector each.

The inputs are expanded here as the local engine expands them (same files, same order, same output paths) and
become a Ray dataset of paths; `map_batches` hands PHOTOS_PER_CALL of them at a time to a pool of `workers` actors
(ActorPoolStrategy), each of which loaded the detector and models once. An actor protects its batch exactly as a
local run of those photos would (Protector.protect_items: atomic writes under the output folder, one report row per
photo, a bad file is its own error row) and returns the rows; they are streamed to the progress bar and the report
as they arrive. Ray restarts an actor that dies and retries its batch: the retry rewrites the same outputs
atomically, so no file is duplicated, and the hidden temp files the dead process left are swept at the end.

Every node must see the inputs and the output folder at the same paths (one machine, or a shared filesystem such
as NFS) and have faceveil installed with its weights fetched (`faceveil models fetch`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.results import write_json_atomic
from faceveil.pipeline.batch import BatchItem, BatchReport, ItemResult, SkipItem
from faceveil.pipeline.job import plan_files

if TYPE_CHECKING:
    from faceveil.pipeline.protect import ProtectSettings

# Photos per actor call: their faces are optimised together up to --batch-faces (as in a local run of the same
# photos); small enough that two actors share a short run and that rows stream while the run goes on.
PHOTOS_PER_CALL = 4
CPUS_PER_ACTOR = 1
# numba's thread pool, once started, sets the intra-op thread count of torch's OpenMP runtime to its own: an actor
# that uses one CPU starts it with one thread.
ACTOR_ENV = {"OMP_NUM_THREADS": str(CPUS_PER_ACTOR), "NUMBA_NUM_THREADS": str(CPUS_PER_ACTOR)}
# The object store holds only paths and report rows: a small one spares the machine's shared memory.
OBJECT_STORE_BYTES = 256 * 1024 * 1024
EXTRA_MESSAGE = "--engine ray needs Ray, which is not installed: pip install 'faceveil[ray]'"


def import_ray() -> Any:
    """The ray module, or one line naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data comes with ray[data], which the extra installs)
    except ImportError as exc:
        raise FaceveilError(EXTRA_MESSAGE) from exc
    return ray


class ProtectActor:
    """One Ray actor: one Protector (detector and models loaded once), protecting batch after batch of paths."""

    def __init__(self, settings: ProtectSettings, out_dir: str) -> None:
        from faceveil.api import Protector
        from faceveil.runtime import prepare_process

        prepare_process()
        import torch

        # One intra-op thread per actor CPU: torch's float sums depend on the thread count, so an actor's masks
        # equal those of a local run with the same count (OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1), bit for bit.
        torch.set_num_threads(CPUS_PER_ACTOR)
        # The driver planned the run (plan_files): every output an actor writes is this run's, and a retried batch
        # must replace what a killed actor of this run already wrote.
        self.protector = Protector.from_settings(dataclasses.replace(settings, existing="overwrite"))
        self.out_dir = out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [BatchItem(Path(path), Path(root) if root else None, str(kind), Path(output), str(note))
                 for path, root, kind, output, note in zip(batch["path"], batch["root"], batch["kind"],
                                                           batch["output"], batch["note"], strict=True)]
        report = self.protector.protect_items(items, self.out_dir)
        rows = [json.dumps(result.to_dict()) for result in report.results]
        return {"index": np.asarray(batch["index"]), "row": np.asarray(rows, dtype=object)}


def protect_files_ray(settings: ProtectSettings, inputs: Iterable[str | Path], out_dir: str | Path, *,
                      recursive: bool = False, report_path: str | Path | None = None, progress: bool = True,
                      header: dict | None = None, address: str | None = None, workers: int = 2) -> BatchReport:
    """What `faceveil protect --engine ray` runs: the same outputs and report rows as the local engine
    (faceveil.api.Protector.protect_files). address: a running cluster ("HOST:PORT" of `ray start --head`, or
    "auto"); None starts a local Ray instance for the run and stops it after."""
    ray = import_ray()
    out_dir = Path(out_dir)
    plan = plan_files(inputs, out_dir, settings, recursive=recursive)  # the local engine's outputs and rules
    items = plan.items
    report = BatchReport(report_path=Path(report_path) if report_path is not None else None, header=header or {})
    report.results.extend(refused_row(item, plan.refused[item.path]) for item in items if item.path in plan.refused)
    todo = [i for i, item in enumerate(items) if item.path not in plan.refused]
    started_here = connect(ray, address, workers) if todo else False
    try:
        rows = _protected_rows(ray, settings, items, todo, out_dir.resolve(), workers) if todo else iter(())
        _collect(rows, items, out_dir, report, progress, skip=len(items) - len(todo))
    finally:
        sweep_temp_files(items, out_dir, settings.fmt)
        if started_here:
            ray.shutdown()
    position = {str(item.path): i for i, item in enumerate(items)}
    report.results.sort(key=lambda r: position[r.file])  # the final report in input order, as locally
    _write_report(report, final=True)
    return report


def connect(ray: Any, address: str | None, workers: int) -> bool:
    """Join the cluster at address, or start a local instance with `workers` CPUs; True when started here."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
            return True  # this driver's connection, dropped after the run (the cluster keeps running)
        # The actors are the job here: Ray's default lowers its workers' priority by 15 (to keep its own daemons
        # responsive), which on a busy machine made them ten times slower than the same work in this process.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FaceveilError(f"could not start or join {where}: {' '.join(str(exc).split())[:200]}") from exc
    return True


def refused_row(item: BatchItem, why: Exception) -> ItemResult:
    """The row of an input the plan refused (its output exists: refused, or skipped with --skip-existing)."""
    return ItemResult(file=str(item.path), status="skipped" if isinstance(why, SkipItem) else "error",
                      message=str(why))


def _protected_rows(ray: Any, settings: ProtectSettings, items: list[BatchItem], todo: list[int], out_dir: Path,
                    workers: int) -> Iterator[dict]:
    """The actors' report rows, as batches finish."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts photos
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notes would break into the table
    paths = [{"index": i, "path": str(items[i].path.resolve()), "kind": items[i].kind,
              "root": str(items[i].root.resolve()) if items[i].root is not None else "",
              "output": str(items[i].output_path(Path("."), settings.fmt)), "note": items[i].note} for i in todo]
    dataset = ray.data.from_items(paths, override_num_blocks=max(1, -(-len(paths) // PHOTOS_PER_CALL)))
    protected = dataset.map_batches(
        ProtectActor, fn_constructor_kwargs={"settings": settings, "out_dir": str(out_dir)},
        batch_size=PHOTOS_PER_CALL, batch_format="numpy", num_cpus=CPUS_PER_ACTOR,
        compute=ray.data.ActorPoolStrategy(size=workers), runtime_env={"env_vars": ACTOR_ENV})
    return protected.iter_rows()


def _collect(rows: Iterator[dict], items: list[BatchItem], out_dir: Path, report: BatchReport,
             progress: bool, skip: int = 0) -> None:
    """Each row into the report as it arrives (streamed to a .jsonl report, the bar counts photos); a run that Ray
    cannot finish leaves its missing photos as error rows, Ctrl-C as not done. The actors saw absolute paths: a row
    names its input and output as the local engine would (as they were given)."""
    done = {i for i, item in enumerate(items) if any(r.file == str(item.path) for r in report.results)}
    bar = tqdm(total=len(items) - skip, desc="protect (ray)", unit="file", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty())
    _write_report(report, final=False)
    try:
        for row in rows:
            index = int(row["index"])
            if index in done:  # a retried batch whose first rows already arrived
                continue
            done.add(index)
            result = ItemResult(**json.loads(row["row"]))
            given, seen = str(items[index].path), result.file
            result.file, result.message = given, result.message.replace(seen, given)
            if result.output is not None:
                result.output = str(out_dir / Path(result.output).relative_to(out_dir.resolve()))
            report.results.append(result)
            _write_report(report, final=False, added=result)
            if result.status == "error" and progress:
                tqdm.write(f"faceveil: {result.file}: {result.message}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(report.counts, refresh=False)
    except KeyboardInterrupt:
        report.interrupted = True
        report.not_done = [str(item.path) for i, item in enumerate(items) if i not in done]
    except Exception as exc:  # the cluster failed (not a photo): every photo not done is an error row
        message = "ray: " + " ".join(str(exc).split())[:250]
        for i, item in enumerate(items):
            if i not in done:
                report.results.append(ItemResult(str(item.path), "error", message))
    finally:
        bar.close()


def _write_report(report: BatchReport, *, final: bool, added: ItemResult | None = None) -> None:
    """A .jsonl report gets one line per photo as it finishes; a .json report is rewritten whole (atomically)."""
    path = report.report_path
    if path is None:
        return
    if path.suffix.lower() != ".jsonl":
        write_json_atomic(path, report.to_dict())
    elif added is None and not final:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")
    elif added is not None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(added.to_dict()) + "\n")


def sweep_temp_files(items: list[BatchItem], out_dir: Path, fmt: str) -> list[Path]:
    """Remove the hidden temp files (io.atomic) that a killed actor left beside this run's outputs."""
    removed = []
    for item in items:
        with contextlib.suppress(FaceveilError, OSError):
            target = item.output_path(out_dir, fmt)
            for temp in target.parent.glob(f".{target.name}.*{atomic.TEMP_SUFFIX}"):
                temp.unlink(missing_ok=True)
                removed.append(temp)
    return removed
