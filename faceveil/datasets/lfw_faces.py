"""LFW helpers: the labelled face of an LFW image (the detected face nearest the centre), through the cache.

`python -m faceveil.datasets.lfw_faces [--root PATH] [--limit N] [--workers 2]` detects every LFW image (filling the
detection cache that later evaluations reuse) and reports how many had no face.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from faceveil.detect.cache import DetectionCache, cache_for, detect_file, file_sha256
from faceveil.detect.mtcnn import MTCNN, Face, default_detector, nearest_to_center


def default_root() -> Path | None:
    """$FACEVEIL_LFW, else ../shared/datasets/lfw beside the checkout; None when absent."""
    from faceveil.datasets.lfw import default_lfw_root

    return default_lfw_root()


def lfw_images(root: Path) -> list[Path]:
    """All LFW images under root/images, sorted."""
    return sorted((Path(root) / "images").glob("*/*.jpg"))


def detect_lfw_face(path: Path | str, detector: MTCNN | None = None,
                    cache: DetectionCache | None = None) -> Face | None:
    """The labelled face of an LFW image (nearest the centre), or None when no face was found."""
    faces, (width, height) = detect_file(path, detector, cache)
    return nearest_to_center(faces, width, height)


def _cached_only(paths: Sequence[Path], cache: DetectionCache) -> dict[Path, Face | None]:
    found: dict[Path, Face | None] = {}
    for path in paths:
        hit = cache.get(file_sha256(path))
        if hit is not None:
            found[path] = nearest_to_center(hit[0], *hit[1])
    return found


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _detect_chunk(paths: list[str]) -> list[dict | None]:
    faces = [detect_lfw_face(p) for p in paths]
    return [f.to_dict() if f is not None else None for f in faces]


def _chunks(items: Sequence[Path], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield [str(p) for p in items[start:start + size]]


def detect_lfw_faces(paths: Sequence[Path], workers: int = 2,
                     progress: bool = True) -> dict[Path, Face | None]:
    """Labelled faces of many LFW images, default detector; misses computed in `workers` processes."""
    paths = [Path(p) for p in paths]
    found = _cached_only(paths, cache_for(default_detector()))
    todo = [p for p in paths if p not in found]
    if not todo:
        return found
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="detect", disable=not progress, unit="img")
    chunks = list(_chunks(todo, 32))
    if workers <= 1:
        results = map(_detect_chunk, chunks)
        return _collect(found, chunks, results, bar)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        return _collect(found, chunks, pool.map(_detect_chunk, chunks), bar)


def _collect(found: dict[Path, Face | None], chunks: list[list[str]], results: Iterable[list[dict | None]],
             bar) -> dict[Path, Face | None]:
    for chunk, faces in zip(chunks, results, strict=True):
        for path, face in zip(chunk, faces, strict=True):
            found[Path(path)] = Face.from_dict(face) if face is not None else None
        bar.update(len(chunk))
    bar.close()
    return found


@dataclass
class Survey:
    """How many LFW images had no face."""

    total: int
    seconds: float
    missing: list[Path] = field(default_factory=list)

    @property
    def found(self) -> int:
        return self.total - len(self.missing)


def survey(paths: Sequence[Path], workers: int = 2, progress: bool = True) -> Survey:
    start = time.perf_counter()
    faces = detect_lfw_faces(paths, workers, progress)
    missing = sorted(p for p, f in faces.items() if f is None)
    return Survey(total=len(paths), seconds=time.perf_counter() - start, missing=missing)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceveil.datasets.lfw_faces", description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="LFW folder (default: $FACEVEIL_LFW, shared)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    root = args.root or default_root()
    if root is None:
        print("LFW not found: pass --root or set FACEVEIL_LFW", file=sys.stderr)
        return 2
    paths = lfw_images(root)[: args.limit]
    result = survey(paths, args.workers)
    print(f"{result.found}/{result.total} images with a face, {len(result.missing)} without, "
          f"{result.seconds:.1f} s")
    for path in result.missing:
        print(f"  no face: {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
