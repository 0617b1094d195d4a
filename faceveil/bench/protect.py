"""`faceveil bench protect`: seconds per face of `faceveil protect`, next to the pure forward+backward floor.

For each preset (the CLI default, and TIP-IM with the paper's settings) it times
- `photo`: the whole job on a sample photo with four faces (read, detect, optimise the faces together through
  paste-back, paste, write; no verification), per face, i.e. what a user waits for per face;
- `folder`: the same job on all the sample photos in one run, faces of consecutive photos optimised together
  (`--batch-faces`), per face; its floor is that of the batches the run made;
- `optimise-1` / `optimise-16`: the optimisation alone for a batch of 1 and of 16 faces (photos mode, the faces of
  the sample photos);
and the floor: iterations x (forward + backward of every surrogate at its input size, same batch) on random crops —
what the networks alone cost. ratio = measured / floor; the difference is warps, paste-back, 8-bit rounding,
projection, and for TIP-IM the target search (its candidate passes are algorithmic cost, not overhead).
Each repeat times the case and then its floor, back to back, and the ratio is the median of the repeats' ratios:
this CPU's speed drifts by 10-50 % over minutes, which would bias a ratio of two medians taken minutes apart. The
ratio of the fastest case to the fastest floor is reported beside it: other work on the machine only slows runs.
And each case also clocks its surrogates' own forward and backward passes while it runs (`NetworkClock`):
`ratio_in_run` = the case's time over that network time, free of the drift between a case and its floor.
The whole-job cases also report where their time went (`stage_seconds_per_face`: reading, detection, the
optimisation, the final paste and writing; `stage_share_of_networks`: each over the networks' time in the run).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.attacks.faces import from_photos
from faceveil.bench.network_clock import NetworkClock
from faceveil.detect.mtcnn import MTCNN
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.models import zoo
from faceveil.pipeline.batch import BatchItem
from faceveil.pipeline.job import StageSeconds
from faceveil.pipeline.protect import PhotoProtector, ProtectSettings

BATCH_FACES = 16
# A sample photo with four faces (no sample photo has exactly one): the photo's time is divided by its faces.
BENCH_PHOTO = "sample6.jpg"


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floor_timer(surrogates: list[str], batch: int, iterations: int) -> Callable[[], None]:
    """A function running iterations x forward+backward of every surrogate on `batch` random crops at its input
    size (warmed up once)."""
    gen = torch.Generator().manual_seed(0)
    models = [zoo.load(name) for name in surrogates]
    inputs = [torch.rand(batch, 3, m.spec.input_size, m.spec.input_size, generator=gen) for m in models]

    def run() -> None:
        for _ in range(iterations):
            for model, x in zip(models, inputs, strict=True):
                model(x.clone().requires_grad_(True)).square().sum().backward()

    run()
    return run


def floor_seconds(surrogates: list[str], batch: int, iterations: int, repeats: int = 3) -> float:
    """iterations x forward+backward of every surrogate on `batch` random crops at its input size (median)."""
    run = floor_timer(surrogates, batch, iterations)
    return statistics.median(_seconds(run) for _ in range(repeats))


def _paired(case: Callable[[], object], floor: Callable[[], None], repeats: int,
            networks: list[torch.nn.Module], stages: StageSeconds | None = None) -> dict:
    """Each floor timed right after its case: the medians, the median of the per-repeat ratios, the ratio of
    the fastest case to the fastest floor (interference from other work only ever slows a run down), the
    median ratio of each case to the time its networks ran within it, and with `stages` (the job's stage clock),
    each stage's median seconds and median share of the network time."""
    pairs, in_run, staged = [], [], []
    for _ in range(repeats):
        if stages is not None:
            stages.clear()
        with NetworkClock().timing(networks) as clock:
            seconds = _seconds(case)
        pairs.append((seconds, _seconds(floor)))
        in_run.append((seconds, clock.seconds))
        if stages is not None:
            staged.append(dict(stages.seconds))
    cases, floors = [c for c, _ in pairs], [f for _, f in pairs]
    networks_seconds = [n for _, n in in_run]
    names = staged[0] if staged else {}
    return {"seconds": statistics.median(cases), "floor": statistics.median(floors),
            "ratio": statistics.median(c / f for c, f in pairs), "ratio_of_minimums": min(cases) / min(floors),
            "network_seconds": statistics.median(networks_seconds),
            "ratio_in_run": statistics.median(c / n for c, n in in_run),
            "stage_seconds": {k: statistics.median(s[k] for s in staged) for k in names},
            "stage_share": {k: statistics.median(s[k] / n for s, n in zip(staged, networks_seconds, strict=True))
                            for k in names}}


def _sample_faces(detector: MTCNN, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` (photo, landmarks) pairs from the sample photos, cycling through their faces."""
    faces = []
    for path in weights.sample_photos():
        rgb = read_image(path).rgb
        faces += [(rgb, f.landmarks) for f in detector.detect_large(rgb)]
    faces = (faces * (count // len(faces) + 1))[:count]
    return [p for p, _ in faces], [m for _, m in faces]


def bench_preset(name: str, settings: ProtectSettings, repeats: int, out_dir: Path) -> list[dict]:
    settings = dataclasses.replace(settings, verify=False)
    protector = PhotoProtector(settings, out_dir)
    iterations = settings.attack.steps
    photo = next(p for p in weights.sample_photos() if p.name == BENCH_PHOTO)
    item = BatchItem(path=photo, kind="image")
    faces = protector(item)["faces"]  # warm-up, and how many faces the photo has
    folder_out = out_dir / "folder"  # its own: a second job does not overwrite a file the first one wrote
    folder_out.mkdir(exist_ok=True)
    folder = _folder_case(settings, folder_out)
    # (case, faces, run it, floor or None: the surrogates' own at that batch, the job's stage clock or None)
    cases = [("photo", faces, lambda: protector(item), None, protector.stages), folder]
    photos, marks = _sample_faces(protector.detector, BATCH_FACES)
    for size in (1, BATCH_FACES):
        batch = from_photos(photos[:size], marks[:size], protector.ensemble.geometries, "photos")
        cases.append((f"optimise-{size}", size, lambda b=batch: protector.optimise(b), None, None))
    networks = list(protector.ensemble.models.values())
    rows = []
    for case, count, fn, floor, stages in cases:
        floor = floor or floor_timer(settings.surrogates, count, iterations)
        timed = _paired(fn, floor, repeats, networks, stages)
        rows.append({"preset": name, "case": case, "faces": count, "seconds_per_face": timed["seconds"] / count,
                     "floor_seconds_per_face": timed["floor"] / count, "method": settings.method,
                     "surrogates": settings.surrogates, "iterations": iterations,
                     "eps": round(settings.attack.eps * 255, 2), "ratio": timed["ratio"],
                     "ratio_of_minimums": timed["ratio_of_minimums"],
                     "network_seconds_per_face": timed["network_seconds"] / count,
                     "ratio_in_run": timed["ratio_in_run"]})
        if timed["stage_seconds"]:
            rows[-1]["stage_seconds_per_face"] = {k: t / count for k, t in timed["stage_seconds"].items()}
            rows[-1]["stage_share_of_networks"] = timed["stage_share"]
    return rows


def _folder_case(settings: ProtectSettings, out_dir: Path) -> tuple:
    """("folder", faces, run every sample photo as `faceveil protect` does, the floor of the batches it made,
    the job's stage clock)."""
    items = [BatchItem(path=p, kind="image") for p in weights.sample_photos()]
    protector = PhotoProtector(settings, out_dir, upcoming=items)

    def run_folder() -> None:
        protector.batches.clear()
        for item in items:
            protector(item)

    run_folder()  # warm-up; records the batches
    floors = [floor_timer(settings.surrogates, n, settings.attack.steps) for n in protector.batches]
    return "folder", sum(protector.batches), run_folder, lambda: [floor() for floor in floors], protector.stages


def run(presets: dict[str, ProtectSettings], repeats: int = 3, progress: bool = True) -> tuple[list[dict], dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="faceveil-bench-") as tmp:
        for name, settings in tqdm(presets.items(), desc="bench protect", disable=not progress):
            out_dir = Path(tmp) / name
            out_dir.mkdir()
            rows += bench_preset(name, settings, repeats, out_dir)
    info = {"threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    return rows, info
