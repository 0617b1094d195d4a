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
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.pipeline.presets import ENROLL_MAX_EPS, ENROLL_MAX_MASKS

if TYPE_CHECKING:  # torch is imported once a file has passed the checks that need none (a refused file costs ~40 MB)
    import torch

FORMAT = "faceveil-mask"
VERSION = 2  # the newest format this faceveil reads
L2_PASTED_VERSION = 2  # from this version on an L2 budget is measured on what is pasted
HEADER = "faceveil-mask.json"
META = "meta.json"
MASKS = "masks.npy"
REFERENCE_DIR = "references/"
NORMS = ("linf", "l2")
MAX_ENTRIES = 64
# Bounds that refuse a crafted file (a zip bomb, an entry whose deflate stream outgrows its declared size) before
# it costs memory: every size is checked before anything is decompressed, each array's size follows from the shape
# in its own .npy header (read first, at most NPY_HEADER_BYTES), and every entry is read in chunks with a hard cap.
MAX_ARRAY_BYTES = 64 * 2**20  # all arrays together: ENROLL_MAX_MASKS masks are 25 MB, references a few MB
MAX_JSON_BYTES = 2**20  # the header and meta.json (a few KB in a real file)
MAX_JSON_DEPTH = 32  # a real meta.json nests 3 deep: deeper is refused before it is parsed (no RecursionError)
MAX_EMBEDDING_DIM = 4096  # the zoo's embeddings have 128-1024 values
NPY_HEADER_BYTES = 4096  # np.save writes 128
READ_CHUNK = 2**20
COMPRESSED_CHUNK = 2**16  # compressed bytes read at a time: zeros inflate ~1000x, and max_length bounds that
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # zipfile decompresses the others without a size cap
_REFERENCE_ENTRY = re.compile(r"^references/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.npy$")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# A perturbation below half an 8-bit level everywhere rounds away on every photo: such a mask changes no pixel.
SMALLEST_VISIBLE = 0.5 / 255
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
    """Read and check a mask file; FaceveilError (one line) when it is missing, corrupt, foreign, newer, crafted to
    exhaust memory, or holds a mask the tool would not make (a budget above enroll's, a mask that changes no pixel)."""
    path = Path(path)
    if not path.is_file():
        raise FaceveilError(f"{path}: no such mask file")
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as raw:  # the directory; the entries' own bytes
            header = _header(archive, raw, path)
            infos = _payload_infos(archive, header["payload"], path)
            entries = {info.filename: _read_entry(raw, info, path) for info in infos}
    except FaceveilError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError, TypeError, MemoryError,
            RecursionError, NotImplementedError, RuntimeError) as exc:
        raise FaceveilError(f"{path}: not a readable faceveil mask file ({_short(exc)})") from None
    if _digest(entries) != header.get("sha256"):
        raise FaceveilError(f"{path}: mask file is corrupt (checksum mismatch)")
    try:
        mask = _decode(entries, path)
    except FaceveilError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
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


def _digest(entries: dict[str, bytes] | dict[str, bytearray]) -> str:
    sha = hashlib.sha256()
    for name, data in entries.items():
        encoded = name.encode()
        sha.update(len(encoded).to_bytes(8, "little") + encoded + len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


# ----------------------------------------------------------------------------------------------- reading


def _header(archive: zipfile.ZipFile, raw: BinaryIO, path: Path) -> dict:
    infos = archive.infolist()
    if HEADER not in archive.namelist():
        raise FaceveilError(f"{path}: not a faceveil mask file")
    if len(infos) > MAX_ENTRIES:
        raise FaceveilError(f"{path}: not a faceveil mask file (too many entries)")
    header = _json(_read_entry(raw, archive.getinfo(HEADER), path), HEADER, path)
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


def _payload_infos(archive: zipfile.ZipFile, payload: list[str], path: Path) -> list[zipfile.ZipInfo]:
    """The payload's zip entries, every size checked from the archive's directory before anything is decompressed."""
    unknown = [n for n in payload if n not in (META, MASKS) and not _REFERENCE_ENTRY.match(n)]
    if unknown:
        raise FaceveilError(f"{path}: mask file header lists an unknown entry {unknown[0][:80]!r}")
    infos = [archive.getinfo(name) for name in payload]
    arrays = sum(info.file_size for info in infos if info.filename != META)
    if arrays > MAX_ARRAY_BYTES:
        raise FaceveilError(f"{path}: refused: its arrays would take {arrays / 2**20:.0f} MB, more than any faceveil "
                            f"mask file holds ({MAX_ARRAY_BYTES // 2**20} MB)")
    return infos


def _read_entry(raw: BinaryIO, info: zipfile.ZipInfo, path: Path) -> bytearray:
    """An entry's bytes, never more than the size known before reading: a JSON entry's declared size (at most
    MAX_JSON_BYTES), an array's from the shape in its .npy header, which must agree with the declared size."""
    name = info.filename
    if info.compress_type not in _COMPRESSIONS or info.flag_bits & 0x1:
        raise FaceveilError(f"{path}: refused: entry {name} is encrypted or compressed with an unsupported method")
    stream = _Inflated(raw, info)
    if not name.endswith(".npy"):
        if info.file_size > MAX_JSON_BYTES:
            raise FaceveilError(f"{path}: refused: entry {name} declares {info.file_size} bytes, more than any "
                                f"faceveil mask file holds ({MAX_JSON_BYTES})")
        return _read_into(stream, bytearray(info.file_size), 0)
    counted = _Counted(stream, NPY_HEADER_BYTES)
    shape = _npy_shape(counted, name)
    size = len(counted.taken) + 4 * math.prod(shape)
    if size != info.file_size:
        raise FaceveilError(f"{path}: refused: entry {name} declares {info.file_size} bytes, its array shape "
                            f"{list(shape)} takes {size}")
    data = bytearray(size)
    data[:len(counted.taken)] = counted.taken
    return _read_into(stream, data, len(counted.taken))


def _read_into(stream: _Inflated, data: bytearray, start: int) -> bytearray:
    """Fill data[start:] from the stream, which must end exactly there."""
    view = memoryview(data)
    position = start
    while position < len(data):
        chunk = stream.read(len(data) - position)
        view[position:position + len(chunk)] = chunk
        position += len(chunk)
    stream.finish()
    return data


class _Inflated:
    """An entry's bytes decompressed straight from the archive file, at most READ_CHUNK at a time and never past the
    size the entry declares: a deflate stream that holds more is refused on its first byte too many, one that holds
    less when it ends, one whose bytes differ by their CRC-32. (zipfile's reader would stop at the declared size and
    accept the rest unread; bzip2 and lzma it decompresses without any cap, so they are not read at all.)"""

    def __init__(self, raw: BinaryIO, info: zipfile.ZipInfo):
        raw.seek(info.header_offset)
        fixed = raw.read(zipfile.sizeFileHeader)
        if len(fixed) != zipfile.sizeFileHeader or fixed[:4] != zipfile.stringFileHeader:
            raise zipfile.BadZipFile(f"entry {info.filename} has no local header")
        name_length, extra_length = struct.unpack("<HH", fixed[26:30])
        if raw.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise zipfile.BadZipFile(f"entry {info.filename} is named otherwise in its local header")
        raw.seek(extra_length, 1)
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise zipfile.BadZipFile(f"stored entry {info.filename} declares two sizes")
        self.raw, self.info, self.crc = raw, info, 0
        self.compressed_left, self.left = info.compress_size, info.file_size
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
        self.pending = b""  # compressed bytes read but not yet inflated

    def read(self, size: int) -> bytes:
        """1..min(size, READ_CHUNK) bytes of the entry; ValueError when it ends before its declared size."""
        size = min(size, READ_CHUNK, self.left)
        data = self._take(size) if size > 0 else b""
        if not data:
            raise ValueError(f"entry {self.info.filename} ends after {self.info.file_size - self.left} of the "
                             f"{self.info.file_size} bytes it declares")
        self.left -= len(data)
        self.crc = zlib.crc32(data, self.crc)
        return data

    def finish(self) -> None:
        """After the declared size: the stream must end here, and its CRC-32 match."""
        if self.inflater is not None and self._take(1):
            raise ValueError(f"entry {self.info.filename}'s deflate stream holds more than the "
                             f"{self.info.file_size} bytes it declares")
        if self.crc != self.info.CRC:
            raise zipfile.BadZipFile(f"bad CRC-32 for entry {self.info.filename}")

    def _take(self, size: int) -> bytes:
        """Up to `size` bytes: raw for a stored entry, inflated for a deflated one (b"" at the stream's end)."""
        if self.inflater is None:
            return self._compressed(size)
        while not self.inflater.eof:
            if not self.pending:
                self.pending = self._compressed(COMPRESSED_CHUNK)
                if not self.pending:  # the archive's bytes are used up: only what zlib still holds is left
                    return self.inflater.decompress(b"", size)
            data = self.inflater.decompress(self.pending, size)
            self.pending = self.inflater.unconsumed_tail
            if data:
                return data
        return b""

    def _compressed(self, size: int) -> bytes:
        data = self.raw.read(min(size, self.compressed_left))
        self.compressed_left -= len(data)
        return data


class _Counted:
    """A stream that keeps what was read from it and refuses to give more than `limit` bytes (a .npy header)."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.taken = stream, limit, bytearray()

    def read(self, size: int = -1) -> bytes:
        room = self.limit - len(self.taken)
        if size < 0 or size > room:
            raise ValueError(f"a .npy header longer than {self.limit} bytes")
        data = self.stream.read(size)
        self.taken += data
        return data


def _npy_shape(stream: _Counted, name: str, side: int | None = None) -> tuple[int, ...]:
    """The shape in a .npy header, which must be a C-order little-endian float32 array of the entry's kind:
    masks [1..ENROLL_MAX_MASKS, 3, S, S] (S = `side` when given: the canonical size is known once torch is imported,
    which a file refused for its sizes never costs), references [n >= 1, 1..MAX_EMBEDDING_DIM]."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{name} has an unsupported .npy version {version}")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(stream, max_header_size=NPY_HEADER_BYTES)
    if dtype != np.dtype("<f4") or fortran_order:
        raise ValueError(f"{name} is {dtype}{' (Fortran order)' if fortran_order else ''}, not float32")
    if name == MASKS:
        square = len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] and (side is None or shape[2] == side)
        if not square or not 1 <= shape[0] <= ENROLL_MAX_MASKS:
            raise ValueError(f"{name} has shape {list(shape)}, not [1..{ENROLL_MAX_MASKS}, 3, {side or 'S'}, "
                             f"{side or 'S'}]")
    elif len(shape) != 2 or shape[0] < 1 or not 1 <= shape[1] <= MAX_EMBEDDING_DIM:
        raise ValueError(f"{name} has shape {list(shape)}, not [n, 1..{MAX_EMBEDDING_DIM}]")
    if 4 * math.prod(shape) > MAX_ARRAY_BYTES:
        raise ValueError(f"{name} has shape {list(shape)}, larger than any faceveil mask file holds")
    return tuple(int(n) for n in shape)


def _json(data: bytes | bytearray, name: str, path: Path):
    """JSON of an entry, its nesting measured before it is parsed (a deeply nested document would exhaust the
    parser's recursion: refused in one line instead)."""
    depth = _json_depth(bytes(data))
    if depth > MAX_JSON_DEPTH:
        raise FaceveilError(f"{path}: refused: {name} nests {depth} levels deep (a faceveil mask file nests at most "
                            f"{MAX_JSON_DEPTH})")
    return json.loads(data)


def _json_depth(data: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, outside its strings (linear time, no recursion)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    return int(np.cumsum(opens.astype(np.int8) - closes, dtype=np.int32).max(initial=0))


def _array(data: bytearray, name: str) -> torch.Tensor:
    """The float32 array of a checked .npy entry, over the entry's own bytes (no copy)."""
    import torch

    from faceveil.detect.canonical import CANONICAL_SIZE

    counted = _Counted(io.BytesIO(data), NPY_HEADER_BYTES)
    shape = _npy_shape(counted, name, side=CANONICAL_SIZE)
    return torch.from_numpy(np.frombuffer(data, np.float32, offset=len(counted.taken)).reshape(shape))


def _decode(entries: dict[str, bytearray], path: Path) -> PersonMask:
    doc = _json(entries[META], META, path)
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
    import torch

    from faceveil.attacks.budgets import pasted_l2
    from faceveil.detect.canonical import CANONICAL, CANONICAL_SIZE, face_mask

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
    if masks.shape[0] > ENROLL_MAX_MASKS:
        raise bad(f"{masks.shape[0]} masks, more than enroll makes ({ENROLL_MAX_MASKS})")
    # The checksum proves no origin: a budget above the largest enroll makes is refused, so that a tampered file
    # cannot paint a pattern over a face (eps in [0, 1] pixel units; L2 in canonical pixels).
    largest = largest_eps(mask.norm)
    if not (math.isfinite(mask.eps) and 0 < mask.eps <= largest * (1 + BUDGET_TOLERANCE)):
        raise bad(f"{mask.norm} eps {mask.eps:.5f} is not in (0, {largest:.5f}]: above the largest budget faceveil "
                  f"makes ({user_eps_text(mask.norm)})")
    # an L2 budget is measured on what is pasted (the mask times the face mask): outside it nothing reaches a photo
    size = masks.flatten(1).abs().amax(1) if mask.norm == "linf" else pasted_l2(masks)
    if float(size.max()) > mask.eps * (1 + BUDGET_TOLERANCE) + 1e-7:
        raise bad(f"a mask exceeds its {mask.norm} budget {mask.eps:.5f} ({float(size.max()):.5f})")
    peaks = (masks * face_mask()).flatten(1).abs().amax(1)
    if float(peaks.min()) < SMALLEST_VISIBLE:
        raise bad(f"mask {int(peaks.argmin())} changes no pixel (its largest pasted value, "
                  f"{float(peaks.min()) * 255:.3g}/255, rounds away on every photo): it protects nothing")
    for model, embeddings in mask.references.items():
        if embeddings.dim() != 2 or embeddings.shape[0] < 1 or not torch.isfinite(embeddings).all():
            raise bad(f"reference embeddings of {model} must be a finite [n, D] array")
    _check_meta(mask.meta, bad)


def largest_eps(norm: str) -> float:
    """The largest budget enroll makes (ENROLL_MAX_EPS) in a mask file's units: L-inf in [0, 1] pixels, L2 in
    canonical pixels (the user's L2 is at the 112-crop scale, each canonical pixel 1/CANONICAL_ZOOM of one)."""
    from faceveil.detect.canonical import CANONICAL_ZOOM

    return ENROLL_MAX_EPS[norm] / 255 * (CANONICAL_ZOOM if norm == "l2" else 1)


def user_eps_text(norm: str) -> str:
    unit = "/255 L-inf" if norm == "linf" else " L2 on 0..255 at 112x112x3"
    return f"{ENROLL_MAX_EPS[norm]:g}{unit}"


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
