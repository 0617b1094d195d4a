"""The person-mask file (.fvmask): one person's canonical-space masks and the embeddings that find them in photos.

Container: a zip archive holding only JSON and plain float32 .npy arrays (read back with allow_pickle=False, so
loading never runs code from the file):

    faceveil-mask.json      {"format": "faceveil-mask", "version": 1 or 2, "sha256": ..., "payload": [entry names]}
    meta.json               name, geometry, method, surrogates, eps, norm, reference model names, meta
    masks.npy               [n_M, 3, 256, 256] float32 (canonical space, [0, 1] pixel units)
    references/<model>.npy  [n, D] float32 enrolled embeddings of the person per model

sha256 is over the payload entries in the listed order (each as name, length, bytes), so a changed byte anywhere
in them, a truncated file, a file of another kind and a file from a newer faceveil all fail to load with one
clear line. meta must not hold paths of the user's photos (the file is meant to be shared between devices).

Version 2 (L2 masks only): an L2 eps bounds the norm of what is pasted (the mask times the face mask); in version 1
it bounded the whole canonical square, which holds at least as much, so version 1 files pass the same check. L-inf
files did not change and are still written as version 1, which older readers read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.errors import FaceveilError
from faceveil.io import atomic

FORMAT = "faceveil-mask"
VERSION = 2  # the newest format this faceveil reads
L2_PASTED_VERSION = 2  # from this version on an L2 budget is measured on what is pasted
HEADER = "faceveil-mask.json"
META = "meta.json"
MASKS = "masks.npy"
REFERENCE_DIR = "references/"
NORMS = ("linf", "l2")
MAX_ENTRY_BYTES = 256 * 2**20  # far above any real mask file (~1 MB per mask): refuses zip bombs
MAX_ENTRIES = 64
# A mask may exceed its budget by float rounding only.
BUDGET_TOLERANCE = 1e-5
_ABSOLUTE_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")  # /x, ~/x, C:\x, C:/x, \\server


@dataclass(frozen=True, eq=False)
class PersonMask:
    name: str
    masks: torch.Tensor  # [n_M,3,256,256] float32 canonical
    geometry: str  # canonical geometry name (faceveil.detect.canonical.CANONICAL)
    method: str
    surrogates: list[str]
    eps: float
    norm: str  # "linf" | "l2"
    references: dict[str, torch.Tensor] = field(default_factory=dict)  # model -> [n, D] enrolled embeddings
    meta: dict = field(default_factory=dict)  # iterations, seed, images used, created (no paths of the photos)

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])

    def save(self, path: Path | str) -> None:
        save_mask(self, path)

    @staticmethod
    def load(path: Path | str) -> PersonMask:
        return load_mask(path)


def save_mask(mask: PersonMask, path: Path | str) -> None:
    """Write the mask file atomically (a reader sees the old file or the whole new one)."""
    _check(mask, str(path))
    entries = {META: _meta_bytes(mask), MASKS: _npy_bytes(mask.masks)}
    for model, embeddings in sorted(mask.references.items()):
        entries[f"{REFERENCE_DIR}{model}.npy"] = _npy_bytes(embeddings)
    version = L2_PASTED_VERSION if mask.norm == "l2" else 1
    header = {"format": FORMAT, "version": version, "payload": list(entries), "sha256": _digest(entries)}
    with atomic.atomic_path(Path(path)) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(HEADER, json.dumps(header, indent=1))
        for name, data in entries.items():
            archive.writestr(name, data)


def load_mask(path: Path | str) -> PersonMask:
    """Read and check a mask file; FaceveilError (one line) when it is missing, corrupt, foreign or newer."""
    path = Path(path)
    if not path.is_file():
        raise FaceveilError(f"{path}: no such mask file")
    try:
        with zipfile.ZipFile(path) as archive:
            header = _header(archive, path)
            entries = {name: _read_entry(archive, name) for name in header["payload"]}
    except FaceveilError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError, TypeError) as exc:
        raise FaceveilError(f"{path}: not a readable faceveil mask file ({_short(exc)})") from None
    if _digest(entries) != header.get("sha256"):
        raise FaceveilError(f"{path}: mask file is corrupt (checksum mismatch)")
    try:
        mask = _decode(entries, path)
    except FaceveilError:
        raise
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise FaceveilError(f"{path}: malformed mask file ({_short(exc)})") from None
    _check(mask, str(path))
    return mask


# ----------------------------------------------------------------------------------------------- writing


def _meta_bytes(mask: PersonMask) -> bytes:
    doc = {"name": mask.name, "geometry": mask.geometry, "method": mask.method, "surrogates": list(mask.surrogates),
           "eps": float(mask.eps), "norm": mask.norm, "masks": mask.count, "references": sorted(mask.references),
           "meta": mask.meta}
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False, default=_json_default).encode()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        raise TypeError("mask metadata must not hold file paths")
    raise TypeError(f"mask metadata cannot hold {type(value).__name__}")


def _npy_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.float32)), allow_pickle=False)
    return buffer.getvalue()


def _digest(entries: dict[str, bytes]) -> str:
    sha = hashlib.sha256()
    for name, data in entries.items():
        encoded = name.encode()
        sha.update(len(encoded).to_bytes(8, "little") + encoded + len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


# ----------------------------------------------------------------------------------------------- reading


def _header(archive: zipfile.ZipFile, path: Path) -> dict:
    infos = archive.infolist()
    if HEADER not in archive.namelist():
        raise FaceveilError(f"{path}: not a faceveil mask file")
    if len(infos) > MAX_ENTRIES:
        raise FaceveilError(f"{path}: not a faceveil mask file (too many entries)")
    header = json.loads(_read_entry(archive, HEADER))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FaceveilError(f"{path}: not a faceveil mask file")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise FaceveilError(f"{path}: mask file has an invalid format version {version!r}")
    if version > VERSION:
        raise FaceveilError(f"{path}: mask file format version {version} is newer than this faceveil reads "
                            f"({VERSION}): upgrade faceveil")
    payload = header.get("payload")
    if (not isinstance(payload, list) or not all(isinstance(n, str) for n in payload)
            or META not in payload or MASKS not in payload or len(set(payload)) != len(payload)):
        raise FaceveilError(f"{path}: mask file header lists no valid payload")
    return header


def _read_entry(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_ENTRY_BYTES:
        raise ValueError(f"entry {name} is implausibly large")
    return archive.read(info)  # checks the entry's CRC-32


def _array(data: bytes, name: str) -> torch.Tensor:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.float32:
        raise ValueError(f"{name} is {array.dtype}, not float32")
    return torch.from_numpy(array.copy())


def _decode(entries: dict[str, bytes], path: Path) -> PersonMask:
    doc = json.loads(entries[META])
    references = {}
    for model in doc["references"]:
        entry = f"{REFERENCE_DIR}{model}.npy"
        if entry not in entries:
            raise FaceveilError(f"{path}: mask file lacks the reference embeddings of {model}")
        references[model] = _array(entries[entry], entry)
    return PersonMask(name=str(doc["name"]), masks=_array(entries[MASKS], MASKS), geometry=str(doc["geometry"]),
                      method=str(doc["method"]), surrogates=[str(s) for s in doc["surrogates"]],
                      eps=float(doc["eps"]), norm=str(doc["norm"]), references=references,
                      meta=dict(doc.get("meta") or {}))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------------------------- checks


def _check(mask: PersonMask, where: str) -> None:
    """The invariants every reader relies on; FaceveilError naming the first broken one."""
    from faceveil.attacks.budgets import pasted_l2
    from faceveil.detect.canonical import CANONICAL, CANONICAL_SIZE

    def bad(message: str) -> FaceveilError:
        return FaceveilError(f"{where}: invalid person mask: {message}")

    if not mask.name or not mask.name.isprintable() or len(mask.name) > 200:
        raise bad("the name must be 1-200 printable characters")
    if mask.geometry != CANONICAL.name:
        raise bad(f"geometry {mask.geometry!r} is not the canonical face space {CANONICAL.name!r}")
    masks = mask.masks
    if masks.dim() != 4 or masks.shape[0] < 1 or tuple(masks.shape[1:]) != (3, CANONICAL_SIZE, CANONICAL_SIZE):
        raise bad(f"masks must be [n_M,3,{CANONICAL_SIZE},{CANONICAL_SIZE}], got {tuple(masks.shape)}")
    if not torch.isfinite(masks).all():
        raise bad("masks hold non-finite values")
    if mask.norm not in NORMS:
        raise bad(f"norm {mask.norm!r} is not one of {', '.join(NORMS)}")
    # a budget beyond the largest possible perturbation of [0, 1] pixels is a unit mistake (e.g. 8 for 8/255)
    largest = 1.0 if mask.norm == "linf" else math.sqrt(masks[0].numel())
    if not (math.isfinite(mask.eps) and 0 < mask.eps <= largest):
        raise bad(f"{mask.norm} eps {mask.eps} is not in (0, {largest:g}] (pixel units of [0, 1])")
    # an L2 budget is measured on what is pasted (the mask times the face mask): outside it nothing reaches a photo
    size = masks.flatten(1).abs().amax(1) if mask.norm == "linf" else pasted_l2(masks)
    if float(size.max()) > mask.eps * (1 + BUDGET_TOLERANCE) + 1e-7:
        raise bad(f"a mask exceeds its {mask.norm} budget {mask.eps:.5f} ({float(size.max()):.5f})")
    for model, embeddings in mask.references.items():
        if embeddings.dim() != 2 or embeddings.shape[0] < 1 or not torch.isfinite(embeddings).all():
            raise bad(f"reference embeddings of {model} must be a finite [n, D] array")
    _check_meta(mask.meta, bad)


def _check_meta(meta: dict, bad) -> None:
    """No file paths of the user's photos in the metadata (it travels with the mask)."""
    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, Path) or (isinstance(value, str) and _ABSOLUTE_PATH.match(value)):
            raise bad("metadata must not hold file paths")

    walk(meta)
