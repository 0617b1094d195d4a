"""`faceveil bench scale`: the same photos protected by the local engine and by Ray with 1, 2, ... workers on this
machine: photos per second, seconds per face, and what Ray adds per photo.

Every engine run starts from nothing loaded (the local Protector and each actor load the detector and models) and
writes its files and report as `faceveil protect` does. Ray runs on one local instance started for the benchmark
(its start is timed on its own). Ray's overhead per photo compares Ray with one worker against the local engine on
one thread (each actor runs one thread): scheduling, moving paths and report rows, an actor's process and its
model loading, spread over the photos of the run.

With an EvalCase, the same for an evaluation's protection runs: the tip-im protocol's probes of a small seeded LFW
split protected against one surrogate set, the masks computed locally (all cores, one thread) or by Ray actors
(faceveil.distributed.ray_eval); the split's preparation and the scoring stay local and are not timed. Each Ray row
says whether its masks gave the local one-thread run's quality figures exactly (the same masks)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from faceveil.distributed import ray_engine

if TYPE_CHECKING:
    from faceveil.evaluate.protocols import tip_im
    from faceveil.pipeline.protect import ProtectSettings


@dataclass
class EvalCase:
    """An evaluation's protection run to time: the probes of a prepared tip-im split against one surrogate set."""

    prepared: tip_im.Prepared
    surrogates: list[str]
    settings: tip_im.Settings


def run(settings: ProtectSettings, photos: list[Path], workers: list[int], copies: int = 1,
        progress: bool = False, evaluation: EvalCase | None = None) -> tuple[list[dict], dict]:
    """Rows: one per engine run (local on all cores, local on one thread, Ray per worker count) over `copies` copies
    of the photos, and the overhead row; the same for the evaluation if given; info: CPUs, load average before and
    after, Ray's start seconds."""
    import torch

    ray = ray_engine.import_ray()
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict] = []
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="faceveil-scale-") as tmp:
        photos = _copies(photos, copies, Path(tmp) / "photos")
        previous = torch.get_num_threads()
        local_masks = {}
        for threads in sorted({cores, 1}, reverse=True):
            torch.set_num_threads(threads)
            rows.append(_local(settings, photos, Path(tmp) / f"local-{threads}", threads, progress))
            if evaluation is not None:
                row, local_masks[threads] = _eval_local(evaluation, threads)
                rows.append(row)
        torch.set_num_threads(previous)
        start = time.perf_counter()
        ray_engine.connect(ray, None, max(workers))
        ray_start = round(time.perf_counter() - start, 2)
        try:
            for count in workers:
                rows.append(_ray(settings, photos, Path(tmp) / f"ray-{count}", count, progress))
                if evaluation is not None:
                    rows.append(_eval_ray(evaluation, count, local_masks[1]))
        finally:
            ray.shutdown()
    rows.append(_overhead([r for r in rows if r["workload"] == "protect"]))
    if evaluation is not None:
        rows.append({**_overhead([r for r in rows if r["workload"] == "eval"]), "workload": "eval"})
    info = {"cpus": cores, "photos": len(photos), "ray_start_s": ray_start, "ray_version": ray.__version__,
            "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    return rows, info


def _copies(photos: list[Path], copies: int, folder: Path) -> list[Path]:
    """The photos `copies` times under distinct names (a longer run spreads each actor's start over more photos)."""
    folder.mkdir(parents=True)
    made = []
    for copy in range(copies):
        for photo in photos:
            made.append(folder / f"{copy}-{photo.name}")
            shutil.copyfile(photo, made[-1])
    return made


def _local(settings: ProtectSettings, photos: list[Path], out: Path, threads: int, progress: bool) -> dict:
    from faceveil.api import Protector

    start = time.perf_counter()
    report = Protector.from_settings(settings).protect_files(photos, out, progress=progress)
    return _row("local", 1, threads, report, time.perf_counter() - start)


def _ray(settings: ProtectSettings, photos: list[Path], out: Path, workers: int, progress: bool) -> dict:
    start = time.perf_counter()
    report = ray_engine.protect_files_ray(settings, photos, out, progress=progress, workers=workers)
    return _row("ray", workers, ray_engine.CPUS_PER_ACTOR, report, time.perf_counter() - start)


def _row(engine: str, workers: int, threads: int, report, wall: float) -> dict:
    faces = sum(r.faces for r in report.results)
    done = sum(r.status == "ok" for r in report.results)
    return {"workload": "protect", "engine": engine, "workers": workers, "threads_per_worker": threads,
            "photos": len(report.results),
            "protected": done, "faces": faces, "wall_s": round(wall, 2),
            "photos_per_s": round(len(report.results) / wall, 4), "s_per_face": round(wall / max(faces, 1), 3)}


def _overhead(rows: list[dict]) -> dict:
    """Ray with one worker against the local engine on one thread, per photo."""
    local = next(r for r in rows if r["engine"] == "local" and r["threads_per_worker"] == 1)
    single = next((r for r in rows if r["engine"] == "ray" and r["workers"] == 1), None)
    per_photo = None if single is None else round(1000 * (single["wall_s"] - local["wall_s"]) / local["photos"], 1)
    return {"workload": "protect", "engine": "ray overhead (1 worker vs local, 1 thread)",
            "ray_overhead_ms_per_photo": per_photo}


def _eval_local(case: EvalCase, threads: int) -> tuple[dict, tuple]:
    """The evaluation's protection run with its masks computed here; the row and the run's quality figures."""
    from faceveil.evaluate.protocols import tip_im

    start = time.perf_counter()
    protected = tip_im.protect_probes(case.prepared.split, case.prepared.landmarks, case.surrogates, case.settings)
    return _eval_row("local", 1, threads, len(protected.psnr), time.perf_counter() - start), _quality(protected)


def _eval_ray(case: EvalCase, workers: int, local_one_thread: tuple) -> dict:
    """The same run with its masks computed by `workers` Ray actors (on the instance already started)."""
    import torch

    from faceveil.distributed.ray_eval import RayMasks
    from faceveil.evaluate.protocols import tip_im

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the collecting here sums floats too (the crops' resampling): as the local row did
    start = time.perf_counter()
    try:
        with RayMasks(None, workers) as masks:
            protected = tip_im.protect_probes(case.prepared.split, case.prepared.landmarks, case.surrogates,
                                              case.settings, masks)
    finally:
        torch.set_num_threads(previous)
    row = _eval_row("ray", workers, ray_engine.CPUS_PER_ACTOR, len(protected.psnr), time.perf_counter() - start)
    return {**row, "same_as_local_1_thread": _quality(protected) == local_one_thread}


def _quality(protected) -> tuple:
    return tuple(protected.psnr), tuple(protected.ssim)


def _eval_row(engine: str, workers: int, threads: int, probes: int, wall: float) -> dict:
    """A probe is one face: photos_per_s and s_per_face read as probes."""
    return {"workload": "eval", "engine": engine, "workers": workers, "threads_per_worker": threads,
            "photos": probes, "protected": probes, "faces": probes, "wall_s": round(wall, 2),
            "photos_per_s": round(probes / wall, 4), "s_per_face": round(wall / max(probes, 1), 3)}
