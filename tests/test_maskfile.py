"""The .fvmask container: round trip, atomic write, and one clear FaceveilError for a flipped byte, a truncated
file, a file of another kind, a newer format version, and masks that break their own promises."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from faceveil.errors import FaceveilError
from faceveil.pipeline import maskfile
from faceveil.pipeline.maskfile import PersonMask, load_mask, save_mask

EPS = 8 / 255


def _mask(masks: int = 1, seed: int = 0) -> PersonMask:
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(masks, 3, 256, 256, generator=gen) * 2 - 1) * EPS
    refs = {"mfn192": torch.randn(3, 192, generator=gen), "mobileface": torch.randn(3, 256, generator=gen)}
    return PersonMask(name="Ada Lovelace", masks=values, geometry="canonical", method="opom-convex",
                      surrogates=["mobileface", "mfn512"], eps=EPS, norm="linf", references=refs,
                      meta={"iterations": 16, "seed": 0, "images_used": 3, "created": "2024-01-01T00:00:00+00:00"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[PersonMask, bytes]:
    mask = _mask()
    path = tmp_path_factory.mktemp("mask") / "ada.fvmask"
    save_mask(mask, path)
    return mask, path.read_bytes()


def _same(a: PersonMask, b: PersonMask) -> bool:
    return (torch.equal(a.masks, b.masks) and a.references.keys() == b.references.keys()
            and all(torch.equal(a.references[k], b.references[k]) for k in a.references)
            and (a.name, a.geometry, a.method, a.surrogates, a.eps, a.norm, a.meta)
            == (b.name, b.geometry, b.method, b.surrogates, b.eps, b.norm, b.meta))


def test_round_trip(tmp_path: Path) -> None:
    mask = _mask(masks=2)
    save_mask(mask, tmp_path / "a.fvmask")
    back = load_mask(tmp_path / "a.fvmask")
    assert _same(mask, back)
    assert back.masks.dtype == torch.float32 and back.count == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.fvmask"]  # no temp file left


def test_only_plain_arrays_and_json(saved, tmp_path: Path) -> None:
    _, data = saved
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert names[0] == maskfile.HEADER
        assert all(n.endswith((".json", ".npy")) for n in names)
        for n in names:
            if n.endswith(".npy"):  # loads without pickle
                assert np.load(io.BytesIO(archive.read(n)), allow_pickle=False).dtype == np.float32


def test_flipped_bytes_never_load_silently(saved, tmp_path: Path) -> None:
    """Any flipped byte either fails with a FaceveilError or (zip bookkeeping such as timestamps, which the
    payload checksum does not cover) leaves the loaded mask exactly as saved."""
    mask, data = saved
    path = tmp_path / "flipped.fvmask"
    rejected = 0
    for position in np.linspace(0, len(data) - 1, 150).astype(int):
        broken = bytearray(data)
        broken[position] ^= 0x5A
        path.write_bytes(bytes(broken))
        try:
            back = load_mask(path)
        except FaceveilError as exc:
            assert "\n" not in str(exc)
            rejected += 1
        else:
            assert _same(mask, back), position
    assert rejected > 140  # nearly every byte is payload


def test_flipped_payload_byte_is_rejected(saved, tmp_path: Path) -> None:
    _, data = saved
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0x01  # inside the compressed masks
    (tmp_path / "x.fvmask").write_bytes(bytes(broken))
    with pytest.raises(FaceveilError, match="x.fvmask"):
        load_mask(tmp_path / "x.fvmask")


@pytest.mark.parametrize("keep", [0, 10, 100, 1000, 0.5, 0.99])
def test_truncated_file_is_rejected(saved, tmp_path: Path, keep) -> None:
    _, data = saved
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    (tmp_path / "t.fvmask").write_bytes(data[:size])
    with pytest.raises(FaceveilError):
        load_mask(tmp_path / "t.fvmask")


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    random = tmp_path / "random.fvmask"
    random.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    other_zip = tmp_path / "other.fvmask"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("hello.txt", "not a mask")
    npz = tmp_path / "arrays.npz"
    np.savez(npz, masks=np.zeros((1, 3, 256, 256), np.float32))
    for path in (random, other_zip, npz, tmp_path / "missing.fvmask"):
        with pytest.raises(FaceveilError) as info:
            load_mask(path)
        assert "\n" not in str(info.value)


def _rewrite(data: bytes, path: Path, header_edit=None, entry_edit=None) -> None:
    """Re-pack a mask file with its header or an entry changed (checksum recomputed for entry edits)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    header = json.loads(entries.pop(maskfile.HEADER))
    if entry_edit is not None:
        name, value = entry_edit
        entries[name] = value
        header["sha256"] = maskfile._digest({n: entries[n] for n in header["payload"]})
    if header_edit is not None:
        header.update(header_edit)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(maskfile.HEADER, json.dumps(header))
        for n, v in entries.items():
            archive.writestr(n, v)


def test_newer_version_is_refused(saved, tmp_path: Path) -> None:
    _, data = saved
    _rewrite(data, tmp_path / "new.fvmask", header_edit={"version": maskfile.VERSION + 1})
    with pytest.raises(FaceveilError, match="newer"):
        load_mask(tmp_path / "new.fvmask")


def test_entry_swapped_without_checksum_is_refused(saved, tmp_path: Path) -> None:
    _, data = saved
    zeros = io.BytesIO()
    np.save(zeros, np.zeros((1, 3, 256, 256), np.float32))
    _rewrite(data, tmp_path / "swapped.fvmask", header_edit={}, entry_edit=None)
    load_mask(tmp_path / "swapped.fvmask")  # re-packing alone is fine
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    entries[maskfile.MASKS] = zeros.getvalue()
    with zipfile.ZipFile(tmp_path / "tampered.fvmask", "w") as archive:
        for n, v in entries.items():
            archive.writestr(n, v)
    with pytest.raises(FaceveilError, match="checksum"):
        load_mask(tmp_path / "tampered.fvmask")


def test_pickled_arrays_are_refused(saved, tmp_path: Path) -> None:
    _, data = saved
    objects = io.BytesIO()
    np.save(objects, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    _rewrite(data, tmp_path / "pickle.fvmask", entry_edit=(maskfile.MASKS, objects.getvalue()))
    with pytest.raises(FaceveilError):
        load_mask(tmp_path / "pickle.fvmask")


def test_invalid_masks_are_not_written(tmp_path: Path) -> None:
    mask = _mask()
    bad = [dataclasses.replace(mask, masks=mask.masks * 2),  # over the budget
           dataclasses.replace(mask, masks=mask.masks[:, :, :128]),  # not canonical size
           dataclasses.replace(mask, geometry="arcface112"),
           dataclasses.replace(mask, norm="l1"),
           dataclasses.replace(mask, name=""),
           dataclasses.replace(mask, meta={"images": ["/home/ada/photo.jpg"]}),  # no paths of the user's photos
           dataclasses.replace(mask, references={"mfn192": torch.full((2, 192), float("nan"))})]
    for b in bad:
        with pytest.raises(FaceveilError):
            save_mask(b, tmp_path / "bad.fvmask")
    assert not list(tmp_path.iterdir())


def test_l2_masks_are_checked_against_their_l2_budget(tmp_path: Path) -> None:
    mask = _mask()
    l2 = dataclasses.replace(mask, norm="l2", eps=float(mask.masks.flatten(1).norm(dim=1).max()) * 1.0000001)
    save_mask(l2, tmp_path / "l2.fvmask")
    assert load_mask(tmp_path / "l2.fvmask").norm == "l2"
    with pytest.raises(FaceveilError, match="budget"):
        save_mask(dataclasses.replace(l2, eps=l2.eps / 2), tmp_path / "l2b.fvmask")


def _header_version(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(maskfile.HEADER))["version"]


def test_an_l2_budget_bounds_what_is_pasted(tmp_path: Path) -> None:
    """Version 2: an L2 eps bounds the mask times the face mask (outside it nothing is pasted); such files say
    version 2, so an older reader, which measured the whole square, asks for an upgrade instead of refusing them as
    over budget. L-inf files are still version 1; a version 1 L2 file (whole square within eps) still loads."""
    from faceveil.detect.canonical import face_mask

    mask = _mask()
    pasted = float((mask.masks * face_mask()).flatten(1).norm(dim=1).max())
    assert pasted < 0.8 * float(mask.masks.flatten(1).norm(dim=1).max())  # noise outside the face is not pasted
    l2 = dataclasses.replace(mask, norm="l2", eps=pasted * 1.0000001)
    save_mask(l2, tmp_path / "l2.fvmask")
    assert load_mask(tmp_path / "l2.fvmask").eps == l2.eps and _header_version(tmp_path / "l2.fvmask") == 2
    with pytest.raises(FaceveilError, match="budget"):
        save_mask(dataclasses.replace(l2, eps=pasted * 0.99), tmp_path / "over.fvmask")
    save_mask(mask, tmp_path / "linf.fvmask")
    assert _header_version(tmp_path / "linf.fvmask") == 1
    whole = dataclasses.replace(mask, norm="l2", eps=float(mask.masks.flatten(1).norm(dim=1).max()) * 1.0000001)
    save_mask(whole, tmp_path / "whole.fvmask")
    _rewrite((tmp_path / "whole.fvmask").read_bytes(), tmp_path / "v1.fvmask", header_edit={"version": 1})
    assert load_mask(tmp_path / "v1.fvmask").norm == "l2"
