"""Proof that each converted model equals its original runtime: committed reference outputs of the original
runtimes (TF.js in Node, onnxruntime, TensorFlow Lite, dlib C++) on fixed inputs, made by tools/make_references.

Each reference file holds `inputs` (uint8 NHWC pixels at the model's input size) and `outputs` (what the original
runtime returned for them, after the same normalisation the registry applies)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.models import zoo

RELATIVE_TOLERANCE = 1e-4  # max abs diff allowed, relative to the largest reference output magnitude


def reference_file(name: str) -> Path:
    path = Path(str(resources.files("faceveil").joinpath(f"data/references/ref_{name}.npz")))
    if not path.is_file():
        raise FaceveilError(f"no reference outputs for {name} ({path})")
    return path


def compare_to_reference(name: str) -> dict:
    """Run the registry model on the reference inputs; max abs diff against the original runtime's outputs."""
    data = np.load(reference_file(name))
    x01 = torch.from_numpy(data["inputs"]).permute(0, 3, 1, 2).float().div(255.0)
    ref = data["outputs"].astype(np.float64)
    with torch.no_grad():
        ours = zoo.load(name)(x01.contiguous()).double().numpy()
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    return {"max_abs_diff": diff, "output_scale": scale, "relative_diff": diff / scale,
            "ok": diff <= RELATIVE_TOLERANCE * scale}


def compare_blazeface() -> dict:
    """The face-confirmation detector (BlazeFace) against TF.js: its four outputs joined per anchor, as in the
    reference (logit, then the 16 regressors; the stride-16 anchors first)."""
    from faceveil.models.blazeface import BlazeFace

    data = np.load(reference_file("blazeface-back"))
    model = BlazeFace()
    rows = []
    for image in data["inputs"]:
        logits16, logits32, reg16, reg32 = model.raw(model.normalise(image[None]))
        rows.append(torch.cat([torch.cat([logits16, reg16], 2), torch.cat([logits32, reg32], 2)], 1))
    ours = torch.cat(rows).double().numpy()
    ref = data["outputs"].astype(np.float64)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    return {"max_abs_diff": diff, "output_scale": scale, "relative_diff": diff / scale,
            "ok": diff <= RELATIVE_TOLERANCE * scale}


def check_all() -> list[dict]:
    """Rows for `faceveil models check`: every weight file (present, sha256) and every model's reference match."""
    rows = [{"item": r["file"], "check": "sha256", "ok": r["present"] and r["sha256_ok"]}
            for r in weights.file_status()]
    for name in zoo.SPECS:
        try:
            result = compare_to_reference(name)
            rows.append({"item": name, "check": "equals original runtime", **result})
        except FaceveilError as exc:
            rows.append({"item": name, "check": "equals original runtime", "ok": False, "error": str(exc)})
    try:
        rows.append({"item": "blazeface-back", "check": "equals original runtime", **compare_blazeface()})
    except FaceveilError as exc:
        rows.append({"item": "blazeface-back", "check": "equals original runtime", "ok": False, "error": str(exc)})
    return rows
