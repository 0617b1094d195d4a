"""Crafted .fvmask files (issue 24, items 11-13): a mask file is meant to be shared between devices, so a file made
by someone else must cost neither memory (zip bombs, deflate streams that lie about their size) nor a face (a
tampered budget or a mask that protects nothing, with its checksum recomputed), nor crash the parser (deep JSON).
Every file here is crafted by the test, byte by byte where zipfile would refuse to write it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceveil.cli.main import main
from faceveil.errors import FaceveilError
from faceveil.pipeline import maskfile
from faceveil.pipeline.maskfile import PersonMask, load_mask, save_mask
from faceveil.pipeline.person import enroll_settings

MB = 2**20
ONE_MASK_SHAPE = (1, 3, 256, 256)
PEAK_LIMIT_BYTES = 300 * MB  # issue 24: a bomb is refused under 300 MB of a real process
READ_PEAK_LIMIT = 8 * MB  # what refusing a bomb may allocate in-process (a few chunks of READ_CHUNK)


def _mask(eps: float = 8 / 255, norm: str = "linf", values: torch.Tensor | None = None) -> PersonMask:
    gen = torch.Generator().manual_seed(0)
    if values is None:
        values = (torch.rand(*ONE_MASK_SHAPE, generator=gen) * 2 - 1) * eps
    refs = {"mobileface": torch.randn(3, 256, generator=gen)}
    return PersonMask(name="Ada", masks=values, geometry="canonical", method="opom-convex",
                      surrogates=["mobileface"], eps=eps, norm=norm, references=refs, meta={"seed": 0})


def _entries(mask: PersonMask, tmp: Path) -> dict[str, bytes]:
    """The payload entries of a genuine file (as save_mask writes them), header left out."""
    save_mask(mask, tmp / "genuine.fvmask")
    with zipfile.ZipFile(tmp / "genuine.fvmask") as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    del entries[maskfile.HEADER]
    return entries


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _deflated_zeros(prefix: bytes, zeros: int) -> bytes:
    """A raw deflate stream of prefix + `zeros` zero bytes, built in milliseconds: after a full flush deflate forgets
    its history, so the compressed block of 1 MB of zeros can be repeated as is."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(b"\0" * MB) + deflate.flush(zlib.Z_FULL_FLUSH)
    return head + block * (zeros // MB) + deflate.compress(bytes(zeros % MB)) + deflate.flush()


@dataclasses.dataclass
class RawEntry:
    name: str
    stream: bytes  # as stored in the archive (raw deflate for method 8)
    size: int  # the uncompressed size the archive declares
    crc: int
    method: int = zipfile.ZIP_DEFLATED


def _raw(name: str, data: bytes) -> RawEntry:
    """An honest deflated entry."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    return RawEntry(name, deflate.compress(data) + deflate.flush(), len(data), zlib.crc32(data))


def _write_zip(path: Path, entries: list[RawEntry]) -> None:
    """A zip archive written by hand (local headers, central directory, end record), so that an entry may declare
    any size and CRC."""
    body, directory = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, e.method, 0, 0x21, e.crc, len(e.stream), e.size, len(name), 0)
        directory += struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(body)) + name
        body += struct.pack("<I", 0x04034B50) + fields + name + e.stream
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))


def _header(payload: dict[str, bytes], **edit) -> RawEntry:
    """The header entry with the sha256 a tamperer recomputes over the payload he wrote."""
    doc = {"format": maskfile.FORMAT, "version": 1, "payload": list(payload), "sha256": maskfile._digest(payload)}
    return _raw(maskfile.HEADER, json.dumps({**doc, **edit}).encode())


def _retampered(tmp: Path, name: str, **replace: bytes) -> Path:
    """A genuine file with entries replaced and its checksum recomputed: the checksum proves nothing about origin."""
    payload = {**_entries(_mask(), tmp), **replace}
    path = tmp / name
    _write_zip(path, [_header(payload)] + [_raw(n, v) for n, v in payload.items()])
    return path


def _refused_within(path: Path, match: str, limit: int = READ_PEAK_LIMIT) -> int:
    """load_mask refuses the file in one line naming it, allocating at most `limit` bytes on the way; the peak."""
    tracemalloc.start()
    try:
        with pytest.raises(FaceveilError, match=match) as info:
            load_mask(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert peak < limit, f"refusing {path.name} allocated {peak / MB:.1f} MB"
    return peak


# ----------------------------------------------------------------------------------------------- crafted files


def _bomb_of_zeros(tmp: Path) -> Path:
    """Item 11: 8 entries of 250 MB of zeros each (~2 MB on disk), every size declared honestly."""
    meta = _entries(_mask(), tmp)[maskfile.META]
    zeros = RawEntry("", _deflated_zeros(b"", 250 * MB), 250 * MB, 0)
    names = [maskfile.MASKS] + [f"references/m{i}.npy" for i in range(7)]
    payload = {maskfile.META: meta, **{n: b"" for n in names}}
    entries = [_header(payload), _raw(maskfile.META, meta)]
    entries += [dataclasses.replace(zeros, name=n) for n in names]
    path = tmp / "zeros.fvmask"
    _write_zip(path, entries)
    assert path.stat().st_size < 3 * MB
    return path


def _lying_stream(tmp: Path, declared: int | None = None, zeros: int = 2000 * MB) -> Path:
    """Item 11: masks.npy declares the size (and the CRC) of one mask of zeros, but its deflate stream goes on to
    2 GB; its sha256 is recomputed over what it declares."""
    header = _npy_header(ONE_MASK_SHAPE)
    honest = header + bytes(4 * int(np.prod(ONE_MASK_SHAPE)))
    declared = len(honest) if declared is None else declared
    payload = {**_entries(_mask(), tmp), maskfile.MASKS: honest[:declared]}
    entries = [_header(payload)]
    for name, value in payload.items():
        if name == maskfile.MASKS:
            entries.append(RawEntry(name, _deflated_zeros(header, zeros), declared, zlib.crc32(honest[:declared])))
        else:
            entries.append(_raw(name, value))
    path = tmp / f"lying-{declared}.fvmask"
    _write_zip(path, entries)
    assert path.stat().st_size < 3 * MB
    return path


def _npy_shaped_bomb(tmp: Path, name: str, shape: tuple[int, ...]) -> Path:
    """An array entry whose own .npy header (and declared size) says `shape`, filled with zeros."""
    header = _npy_header(shape)
    size = len(header) + 4 * int(np.prod(shape))
    payload = _entries(_mask(), tmp)
    payload[name] = header + bytes(size - len(header))  # honest sizes, CRC and checksum: only the shape is foreign
    entries = [_header(payload)]
    for n, value in payload.items():
        if n == name:
            crc = zlib.crc32(value)
            entries.append(RawEntry(n, _deflated_zeros(header, size - len(header)), size, crc))
        else:
            entries.append(_raw(n, value))
    path = tmp / f"shaped-{len(shape)}.fvmask"
    _write_zip(path, entries)
    return path


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _grid(value: float) -> torch.Tensor:
    """A white grid (every 8th row and column at +value), the pattern a tamperer paints over a face."""
    grid = torch.zeros(*ONE_MASK_SHAPE)
    grid[..., ::8, :] = value
    grid[..., :, ::8] = value
    return grid


# ----------------------------------------------------------------------------------------------- item 11: bombs


def test_a_bomb_of_zeros_is_refused_before_anything_is_decompressed(tmp_path: Path) -> None:
    _refused_within(_bomb_of_zeros(tmp_path), "refused: its arrays would take 2000 MB, more than any faceveil mask",
                    limit=MB)


def test_a_deflate_stream_that_outgrows_its_declared_size_costs_one_mask_not_2_gb(tmp_path: Path) -> None:
    """zipfile would stop at the declared size and accept the rest unread: the reader refuses the stream on its first
    byte past the declared size, having inflated at most one mask."""
    _refused_within(_lying_stream(tmp_path), "masks.npy's deflate stream holds more than the 786560 bytes it declares")


def test_an_entry_whose_declared_size_disagrees_with_its_shape_is_refused_before_it_is_read(tmp_path: Path) -> None:
    _refused_within(_lying_stream(tmp_path, declared=1000),
                    r"masks.npy declares 1000 bytes, its array shape \[1, 3, 256, 256\] takes 786560", limit=MB)


def test_an_entry_shorter_than_it_declares_is_refused(tmp_path: Path) -> None:
    path = _lying_stream(tmp_path, zeros=0)  # the stream ends after the .npy header
    _refused_within(path, "not a readable faceveil mask file")


@pytest.mark.parametrize(("entry", "shape", "message"), [
    (maskfile.MASKS, (33, 3, 256, 256), r"masks.npy has shape \[33, 3, 256, 256\], not \[1..32"),
    (maskfile.MASKS, (1, 3, 80, 96), r"masks.npy has shape \[1, 3, 80, 96\]"),
    (maskfile.MASKS, (1, 3, 512, 512), r"masks.npy has shape \[1, 3, 512, 512\], not \[1..32, 3, 256, 256\]"),
    ("references/mobileface.npy", (10, 8192), r"has shape \[10, 8192\], not \[n, 1..4096\]"),
])
def test_an_array_of_a_shape_no_faceveil_file_holds_is_refused_from_its_header(tmp_path: Path, entry, shape,
                                                                              message) -> None:
    _refused_within(_npy_shaped_bomb(tmp_path, entry, shape), message)


def test_compression_methods_zipfile_cannot_cap_are_refused(tmp_path: Path) -> None:
    payload = _entries(_mask(), tmp_path)
    path = tmp_path / "bzip2.fvmask"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(maskfile.HEADER, json.dumps({"format": maskfile.FORMAT, "version": 1,
                                                      "payload": list(payload), "sha256": maskfile._digest(payload)}))
        for name, value in payload.items():
            archive.writestr(name, value, compress_type=zipfile.ZIP_BZIP2)
    _refused_within(path, "compressed with an unsupported method")


def test_an_oversized_json_entry_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = _retampered(tmp_path, "big-meta.fvmask", **{maskfile.META: b" " * (maskfile.MAX_JSON_BYTES + 1)})
    _refused_within(path, "entry meta.json declares 1048577 bytes", limit=MB)


# ----------------------------------------------------------------------------------------------- item 12: tampering


def test_a_budget_above_what_enroll_makes_is_refused_even_with_a_recomputed_checksum(tmp_path: Path) -> None:
    """eps 1.0 and a white grid: the grid would be painted over the face. The checksum is the tamperer's own."""
    painted = dataclasses.replace(_mask(), eps=1.0, masks=_grid(1.0))
    grid = {maskfile.META: maskfile._meta_bytes(painted), maskfile.MASKS: maskfile._npy_bytes(_grid(1.0))}
    path = _retampered(tmp_path, "grid.fvmask", **grid)
    with pytest.raises(FaceveilError, match=r"linf eps 1.00000 is not in \(0, 0.06275\]: above the largest budget "
                                            r"faceveil makes \(16/255 L-inf\)"):
        load_mask(path)


def test_l2_budgets_are_capped_at_twice_advcloaks(tmp_path: Path) -> None:
    from faceveil.attacks.budgets import onto_pasted_l2

    cap = maskfile.largest_eps("l2")
    for eps, loads in ((cap, True), (cap * 1.5, False)):
        mask = dataclasses.replace(_mask(), norm="l2", eps=eps, masks=onto_pasted_l2(_mask().masks, eps))
        path = _retampered(tmp_path, f"l2-{loads}.fvmask", **{maskfile.META: maskfile._meta_bytes(mask),
                                                              maskfile.MASKS: maskfile._npy_bytes(mask.masks)})
        if loads:
            assert load_mask(path).eps == pytest.approx(cap)
        else:
            with pytest.raises(FaceveilError, match=r"above the largest budget faceveil makes \(2400 L2"):
                load_mask(path)


def test_a_grid_within_enrolls_budget_still_loads(tmp_path: Path) -> None:
    """The cap is what the tool itself makes: a file at 16/255 is one enroll could write."""
    mask = dataclasses.replace(_mask(), eps=16 / 255, masks=_grid(16 / 255))
    save_mask(mask, tmp_path / "max.fvmask")
    assert torch.equal(load_mask(tmp_path / "max.fvmask").masks, _grid(16 / 255))


def test_an_all_zero_mask_is_refused_as_protecting_nothing(tmp_path: Path) -> None:
    zeros = maskfile._npy_bytes(torch.zeros(*ONE_MASK_SHAPE))
    path = _retampered(tmp_path, "zero.fvmask", **{maskfile.MASKS: zeros})
    with pytest.raises(FaceveilError, match=r"invalid person mask: mask 0 changes no pixel .* it protects nothing"):
        load_mask(path)
    below_rounding = maskfile._npy_bytes(torch.full(ONE_MASK_SHAPE, 0.49 / 255))
    with pytest.raises(FaceveilError, match="changes no pixel"):
        load_mask(_retampered(tmp_path, "faint.fvmask", **{maskfile.MASKS: below_rounding}))


def test_enroll_refuses_the_budgets_and_mask_counts_apply_would_refuse() -> None:
    assert enroll_settings(name="a", eps=16).attack.eps == pytest.approx(maskfile.largest_eps("linf"))
    assert enroll_settings(name="a", norm="l2", eps=2400).attack.eps == pytest.approx(maskfile.largest_eps("l2"))
    for kwargs, message in (({"eps": 17}, r"eps must be in \(0, 16\] under linf, got 17"),
                            ({"eps": float("nan")}, "eps must be in"),
                            ({"norm": "l2", "eps": 2401}, r"eps must be in \(0, 2400\] under l2"),
                            ({"masks": 33}, "masks must be in 1..32, got 33")):
        with pytest.raises(FaceveilError, match=message):
            enroll_settings(name="a", **kwargs)


# ----------------------------------------------------------------------------------------------- item 13: deep JSON


def test_a_meta_json_nested_200000_deep_is_a_one_line_refusal(tmp_path: Path) -> None:
    path = _retampered(tmp_path, "deep.fvmask", **{maskfile.META: _deep_json(200_000)})
    _refused_within(path, "refused: meta.json nests 200000 levels deep")


def test_a_deep_header_is_refused_and_brackets_inside_strings_do_not_count(tmp_path: Path) -> None:
    payload = _entries(_mask(), tmp_path)
    path = tmp_path / "deep-header.fvmask"
    _write_zip(path, [_raw(maskfile.HEADER, b'{"a": ' + _deep_json(100_000) + b"}")]
               + [_raw(n, v) for n, v in payload.items()])
    _refused_within(path, "faceveil-mask.json nests 100001 levels deep")
    bracketed = dataclasses.replace(_mask(), name="[" * 100 + '"{')
    save_mask(bracketed, tmp_path / "bracketed.fvmask")
    assert load_mask(tmp_path / "bracketed.fvmask").name == bracketed.name


# ----------------------------------------------------------------------------------------------- `faceveil apply`


def _photo(tmp: Path) -> Path:
    photo = tmp / "in" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    return photo


CRAFTED = {  # file maker -> the message apply prints
    "zeros": (_bomb_of_zeros, "refused: its arrays would take 2000 MB"),
    "lying": (_lying_stream, "deflate stream holds more than the 786560 bytes it declares"),
    "deep": (lambda tmp: _retampered(tmp, "deep.fvmask", **{maskfile.META: _deep_json(200_000)}),
             "refused: meta.json nests 200000 levels deep"),
    "grid": (lambda tmp: _retampered(tmp, "grid.fvmask", **{
        maskfile.META: maskfile._meta_bytes(dataclasses.replace(_mask(), eps=1.0, masks=_grid(1.0))),
        maskfile.MASKS: maskfile._npy_bytes(_grid(1.0))}), "above the largest budget faceveil makes"),
    "zero": (lambda tmp: _retampered(tmp, "zero.fvmask", **{
        maskfile.MASKS: maskfile._npy_bytes(torch.zeros(*ONE_MASK_SHAPE))}), "it protects nothing"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_apply_refuses_a_crafted_mask_in_one_line_and_writes_nothing(tmp_path: Path, capsys, kind: str) -> None:
    make, message = CRAFTED[kind]
    path, photo, out = make(tmp_path), _photo(tmp_path), tmp_path / "out"
    out.mkdir()
    before = hashlib.sha256(photo.read_bytes()).hexdigest()
    assert main(["apply", str(path), str(photo), "-o", str(out), "--json", str(out / "r.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"faceveil: error: {path}: ") and message in err and "\n" not in err
    assert list(out.iterdir()) == []
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == before


# Runs a command and prints its exit status and peak RSS in KB, as /usr/bin/time -f %M does: from a small process,
# because a child's peak counts the pages it shares with its parent before exec (here the test process, with torch).
_TIME = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:]); _, status, usage = "
         "os.wait4(child.pid, 0); child.returncode = 0; "
         "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, file=sys.stderr)")


def _peak_of_apply(mask: Path, photo: Path, out: Path) -> tuple[int, str, int]:
    """Runs a real `faceveil apply` process: (exit status, its stderr, its peak resident memory in bytes)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "faceveil.cli", "apply", str(mask), str(photo), "-o", str(out)]
    done = subprocess.run([sys.executable, "-c", _TIME, *command], capture_output=True, text=True, env=env)
    *lines, measured = done.stderr.splitlines()
    code, kilobytes = map(int, measured.split())
    return code, "\n".join(lines) + "\n", kilobytes * 1024


@pytest.mark.parametrize("kind", ["zeros", "lying"])
def test_a_real_apply_process_refuses_a_mask_bomb_under_300_mb(tmp_path: Path, kind: str) -> None:
    make, message = CRAFTED[kind]
    path, photo, out = make(tmp_path), _photo(tmp_path), tmp_path / "out"
    out.mkdir()
    code, stderr, peak = _peak_of_apply(path, photo, out)
    print(f"apply refused the {kind} bomb ({path.stat().st_size / MB:.1f} MB file) at peak RSS {peak / MB:.0f} MB")
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert peak < PEAK_LIMIT_BYTES
    assert list(out.iterdir()) == []
