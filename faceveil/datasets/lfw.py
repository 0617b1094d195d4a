"""The LFW dataset on disk: where it is, the View-2 pairs, identities and their images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from faceveil.errors import FaceveilError


def default_lfw_root() -> Path | None:
    """$FACEVEIL_LFW, else ../shared/datasets/lfw beside the checkout; None if absent."""
    env = os.environ.get("FACEVEIL_LFW")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "lfw")
    return next((c for c in candidates if (c / "images").is_dir()), None)


def lfw_root(path: str | Path) -> Path:
    """The LFW folder at `path` (checked: it holds images/)."""
    root = Path(path).expanduser()
    if not (root / "images").is_dir():
        raise FaceveilError(f"{root} is not an LFW folder (no images/ subfolder)")
    return root


@dataclass(frozen=True)
class Pair:
    fold: int
    a: Path
    b: Path
    same: bool


def image_path(root: Path, name: str, number: int) -> Path:
    return root / "images" / name / f"{name}_{number:04d}.jpg"


def read_pairs(root: Path) -> list[Pair]:
    """View-2 pairs.txt: first line 'folds n', then per fold n matched and n mismatched pairs."""
    path = root / "pairs.txt"
    if not path.is_file():
        raise FaceveilError(f"{path} is missing: LFW verification needs the official pairs.txt")
    lines = path.read_text().split("\n")
    folds, per_fold = (int(v) for v in lines[0].split())
    pairs: list[Pair] = []
    for i, line in enumerate(ln for ln in lines[1:] if ln.strip()):
        parts = line.split()
        fold = i // (2 * per_fold)
        if len(parts) == 3:
            pairs.append(Pair(fold, image_path(root, parts[0], int(parts[1])),
                              image_path(root, parts[0], int(parts[2])), True))
        else:
            pairs.append(Pair(fold, image_path(root, parts[0], int(parts[1])),
                              image_path(root, parts[2], int(parts[3])), False))
    if len(pairs) != folds * per_fold * 2:
        raise FaceveilError(f"{path}: expected {folds * per_fold * 2} pairs, read {len(pairs)}")
    return pairs


def identities(root: Path) -> dict[str, list[Path]]:
    """Identity name -> its image files, sorted (deterministic order)."""
    out = {}
    for d in sorted((root / "images").iterdir()):
        if d.is_dir():
            out[d.name] = sorted(d.glob("*.jpg"))
    return out
