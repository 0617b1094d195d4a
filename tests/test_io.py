"""faceveil.io images / paths / atomic: a fuzz corpus made here (nothing committed), metadata, atomicity."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.images import KEEP, Photo, exif_for_output, read_image, write_image
from faceveil.io.paths import output_path_for

GPS = ExifTags.IFD.GPSInfo


# ----------------------------------------------------------------------------------------------- makers


def _pixels(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient with some noise: compresses like a photo, survives JPEG recognisably."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=2)
    return np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bytes(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so the header can claim anything (16-bit, 20000x20000 ...)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _png16(path: Path, channels: int) -> np.ndarray:
    values = (np.arange(8 * 8 * channels, dtype=np.uint32) * 997 % 65536).astype(">u2")
    values = values.reshape(8, 8, channels)
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(8))
    path.write_bytes(_png_bytes(8, 8, 16, {3: 2, 4: 6}[channels], rows))
    return values.astype(np.uint16)


def _gps_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "TestCam"
    exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(GPS)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 12.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 39.0)
    return exif


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_corpus(folder: Path) -> dict[str, str]:
    """Write every awkward input we can think of; returns name -> 'ok' | 'error' (expected outcome)."""
    rgb = _pixels()
    good = folder / "good.jpg"
    Image.fromarray(rgb).save(good, quality=90)
    data = good.read_bytes()
    expect: dict[str, str] = {"good.jpg": "ok"}

    def put(
        name: str, outcome: str, raw: bytes | None = None, image: Image.Image | None = None, **save: object
    ) -> None:
        if raw is not None:
            (folder / name).write_bytes(raw)
        elif image is not None:
            image.save(folder / name, **save)
        expect[name] = outcome

    put("truncated.jpg", "error", raw=data[: len(data) // 2])
    put("truncated_tail.jpg", "error", raw=data[:-40])
    put("empty.jpg", "error", raw=b"")
    put("text.jpg", "error", raw=b"this is not a picture\n" * 20)
    put("random.png", "error", raw=b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(500))
    put("bomb.png", "error", raw=_png_bytes(20000, 20000, 8, 2, b"\x00" * 64))
    put("hundred_mp.png", "error", raw=_png_bytes(10000, 10000, 8, 0, b"\x00" * 64))
    png = _png_bytes(64, 48, 8, 2, b"".join(b"\x00" + rgb[y].tobytes() for y in range(48)))
    put("truncated.png", "error", raw=png[: len(png) // 2])
    put("one_pixel.png", "ok", image=Image.new("RGB", (1, 1), (200, 10, 10)))
    put("one_pixel.jpg", "ok", image=Image.new("RGB", (1, 1), (200, 10, 10)))
    put("cmyk.jpg", "ok", image=Image.fromarray(rgb).convert("CMYK"))
    put("cmyk.tif", "ok", image=Image.fromarray(rgb).convert("CMYK"))
    _png16(folder / "rgb16.png", 3)
    _png16(folder / "rgba16.png", 4)
    expect.update({"rgb16.png": "ok", "rgba16.png": "ok"})
    gray16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    put("gray16.png", "ok", image=Image.fromarray(gray16))
    put("rgba.png", "ok", image=Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])))
    palette = Image.fromarray(rgb).quantize(16)
    put("palette.png", "ok", image=palette)
    put("palette_transparent.png", "ok", image=palette, transparency=0)
    put("gray.png", "ok", image=Image.fromarray(rgb[:, :, 0]))
    put("gray_alpha.png", "ok", image=Image.fromarray(rgb[:, :, :2].copy(), "LA"))
    put("bilevel.png", "ok", image=Image.fromarray(rgb[:, :, 0] > 128))
    put("int32.tif", "ok", image=Image.fromarray(rgb[:, :, 0].astype(np.int32) * 200))
    put("float.tif", "ok", image=Image.fromarray(rgb[:, :, 0].astype(np.float32) / 255.0))
    put("rotated6.jpg", "ok", image=Image.fromarray(rgb), exif=_gps_exif(orientation=6), quality=95)
    put("lossy.webp", "ok", image=Image.fromarray(rgb), quality=90)
    put("lossless.webp", "ok", image=Image.fromarray(rgb), lossless=True)
    put("plain.bmp", "ok", image=Image.fromarray(rgb))
    put("plain.tif", "ok", image=Image.fromarray(rgb))
    put("still.gif", "ok", image=palette)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    put("animated.gif", "error", image=frames[0], save_all=True, append_images=frames[1:])
    put("animated.png", "error", image=frames[0], save_all=True, append_images=frames[1:])
    put("animated.webp", "error", image=frames[0], save_all=True, append_images=frames[1:])
    put("multipage.tif", "error", image=frames[0], save_all=True, append_images=frames[1:])
    put("multi_picture.jpg", "ok", image=frames[0], format="MPO", save_all=True, append_images=frames[1:])
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, _make_corpus(folder)


# ----------------------------------------------------------------------------------------------- reading


def test_corpus_reads_or_refuses_cleanly_and_leaves_files_alone(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expect = corpus
    before = {name: _sha(folder / name) for name in expect}
    for name, outcome in expect.items():
        path = folder / name
        if outcome == "ok":
            photo = read_image(path)
            assert photo.rgb.dtype == np.uint8 and photo.rgb.ndim == 3 and photo.rgb.shape[2] == 3, name
            assert photo.rgb.flags.c_contiguous, name
            assert photo.alpha is None or photo.alpha.shape == photo.rgb.shape[:2], name
        else:
            with pytest.raises(FaceveilError) as caught:
                read_image(path)
            message = str(caught.value)
            assert "\n" not in message and "Traceback" not in message, (name, message)
            assert name in message, (name, message)
    assert {name: _sha(folder / name) for name in expect} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(expect)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("empty.jpg", "empty"),
        ("text.jpg", "not a supported image"),
        ("truncated.jpg", "truncated"),
        ("truncated_tail.jpg", "truncated"),
        ("truncated.png", "truncated"),
        ("bomb.png", "decompression bomb"),
        ("hundred_mp.png", "over the limit of 80 MP"),
        ("animated.gif", "animated"),
        ("animated.png", "animated"),
        ("animated.webp", "animated"),
        ("multipage.tif", "multi-page"),
    ],
)
def test_refusals_say_why(corpus: tuple[Path, dict[str, str]], name: str, words: str) -> None:
    with pytest.raises(FaceveilError, match=words):
        read_image(corpus[0] / name)


def test_bomb_header_is_refused_before_decoding(corpus: tuple[Path, dict[str, str]]) -> None:
    start = time.perf_counter()
    for name in ("bomb.png", "hundred_mp.png"):
        with pytest.raises(FaceveilError):
            read_image(corpus[0] / name)
    assert time.perf_counter() - start < 1.0
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global left as it was


def test_pixel_limit_is_configurable(corpus: tuple[Path, dict[str, str]]) -> None:
    with pytest.raises(FaceveilError, match="over the limit"):
        read_image(corpus[0] / "good.jpg", max_pixels=1000)
    # Allowed by a higher limit, the 100 MP header gets as far as decoding, which finds the data missing.
    with pytest.raises(FaceveilError, match="truncated"):
        read_image(corpus[0] / "hundred_mp.png", max_pixels=200_000_000)
    assert Image.MAX_IMAGE_PIXELS == 89478485


def test_modes_convert_to_rgb(corpus: tuple[Path, dict[str, str]]) -> None:
    folder = corpus[0]
    one = read_image(folder / "one_pixel.png")
    assert one.rgb.shape == (1, 1, 3) and one.rgb[0, 0].tolist() == [200, 10, 10]
    assert read_image(folder / "cmyk.jpg").notes == ("CMYK converted to RGB",)
    gray = read_image(folder / "gray.png")
    assert np.array_equal(gray.rgb[:, :, 0], gray.rgb[:, :, 2])
    assert read_image(folder / "bilevel.png").rgb.max() == 255
    assert read_image(folder / "int32.tif").notes  # stretched or scaled, and said so
    flt = read_image(folder / "float.tif")
    assert abs(int(flt.rgb.max()) - int(_pixels()[:, :, 0].max())) <= 1
    assert read_image(folder / "palette.png").alpha is None
    assert read_image(folder / "palette_transparent.png").alpha is not None
    assert read_image(folder / "gray_alpha.png").alpha is not None
    assert read_image(folder / "still.gif").format == "GIF"
    multi = read_image(folder / "multi_picture.jpg")
    assert multi.format == "MPO" and "first" in multi.notes[0]


def test_sixteen_bit_is_scaled_and_noted(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    values = _png16(tmp_path / "x.png", 3)
    photo = read_image(tmp_path / "x.png")
    assert "16-bit image reduced to 8-bit" in photo.notes
    assert np.abs(photo.rgb.astype(int) - values.astype(int) / 257).max() <= 1
    gray = read_image(corpus[0] / "gray16.png")
    assert "16-bit image reduced to 8-bit" in gray.notes
    assert gray.rgb.max() == round((48 * 64 - 1) * 21 / 257)
    rgba = read_image(corpus[0] / "rgba16.png")
    assert rgba.alpha is not None and "16-bit image reduced to 8-bit" in rgba.notes


def test_exif_orientation_is_applied(corpus: tuple[Path, dict[str, str]]) -> None:
    photo = read_image(corpus[0] / "rotated6.jpg")
    assert photo.rgb.shape == (64, 48, 3)  # 64 wide x 48 high, turned a quarter clockwise
    rotated = np.rot90(_pixels(), k=-1)
    assert np.abs(photo.rgb.astype(int) - rotated.astype(int)).mean() < 6
    assert photo.exif is not None


def test_webp_lossless_flag(corpus: tuple[Path, dict[str, str]]) -> None:
    assert read_image(corpus[0] / "lossless.webp").lossless
    assert not read_image(corpus[0] / "lossy.webp").lossless


def test_missing_and_folder_paths(tmp_path: Path) -> None:
    with pytest.raises(FaceveilError, match="no such file"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(FaceveilError, match="not a file"):
        read_image(tmp_path)


# ----------------------------------------------------------------------------------------------- writing


def _exif_of(path: Path) -> Image.Exif:
    with Image.open(path) as im:
        im.load()
        return im.getexif()


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_gps_is_stripped_by_default_and_kept_on_request(tmp_path: Path, ext: str) -> None:
    src = tmp_path / f"in.{ext}"
    Image.fromarray(_pixels()).save(src, exif=_gps_exif(orientation=6).tobytes())
    photo = read_image(src)
    assert photo.rgb.shape == (64, 48, 3)
    out = tmp_path / "out"
    out.mkdir()
    stripped = write_image(photo, output_path_for(src, out))
    exif = _exif_of(stripped)
    assert GPS not in exif and not exif.get_ifd(GPS) and ExifTags.Base.Make not in exif
    assert ExifTags.Base.Orientation not in exif
    kept = write_image(photo, out / f"kept.{ext}", keep_metadata=True)
    exif = _exif_of(kept)
    assert exif.get_ifd(GPS)[ExifTags.GPS.GPSLatitude] == (51.0, 30.0, 12.5)
    assert exif[ExifTags.Base.Make] == "TestCam"
    assert exif[ExifTags.Base.Orientation] == 1
    assert read_image(kept).rgb.shape == photo.rgb.shape  # not turned a second time


def test_icc_profile_is_preserved(tmp_path: Path) -> None:
    icc = _srgb_icc()
    src = tmp_path / "in.jpg"
    Image.fromarray(_pixels()).save(src, icc_profile=icc)
    photo = read_image(src)
    assert photo.icc_profile == icc
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("same", "png"):
        written = write_image(photo, output_path_for(src, out, fmt), fmt=fmt)
        with Image.open(written) as im:
            assert im.info.get("icc_profile") == icc
    dropped = write_image(photo, out / "none.jpg", icc_profile=None)
    with Image.open(dropped) as im:
        assert "icc_profile" not in im.info


def test_alpha_is_preserved_for_png_and_flattened_for_jpeg(tmp_path: Path) -> None:
    rgb = _pixels()
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    src = tmp_path / "in.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    photo = read_image(src)
    assert photo.alpha is not None and np.array_equal(photo.alpha, alpha)
    out = tmp_path / "out"
    out.mkdir()
    back = read_image(write_image(photo, output_path_for(src, out)))
    assert back.alpha is not None and np.array_equal(back.alpha, alpha) and np.array_equal(back.rgb, rgb)
    flat = read_image(write_image(photo, output_path_for(src, out, "jpg"), fmt="jpg"))
    assert flat.alpha is None and flat.rgb[:, 0].mean() > 240  # fully transparent column -> white


def test_same_format_is_default_and_pixels_survive(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for ext, fmt in (("png", "PNG"), ("bmp", "BMP"), ("tif", "TIFF"), ("webp", "WEBP"), ("jpg", "JPEG")):
        src = tmp_path / f"in.{ext}"
        Image.fromarray(_pixels()).save(src, **({"lossless": True} if ext == "webp" else {}))
        photo = read_image(src)
        written = write_image(photo.with_rgb(255 - photo.rgb), output_path_for(src, out))
        assert written.name == src.name
        with Image.open(written) as im:
            assert im.format == fmt
        back = read_image(written).rgb.astype(int)
        tolerance = 3 if fmt == "JPEG" else 0
        assert np.abs(back - (255 - photo.rgb.astype(int))).mean() <= tolerance, fmt


def test_write_bare_array_uses_extension(tmp_path: Path) -> None:
    path = write_image(_pixels(), tmp_path / "a.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(FaceveilError, match="unknown image extension"):
        write_image(_pixels(), tmp_path / "a.xyz")
    with pytest.raises(FaceveilError, match="does not match"):
        write_image(_pixels(), tmp_path / "a.png", fmt="jpg")


def test_atomic_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.png"
    write_image(_pixels(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    original = target.read_bytes()

    def half_then_fail(self: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_image(_pixels(seed=3), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert target.read_bytes() == original
    assert atomic.live_temp_files() == []


def test_atomic_file_mode_follows_umask(tmp_path: Path) -> None:
    path = write_image(_pixels(), tmp_path / "a.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK


def test_never_overwrites_the_input(tmp_path: Path) -> None:
    src = tmp_path / "in.jpg"
    Image.fromarray(_pixels()).save(src)
    before = _sha(src)
    with pytest.raises(FaceveilError, match="input's own folder"):
        output_path_for(src, tmp_path)
    with pytest.raises(FaceveilError, match="input's own folder"):
        output_path_for(src, tmp_path / "." / "sub" / "..")
    with pytest.raises(FaceveilError, match="overwrite the input"):
        write_image(read_image(src), src)
    assert _sha(src) == before


def test_output_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert output_path_for(tmp_path / "a.JPG", out) == out / "a.JPG"
    assert output_path_for(tmp_path / "a.JPG", out, "jpg") == out / "a.JPG"
    assert output_path_for(tmp_path / "a.jpeg", out, "png") == out / "a.png"
    assert output_path_for(tmp_path / "a.png", out, "jpg") == out / "a.jpg"
    assert output_path_for(tmp_path / "a.gif", out) == out / "a.png"
    assert output_path_for(tmp_path / "a.tiff", out) == out / "a.tiff"
    assert output_path_for(tmp_path / "clip.MOV", out) == out / "clip.mp4"
    nested = tmp_path / "x" / "y" / "a.png"
    assert output_path_for(nested, out, relative_to=tmp_path) == out / "x" / "y" / "a.png"
    with pytest.raises(FaceveilError, match="unknown output format"):
        output_path_for(tmp_path / "a.png", out, "gif")


def test_photo_validates_pixels() -> None:
    with pytest.raises(ValueError):
        Photo(rgb=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        Photo(rgb=np.zeros((4, 4, 3), np.uint8), alpha=np.zeros((3, 3), np.uint8))
    assert KEEP is not None


def test_kept_exif_drops_maker_note_and_layout_tags() -> None:
    exif = _gps_exif(orientation=8)
    exif[ExifTags.Base.ImageWidth] = 4000
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] = b"vendor preview bytes"
    kept = Image.Exif()
    kept.load(exif_for_output(exif.tobytes()) or b"")
    assert kept[ExifTags.Base.Orientation] == 1 and ExifTags.Base.ImageWidth not in kept
    assert ExifTags.Base.MakerNote not in kept.get_ifd(ExifTags.IFD.Exif)
    assert kept.get_ifd(GPS)[ExifTags.GPS.GPSLatitudeRef] == "N"
