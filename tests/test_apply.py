"""`faceveil enroll` and `faceveil apply` end to end on the sample photos (2 iterations): the mask file is written
and loads; apply masks the enrolled man (second-largest face of sample1, also in sample3) and leaves every other
face's pixels untouched; photos without him are not written; videos mask only his track; bad input is one line
and exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import WRITTEN, needs_weights
from PIL import Image

from faceveil.cli import main
from faceveil.detect.cache import detect_file
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.models import zoo
from faceveil.pipeline.maskfile import load_mask

# Every test here uses the module's enroll run (the `enrolled` fixture, tens of seconds): all are slow.
pytestmark = [needs_weights, pytest.mark.slow]


def _person_crop(index: int, path: Path) -> Path:
    """The man's face with some margin, cut from a sample photo (so he is the largest face of the image)."""
    photo = weights.sample_photos()[index]
    found, _ = detect_file(photo, max_side=1024)
    face = sorted(found, key=lambda f: -f.size)[1]
    x1, y1, x2, y2 = face.box
    w = x2 - x1
    image = read_image(photo).rgb
    box = (int(max(0, x1 - w)), int(max(0, y1 - w)), int(min(image.shape[1], x2 + w)),
           int(min(image.shape[0], y2 + w)))
    Image.fromarray(image[box[1]:box[3], box[0]:box[2]]).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("enroll")
    crops = [_person_crop(0, tmp / "man_a.jpg"), _person_crop(2, tmp / "man_b.jpg")]
    blank = tmp / "blank.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    out = tmp / "man.fvmask"
    report = tmp / "enroll.json"
    code = main(["enroll", "--name", "The Man", *map(str, crops), str(blank), "-o", str(out), "--iters", "2",
                 "--json", str(report), "--quiet"])
    return {"code": code, "mask": out, "report": json.loads(report.read_text()), "tmp": tmp}


def test_enroll_writes_a_loadable_mask(enrolled: dict) -> None:
    assert enrolled["code"] == 0
    mask = load_mask(enrolled["mask"])
    assert mask.name == "The Man" and mask.method == "opom-convex" and mask.count == 1
    assert {"mobileface", "mfn512", "mfn192"} <= set(mask.references)
    assert all(len(r) == 2 for r in mask.references.values())  # the blank image gave no face
    assert mask.meta["images_used"] == 2 and mask.meta["iterations"] == 2
    settings = enrolled["report"]["settings"]
    assert settings["hull_solver_ms_per_step"] > 0
    statuses = {r["file"]: r["status"] for r in enrolled["report"]["rows"]}
    assert statuses == {"man_a.jpg": "used", "man_b.jpg": "used", "blank.png": "no_face"}


def test_enroll_warns_and_names_skipped_images(enrolled: dict, tmp_path: Path, capsys) -> None:
    crop = _person_crop(0, tmp_path / "one.jpg")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (100, 100)).save(blank)
    code = main(["enroll", "--name", "x", str(crop), str(blank), "-o", str(tmp_path / "x.fvmask"), "--iters", "0",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    assert "blank.png" in err and "warning: only 1 usable image" in err


def test_enroll_l2_mask_is_on_its_budget(tmp_path: Path) -> None:
    """An optimiser's L2 mask is used at its budget, measured on what is pasted (the protocol's measure), also when
    its steps are too small to reach it: the projection only bounds the norm (of the whole canonical square, whose
    random start outside the face is never pasted)."""
    from faceveil.attacks.budgets import paste_l2

    crop = _person_crop(0, tmp_path / "man.jpg")
    out = tmp_path / "l2.fvmask"
    assert main(["enroll", "--name", "x", str(crop), "-o", str(out), "--norm", "l2", "--eps", "1200", "--iters", "2",
                 "--alpha", "100", "--mode", "crops", "--quiet"]) == 0
    mask = load_mask(out)
    assert mask.norm == "l2" and abs(float(paste_l2(mask.masks)[0]) * 255 - 1200) / 1200 < 0.02


def test_apply_masks_only_the_enrolled_person(enrolled: dict, tmp_path: Path) -> None:
    samples = weights.sample_photos()
    out, report, html = tmp_path / "out", tmp_path / "apply.json", tmp_path / "apply.html"
    code = main(["apply", str(enrolled["mask"]), str(samples[0]), str(samples[1]), "-o", str(out), "--format", "png",
                 "--json", str(report), "--report", str(html), "--quiet"])
    assert code in WRITTEN
    page = html.read_text()  # the HTML report: self-contained, the before/after pictures inline
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower() and "data:image/" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "url(" not in page
    results = {Path(r["file"]).name: r for r in json.loads(report.read_text())["results"]}
    with_him, without = results[samples[0].name], results[samples[1].name]
    assert with_him["status"] == "ok" and with_him["details"]["masked"] == 1
    assert with_him["details"]["faces_detected"] == 3 and with_him["details"]["skipped"] == 2
    assert without["status"] == "no_face" and without["output"] is None
    assert sorted(p.name for p in out.iterdir()) == ["sample1.png"]

    before = read_image(samples[0]).rgb.astype(int)
    after = np.asarray(Image.open(out / "sample1.png").convert("RGB")).astype(int)
    for face in with_him["details"]["faces"]:
        x1, y1, x2, y2 = (int(v) for v in face["box"])
        changed = np.abs(before[y1:y2, x1:x2] - after[y1:y2, x1:x2]).max()
        assert (changed > 0) == face["masked"], face
    # apply checks the saved photo as protect does: the masked face in protect's row shape, the others unjudged
    judges = set(zoo.SPECS)
    for face in with_him["details"]["faces"]:
        entries = {k for k, v in face.items() if isinstance(v, dict) and "matches" in v}
        assert entries == (judges if face["masked"] else set()), face
        if face["masked"]:
            assert face["redetected"] is True and all(isinstance(face[j]["score"], float) for j in judges)
    verdict = with_him["details"]["verdict"]
    assert verdict["masked"] == 1
    assert verdict["protected"] + verdict["recognised_by_some"] + verdict["recognised_by_all"] == 1
    # the verdict in words, as protect says it: the masked face's, the photo's, the batch's, and the exit status
    masked = next(face for face in with_him["details"]["faces"] if face["masked"])
    assert masked["protected"] is (not verdict["recognised_by_some"] + verdict["recognised_by_all"])
    assert with_him["protected"] is masked["protected"] and with_him["verdict"] == masked["verdict"]
    assert masked["verdict"].startswith(("protected against", "not protected"))
    tally = json.loads(report.read_text())["verdict"]
    assert tally["photos_written"] == 1 and tally["faces"] == 1
    assert code == (3 if tally["still_recognised"] else 0)


def test_apply_video_masks_only_his_track(enrolled: dict, tmp_path: Path) -> None:
    from faceveil.bench.video import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", seconds=1.0)
    out, report = tmp_path / "out", tmp_path / "video.json"
    code = main(["apply", str(enrolled["mask"]), str(clip.path), "-o", str(out), "--json", str(report), "--quiet"])
    assert code in WRITTEN
    details = json.loads(report.read_text())["results"][0]["details"]
    assert details["tracks"] == 3 and details["masked_tracks"] == 1
    assert details["frames"] == clip.frames and (out / "clip.mp4").is_file()


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("faceveil: error:") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_exit_2(enrolled: dict, tmp_path: Path, capsys) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 120)).save(blank)
    err = _one_line_error(capsys, ["enroll", "--name", "x", str(blank), "-o", str(tmp_path / "x.fvmask"),
                                   "--quiet"])
    assert "no usable face" in err
    err = _one_line_error(capsys, ["enroll", "--name", "x", str(blank), "-o", str(tmp_path / "x.fvmask"),
                                   "--method", "bogus", "--quiet"])
    assert "unknown method" in err
    broken = tmp_path / "broken.fvmask"
    data = bytearray(enrolled["mask"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    sample = str(weights.sample_photos()[0])
    _one_line_error(capsys, ["apply", str(broken), sample, "-o", str(tmp_path / "o"), "--quiet"])
    err = _one_line_error(capsys, ["apply", str(enrolled["mask"]), sample, "-o", str(tmp_path / "o"),
                                   "--mask-index", "3", "--quiet"])
    assert "mask-index" in err
    assert not (tmp_path / "x.fvmask").exists() and not (tmp_path / "o").exists()
