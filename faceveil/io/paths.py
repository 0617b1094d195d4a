"""Where outputs go: same file name in another folder, never over the input."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from faceveil.errors import FaceveilError

JPEG_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
HEIF_EXTS = frozenset({".heic", ".heif", ".hif"})
IMAGE_EXTS = JPEG_EXTS | HEIF_EXTS | {".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif"}
VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm"})
FORMAT_CHOICES = ("same", "png", "jpg", "heic", "avif")
# The quality of lossy outputs (JPEG; HEIC, AVIF and lossy WebP take the same number): measured on the sample photos
# and LFW images to keep a file close to its input's size at the protection a lossless file gives
# (docs/benchmarks.md, "Photo formats"; faceveil.io.images writes them).
DEFAULT_JPEG_QUALITY = 85

# Extension used when the output format differs from the input's.
_EXT_FOR_FORMAT = {
    "JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic", "AVIF": ".avif", "BMP": ".bmp", "TIFF": ".tif",
}
# Format written for an input of this extension under fmt="same" (GIF: PNG, palette would destroy the mask).
_SAME_FORMAT_FOR_EXT = {
    **dict.fromkeys(JPEG_EXTS, "JPEG"), **dict.fromkeys(HEIF_EXTS, "HEIF"), ".png": "PNG", ".webp": "WEBP",
    ".avif": "AVIF", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "PNG",
}
_EXTS_FOR_FORMAT = {
    "JPEG": JPEG_EXTS, "PNG": frozenset({".png"}), "WEBP": frozenset({".webp"}), "HEIF": HEIF_EXTS,
    "AVIF": frozenset({".avif"}), "BMP": frozenset({".bmp"}), "TIFF": frozenset({".tif", ".tiff"}),
}
_FORMAT_FOR_CHOICE = {"png": "PNG", "jpg": "JPEG", "heic": "HEIF", "avif": "AVIF"}
# Why a file comes out in another format than it went in (reported per file).
_CONVERSION_REASON = {
    ".gif": "a GIF's 256-colour palette would destroy the mask",
    "video": "videos are written as H.264 mp4",
}


def is_image_path(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video_path(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def normalise_fmt(fmt: str) -> str:
    """'same' | 'png' | 'jpg' | 'heic' | 'avif' ('jpeg', 'heif' accepted); anything else is a FaceveilError."""
    value = fmt.lower().strip()
    value = {"jpeg": "jpg", "heif": "heic"}.get(value, value)
    if value not in FORMAT_CHOICES:
        raise FaceveilError(f"unknown output format {fmt!r}: use one of {', '.join(FORMAT_CHOICES)}")
    return value


def target_format(fmt: str, same_as: str | None) -> str:
    """PIL format name for fmt ('same' uses `same_as`, a PIL format or an extension like '.gif')."""
    fmt = normalise_fmt(fmt)
    if fmt in _FORMAT_FOR_CHOICE:
        return _FORMAT_FOR_CHOICE[fmt]
    if same_as is None:
        raise FaceveilError("output format 'same' needs an input format: pass fmt='png' or fmt='jpg'")
    if same_as.startswith("."):
        return _SAME_FORMAT_FOR_EXT.get(same_as.lower(), "PNG")
    return {"MPO": "JPEG", "GIF": "PNG"}.get(same_as.upper(), same_as.upper())


def extension_matches(path: Path, pil_format: str) -> bool:
    """True when `path` has an extension that belongs to `pil_format` (unknown formats: any)."""
    exts = _EXTS_FOR_FORMAT.get(pil_format)
    return exts is None or Path(path).suffix.lower() in exts


def safe_resolve(path: Path | str) -> Path:
    """The absolute path with links resolved as far as they go; a symbolic link loop (which Path.resolve turns into
    a RuntimeError) or an unreadable folder leaves the rest unresolved instead of failing."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def ensure_safe_out_dir(input_path: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the input's own folder (outputs would sit beside, or over, inputs)."""
    in_dir = safe_resolve(input_path).parent
    out = safe_resolve(out_dir)
    if out == in_dir:
        raise FaceveilError(
            f"output folder {out_dir} is the input's own folder ({Path(input_path).name}): choose another one"
        )


def output_path_for(
    input_path: Path | str, out_dir: Path | str, fmt: str = "same", *, relative_to: Path | str | None = None
) -> Path:
    """Output path: same file name under out_dir (sub-folders kept when relative_to is given).

    The extension changes only when the format does (jpg -> png, gif -> png, videos -> .mp4). Refuses
    out_dir equal to the input's folder and any path that is the input file itself.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    ensure_safe_out_dir(input_path, out_dir)
    out = out_dir / relative_output_path(input_path, fmt, relative_to=relative_to)
    refuse_same_file(input_path, out)
    return out


def relative_output_path(input_path: Path | str, fmt: str = "same", *,
                         relative_to: Path | str | None = None) -> Path:
    """The output's path inside the output folder: sub-folders below relative_to kept, the name changed only when
    the format is (see output_path_for)."""
    input_path = Path(input_path)
    return _relative_parent(input_path, relative_to) / _output_name(input_path, fmt)


def _relative_parent(input_path: Path, relative_to: Path | str | None) -> Path:
    if relative_to is None:
        return Path()
    # the folder as walked (a linked file keeps its place in the tree), else with links resolved
    for parent, root in ((Path(os.path.abspath(input_path)).parent, Path(os.path.abspath(relative_to))),
                         (safe_resolve(input_path).parent, safe_resolve(relative_to))):
        with contextlib.suppress(ValueError):
            return parent.relative_to(root)
    return Path()


def _output_name(input_path: Path, fmt: str) -> str:
    suffix = input_path.suffix
    if is_video_path(input_path):
        return input_path.name if suffix.lower() == ".mp4" else input_path.stem + ".mp4"
    pil_format = target_format(fmt, suffix.lower() if suffix else ".png")
    if extension_matches(input_path, pil_format):
        return input_path.name
    return input_path.stem + _EXT_FOR_FORMAT[pil_format]


def conversion(input_path: Path | str, output_path: Path | str | None, fmt: str = "same") -> str | None:
    """'gif -> png: why', when the output file's type differs from the input's (None when it is the same, or
    nothing was written). fmt is what was asked for, so that a conversion the user chose says so."""
    if output_path is None:
        return None
    source, written = Path(input_path).suffix.lower(), Path(output_path).suffix.lower()
    same_kind = _SAME_FORMAT_FOR_EXT.get(source, source) == _SAME_FORMAT_FOR_EXT.get(written, written)
    if source == written or (same_kind and source != ".gif"):
        return None
    if is_video_path(Path(input_path)):
        why = _CONVERSION_REASON["video"]
    elif normalise_fmt(fmt) != "same":
        why = f"--format {normalise_fmt(fmt)} asked for"
    else:
        why = _CONVERSION_REASON.get(source, "this format cannot be written")
    return f"{source.lstrip('.') or 'no extension'} -> {written.lstrip('.')}: {why}"


def refuse_same_file(input_path: Path, out_path: Path) -> None:
    """FaceveilError when out_path is the input file (also through links)."""
    same = safe_resolve(input_path) == safe_resolve(out_path)
    if not same and Path(out_path).exists():
        try:
            same = os.path.samefile(input_path, out_path)
        except OSError:
            same = False
    if same:
        raise FaceveilError(f"refusing to overwrite the input {input_path}: choose another output folder")


def prepare_output_folder(out_dir: Path | str) -> Path:
    """Create the output folder if needed and prove it can be written (a temp file made and removed), before any
    work is done: a read-only folder must not cost a whole batch's compute. FaceveilError with one line if not."""
    from faceveil.io import atomic

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FaceveilError(f"output {out_dir} is a file, not a folder: name a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise FaceveilError(f"cannot create the output folder {out_dir}: permission denied") from None
    except OSError as exc:
        raise FaceveilError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from None
    atomic.discard(atomic.temp_path_for(out_dir / "write-test"))
    return out_dir
