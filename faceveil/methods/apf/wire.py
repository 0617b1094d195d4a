"""The APF wire format: one float32 tensor, and nothing else, in an HTTP body.

APF's non-accessibility requirement (apf-mm2020 §1, §3.2) is that the photo never leaves the device: the client
sends only the image-specific gradient g and gets back only the noise s. So the format can carry exactly one
dense float32 tensor and has no room for anything else (no file name, no metadata, no free-form fields):

    body  = MAGIC (4 bytes, b"FVT1")
          + header length n (uint32, little-endian)
          + header (n bytes of UTF-8 JSON, exactly {"dtype": "float32", "shape": [B, 3, S, S]}, compact, sorted keys)
          + data (B*3*S*S*4 bytes: little-endian IEEE float32, C order)

Content-Type: application/x-faceveil-tensor. Requests and answers use the same format. A decoder refuses any
other key in the header, any other dtype, and any byte count other than exactly prefix + header + data.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch

from faceveil.errors import FaceveilError

MEDIA_TYPE = "application/x-faceveil-tensor"
MAGIC = b"FVT1"
DTYPE = "float32"
MAX_HEADER_BYTES = 256  # {"dtype":"float32","shape":[...]} is ~50 bytes: anything longer is not ours
_PREFIX = struct.Struct("<4sI")
PREFIX_BYTES = _PREFIX.size
_LITTLE_F32 = np.dtype("<f4")

# Leading bytes of the image formats a careless client (or a curious one) might upload instead of g.
IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "WebP/RIFF": (b"RIFF",),
    "JPEG 2000": (b"\x00\x00\x00\x0cjP  ",),
}
_ISO_BMFF_IMAGE_BRANDS = (b"heic", b"heix", b"mif1", b"avif", b"msf1")  # HEIC / AVIF: "....ftyp<brand>"


class WireError(FaceveilError):
    """A request the service refuses or cannot serve (malformed body, limits, busy); `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def header_bytes(shape: tuple[int, ...]) -> bytes:
    return json.dumps({"dtype": DTYPE, "shape": list(shape)}, separators=(",", ":"), sort_keys=True).encode()


def encoded_size(shape: tuple[int, ...]) -> int:
    """Exact body size for a tensor of this shape: prefix + header + 4 bytes per value."""
    return PREFIX_BYTES + len(header_bytes(shape)) + 4 * math.prod(shape)


def encode(tensor: torch.Tensor | np.ndarray) -> bytes:
    """One float32 tensor -> body bytes. Refuses other dtypes rather than converting: a uint8 image must never
    be turned into something this format would carry."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if array.dtype != np.float32:
        raise WireError(400, f"the wire carries float32 tensors only, got {array.dtype}")
    header = header_bytes(array.shape)
    data = np.ascontiguousarray(array, dtype=_LITTLE_F32).tobytes()
    return _PREFIX.pack(MAGIC, len(header)) + header + data


def image_signature(body: bytes) -> str | None:
    """The image format whose magic bytes start the body, if any."""
    for name, signatures in IMAGE_SIGNATURES.items():
        if any(body.startswith(s) for s in signatures):
            return name
    if body[4:8] == b"ftyp" and body[8:12] in _ISO_BMFF_IMAGE_BRANDS:
        return "HEIC/AVIF"
    return None


def decode(body: bytes) -> np.ndarray:
    """Body bytes -> the float32 array it carries (read-only view). Raises WireError (400/415/422)."""
    image = image_signature(body)
    if image is not None:
        raise WireError(415, f"this is a {image} image: images are never accepted (the photo stays on the "
                             f"device); send only the gradient g as {MEDIA_TYPE}")
    if len(body) < PREFIX_BYTES:
        raise WireError(400, f"body of {len(body)} bytes is too short for a {MEDIA_TYPE} tensor")
    magic, n = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise WireError(400, f"body does not start with the {MAGIC.decode()} magic of {MEDIA_TYPE}")
    if not 0 < n <= MAX_HEADER_BYTES or PREFIX_BYTES + n > len(body):
        raise WireError(400, f"header length {n} is out of range (1..{MAX_HEADER_BYTES}, within the body)")
    shape = _parse_header(body[PREFIX_BYTES:PREFIX_BYTES + n])
    data = memoryview(body)[PREFIX_BYTES + n:]
    expected = 4 * math.prod(shape)
    if len(data) != expected:
        raise WireError(400, f"shape {list(shape)} needs {expected} data bytes, the body has {len(data)}")
    return np.frombuffer(data, dtype=_LITTLE_F32).reshape(shape)


def _parse_header(raw: bytes) -> tuple[int, ...]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(400, f"header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"dtype", "shape"}:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise WireError(400, f'header must be exactly {{"dtype", "shape"}}, got {keys}')
    if header["dtype"] != DTYPE:
        raise WireError(422, f"dtype must be {DTYPE} (little-endian), got {str(header['dtype'])[:20]!r}")
    shape = header["shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape)):
        raise WireError(400, "shape must be a list of 1 to 8 positive integers")
    return tuple(shape)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A decoded (read-only) array as a writable float32 tensor."""
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
