"""Where outputs go: same file name in another folder, never over the input."""

from __future__ import annotations

import os
from pathlib import Path

from faceveil.errors import FaceveilError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm"})
JPEG_EXTS = frozenset({".jpg", ".jpeg", ".jpe"})
FORMAT_CHOICES = ("same", "png", "jpg")

# Extension used when the output format differs from the input's.
_EXT_FOR_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
# Format written for an input of this extension under fmt="same" (GIF: PNG, palette would destroy the mask).
_SAME_FORMAT_FOR_EXT = {
    **dict.fromkeys(JPEG_EXTS, "JPEG"), ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".gif": "PNG",
}
_EXTS_FOR_FORMAT = {
    "JPEG": JPEG_EXTS, "PNG": frozenset({".png"}), "WEBP": frozenset({".webp"}),
    "BMP": frozenset({".bmp"}), "TIFF": frozenset({".tif", ".tiff"}),
}


def is_image_path(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video_path(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def normalise_fmt(fmt: str) -> str:
    """'same' | 'png' | 'jpg' ('jpeg' accepted); anything else is a FaceveilError."""
    value = fmt.lower().strip()
    value = "jpg" if value == "jpeg" else value
    if value not in FORMAT_CHOICES:
        raise FaceveilError(f"unknown output format {fmt!r}: use one of {', '.join(FORMAT_CHOICES)}")
    return value


def target_format(fmt: str, same_as: str | None) -> str:
    """PIL format name for fmt ('same' uses `same_as`, a PIL format or an extension like '.gif')."""
    fmt = normalise_fmt(fmt)
    if fmt == "png":
        return "PNG"
    if fmt == "jpg":
        return "JPEG"
    if same_as is None:
        raise FaceveilError("output format 'same' needs an input format: pass fmt='png' or fmt='jpg'")
    if same_as.startswith("."):
        return _SAME_FORMAT_FOR_EXT.get(same_as.lower(), "PNG")
    return {"MPO": "JPEG", "GIF": "PNG"}.get(same_as.upper(), same_as.upper())


def extension_matches(path: Path, pil_format: str) -> bool:
    """True when `path` has an extension that belongs to `pil_format` (unknown formats: any)."""
    exts = _EXTS_FOR_FORMAT.get(pil_format)
    return exts is None or Path(path).suffix.lower() in exts


def ensure_safe_out_dir(input_path: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the input's own folder (outputs would sit beside, or over, inputs)."""
    in_dir = Path(input_path).resolve().parent
    out = Path(out_dir).resolve()
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
    sub = _relative_parent(input_path, relative_to)
    name = _output_name(input_path, fmt)
    out = out_dir / sub / name
    refuse_same_file(input_path, out)
    return out


def _relative_parent(input_path: Path, relative_to: Path | str | None) -> Path:
    if relative_to is None:
        return Path()
    try:
        return input_path.resolve().parent.relative_to(Path(relative_to).resolve())
    except ValueError:
        return Path()


def _output_name(input_path: Path, fmt: str) -> str:
    suffix = input_path.suffix
    if is_video_path(input_path):
        return input_path.name if suffix.lower() == ".mp4" else input_path.stem + ".mp4"
    pil_format = target_format(fmt, suffix.lower() if suffix else ".png")
    if extension_matches(input_path, pil_format):
        return input_path.name
    return input_path.stem + _EXT_FOR_FORMAT[pil_format]


def refuse_same_file(input_path: Path, out_path: Path) -> None:
    """FaceveilError when out_path is the input file (also through links)."""
    same = Path(input_path).resolve() == Path(out_path).resolve()
    if not same and Path(out_path).exists():
        try:
            same = os.path.samefile(input_path, out_path)
        except OSError:
            same = False
    if same:
        raise FaceveilError(f"refusing to overwrite the input {input_path}: choose another output folder")
