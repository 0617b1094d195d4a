"""Aligned face crops of dataset images for evaluation: cached detection (labelled face = nearest the centre),
then one similarity-aligned crop per crop geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.datasets.lfw_faces import detect_lfw_faces
from faceveil.detect.align import align
from faceveil.io.images import read_image
from faceveil.models import zoo

EMBED_CHUNK = 64  # distractor images read, aligned and embedded at once (memory stays flat over all of LFW)


def landmarks_for(files: list[Path], progress: bool = True) -> tuple[dict[Path, np.ndarray], dict]:
    """Landmarks [5,2] of each file's labelled face. A file where no face is detected falls back to the mean
    landmarks of the detected files (LFW images are roughly centred), and is counted in the returned info."""
    faces = detect_lfw_faces(files, progress=progress)
    found = {f: np.asarray(face.landmarks, dtype=np.float64) for f, face in faces.items() if face is not None}
    missing = sorted(str(f) for f in files if f not in found)
    mean = np.mean(np.stack(list(found.values())), axis=0) if found else None
    out = {f: found.get(f, mean) for f in files}
    return out, {"images": len(files), "detected": len(found), "fallback_alignment": missing}


def aligned_crops(files: list[Path], geometries: list[str],
                  progress: bool = True) -> tuple[dict[str, dict[Path, np.ndarray]], dict]:
    landmarks, info = landmarks_for(files, progress)
    crops: dict[str, dict[Path, np.ndarray]] = {g: {} for g in geometries}
    for f in tqdm(files, desc="align", disable=not progress, unit="img"):
        rgb = read_image(f).rgb
        for g in geometries:
            crops[g][f] = align(rgb, landmarks[f], g)
    return crops, {**info, "fallback_alignment_count": len(info["fallback_alignment"])}


@dataclass
class EmbeddingTable:
    """Clean embeddings of LFW files, one row per file, per judge: computed once per run."""

    files: list[Path]
    rows: dict[str, torch.Tensor]  # judge -> [N, D]
    index: dict[Path, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {f: i for i, f in enumerate(self.files)}

    def of(self, judge: str, files: list[Path] | tuple[Path, ...]) -> torch.Tensor:
        return self.rows[judge][torch.tensor([self.index[f] for f in files], dtype=torch.long)]


def embed_files(judges: list[str], files: list[Path], landmarks: dict[Path, np.ndarray],
                progress: bool = True) -> EmbeddingTable:
    """Every judge's embedding of every file's labelled face, read in chunks (one alignment per crop geometry,
    shared by the judges that use it)."""
    geometries = sorted({zoo.spec(j).geometry for j in judges})
    parts: dict[str, list[torch.Tensor]] = {j: [] for j in judges}
    bar = tqdm(total=len(files), desc="clean faces", disable=not progress, unit="img")
    for start in range(0, len(files), EMBED_CHUNK):
        chunk = files[start:start + EMBED_CHUNK]
        photos = [read_image(f).rgb for f in chunk]
        for geometry in geometries:
            crops = np.stack([align(p, landmarks[f], geometry) for p, f in zip(photos, chunk, strict=True)])
            for judge in judges:
                if zoo.spec(judge).geometry == geometry:
                    parts[judge].append(zoo.embed_crops(zoo.load(judge), crops))
        bar.update(len(chunk))
    bar.close()
    return EmbeddingTable(list(files), {j: torch.cat(p) if p else torch.empty(0) for j, p in parts.items()})


def embed_images(judge: str, images: list[np.ndarray], landmarks: list[np.ndarray]) -> torch.Tensor:
    """The judge's embeddings [N, D] of faces in images (photos or canonical faces), each aligned with its
    landmarks [5, 2]."""
    model = zoo.load(judge)
    crops = np.stack([align(im, m, model.spec.geometry) for im, m in zip(images, landmarks, strict=True)])
    return zoo.embed_crops(model, crops)
