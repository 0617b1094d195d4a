"""AdvCloak's training faces: which LFW identities it may learn from, and their aligned canonical faces, cached.

The paper trains on an external dataset (CASIA-WebFace) and evaluates on others. Here training and evaluation
both come from LFW, so the training identities must be disjoint from every evaluation identity:

- the OPOM protocol (faceveil.evaluate.protocols.opom) evaluates identities with >= 12 images: training takes
  identities with at most 11 images;
- the TIP-IM protocol (its split: faceveil.datasets.splits.make_split, seed 0) uses up to 500 protected and 10 target
  identities and up to 500 gallery-only identities, all drawn from one seeded permutation; a limited split
  (--limit) draws from the front of the same permutation, so it is inside the full one: training excludes every
  identity of the full seed-0 split (other seeds of that protocol are not excluded).
- identities need >= 2 images (one face cannot show what varies within a person).

That leaves 1,084 identities with 3,558 images on the full LFW. Stage II needs several images per person: it
uses the identities with at least `images_per_identity` of them (326 with >= 4).

Faces are aligned once to the canonical face space (faceveil.detect.canonical) from the cached detections and
kept in a uint8 .npy beside the detection cache, memory-mapped at training time: data loading is then a slice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.datasets.splits import make_split
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.io.atomic import atomic_path
from faceveil.io.images import read_image

MIN_IMAGES = 2
# The OPOM protocol's identities have at least this many images; training stays strictly below.
OPOM_PROTOCOL_MIN_IMAGES = 12
MAX_IMAGES = OPOM_PROTOCOL_MIN_IMAGES - 1
TIP_IM_SPLIT_SEED = 0
CACHE_VERSION = 1


def training_identities(people: dict[str, list[Path]], limit: int | None = None,
                        seed: int = 0) -> dict[str, list[Path]]:
    """The identities AdvCloak trains on (see the module docstring), in a seeded order, the first `limit`."""
    split = make_split(people, TIP_IM_SPLIT_SEED)
    evaluated = {name for name, _ in split.probes + split.targets + split.gallery}
    names = sorted(n for n, files in people.items()
                   if MIN_IMAGES <= len(files) <= MAX_IMAGES and n not in evaluated)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = [names[i] for i in order][:limit]
    assert_disjoint(chosen, people, evaluated)
    return {n: list(people[n]) for n in chosen}


def assert_disjoint(names: list[str], people: dict[str, list[Path]], evaluated: set[str]) -> None:
    """Training identities must not be evaluated by either protocol."""
    opom = [n for n in names if len(people[n]) >= OPOM_PROTOCOL_MIN_IMAGES]
    tip_im = [n for n in names if n in evaluated]
    if opom or tip_im:
        raise AssertionError(f"training identities overlap the evaluation sets: OPOM {opom[:3]}, TIP-IM {tip_im[:3]}")


@dataclass
class FaceSet:
    """Canonical faces [N,256,256,3] uint8 (possibly memory-mapped) with an identity index per face."""

    faces: np.ndarray
    labels: np.ndarray  # [N] int64 index into names
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def tensor(self, index: np.ndarray | list[int]) -> torch.Tensor:
        """Faces at `index` as float [B,3,256,256] in [0, 1]."""
        chunk = np.ascontiguousarray(self.faces[np.asarray(index)])
        return torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div(255)

    def by_identity(self, min_images: int = 1) -> list[np.ndarray]:
        """Face indices of each identity that has at least `min_images` faces."""
        groups = [np.flatnonzero(self.labels == k) for k in range(len(self.names))]
        return [g for g in groups if len(g) >= min_images]


def cache_folder() -> Path:
    return weights.home() / "cache" / "advcloak"


def load_faces(people: dict[str, list[Path]], progress: bool = True, folder: Path | None = None) -> FaceSet:
    """Canonical faces of the given identities (sorted by name, then file), aligned once and cached."""
    from faceveil.datasets.faces import landmarks_for

    names = sorted(people)
    files = [f for n in names for f in people[n]]
    labels = np.array([k for k, n in enumerate(names) for _ in people[n]], dtype=np.int64)
    if not files:
        raise FaceveilError("no training faces: the identity selection is empty")
    key = hashlib.sha256(json.dumps([CACHE_VERSION, [str(f) for f in files]]).encode()).hexdigest()[:16]
    folder = folder or cache_folder()
    path = folder / f"canonical-{key}.npy"
    if not path.is_file():
        landmarks, _ = landmarks_for(files, progress)
        _write_faces(path, files, landmarks, progress)
    return FaceSet(np.load(path, mmap_mode="r"), labels, names)


def _write_faces(path: Path, files: list[Path], landmarks: dict[Path, np.ndarray], progress: bool) -> None:
    """Align every file into a .npy written atomically (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = C.CANONICAL_SIZE
    with atomic_path(path) as temp:
        out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
        for i, f in enumerate(tqdm(files, desc="align", disable=not progress, unit="img")):
            out[i] = align(read_image(f).rgb, landmarks[f], C.CANONICAL)
        out.flush()
        del out
