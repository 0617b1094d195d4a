"""Aligned face crops of dataset images for evaluation: cached detection (labelled face = nearest the centre),
then one similarity-aligned crop per crop geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from faceveil.detect.align import align
from faceveil.detect.lfw import detect_lfw_faces


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
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"))
        for g in geometries:
            crops[g][f] = align(rgb, landmarks[f], g)
    return crops, {**info, "fallback_alignment_count": len(info["fallback_alignment"])}
