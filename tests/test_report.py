"""The HTML report: self-contained (data URIs only, no scripts, no remote URLs), the expected sections per kind,
bounded size, deterministic; `--report` on the commands and `faceveil report`; and a real page rendered by headless
chromium (skipped when chromium is absent: `apt-get install chromium`, which ./setup.sh does as root)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceveil.cli import build_parser, main
from faceveil.cli.common import emit
from faceveil.io import weights
from faceveil.report import write_report
from tests.conftest import WRITTEN, needs_weights

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
IMG_SRC = re.compile(r"<img[^>]*\ssrc=\"([^\"]*)\"")


def _photo_pair(folder: Path, size: tuple[int, int] = (320, 240), box=(100, 60, 180, 150)) -> tuple[Path, Path]:
    """A smooth synthetic photo and a copy changed by +-8 inside one 'face' box (seeded)."""
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.int16)
    after = base.copy()
    x0, y0, x1, y1 = box
    after[y0:y1, x0:x1] += rng.integers(-8, 9, size=(y1 - y0, x1 - x0, 3))
    original, protected = folder / "original.png", folder / "protected.png"
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(original)
    Image.fromarray(after.clip(0, 255).astype(np.uint8)).save(protected)
    return original, protected


def _protect_doc(original: Path, protected: Path, box=(100, 60, 180, 150)) -> dict:
    face0 = {"face": 0, "box": list(box), "redetected": True,
             "mobileface": {"score": 0.12, "matches": False}, "dlib": {"score": -0.41, "matches": True},
             "target": {"identity": "sample3.jpg#0", "chosen_steps": 9, "steps": 10,
                        "mobileface": {"score": 0.31, "matches": True}}}
    face1 = {"face": 1, "box": [10, 10, 60, 70], "redetected": False}
    return {"command": "protect", "settings": {"method": "mim", "surrogates": ["mobileface"],
                                               "attack": {"eps": 8 / 255, "steps": 10}},
            "results": [{"file": str(original), "status": "ok", "output": str(protected), "faces": 2,
                         "details": {"faces": [face0, face1]}},
                        {"file": "no-face.jpg", "status": "no_face", "message": "no face found"}]}


def _ident_doc(method: str, eps: float, protection: float, ssim: float) -> dict:
    rows = [{"judge": j, "method": method, "surrogates": ["mfn512", "mobileface"], "white_box": j == "mfn512",
             "mode": "crops", "rank1_t": protection / 2, "rank5_t": protection, "rank1_ut": protection,
             "rank5_ut": protection / 2, "psnr": 38.0, "ssim": ssim} for j in ("mfn512", "dlib", "faceres")]
    return {"command": "eval identification", "settings": {"method": method, "eps": eps, "limit": 4}, "rows": rows}


def _check_self_contained(html: str) -> list[str]:
    srcs = IMG_SRC.findall(html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "a remote reference"
    assert "url(" not in html  # no CSS fetches either
    return srcs


def test_protect_report_sections_self_contained_and_small(tmp_path: Path):
    original, protected = _photo_pair(tmp_path)
    out = write_report(tmp_path / "r.html", "protect", _protect_doc(original, protected), originals=True)
    html = out.read_text()
    srcs = _check_self_contained(html)
    assert len(srcs) == 9  # before / after / change: the whole photo and a close-up of each face
    assert "UNPROTECTED" in html  # the warning that the file holds the original faces
    assert 'id="summary"' in html and html.count('class="card photo-card"') == 2
    assert html.count('class="face') == 2
    assert "Still recognised by 1 of 2 models (dlib)" in html  # the verdict in words
    assert "no longer finds this face" in html  # face 1 was not re-detected
    assert "sample3.jpg#0" in html and "aimed at in 9 of 10 steps" in html  # the chosen target
    assert "(optimised against)" in html and "no face found" in html
    assert "method mim; budget ±8/255 per pixel; 10 iterations" in html
    assert out.stat().st_size < 200_000


def test_report_size_is_capped_for_large_photos(tmp_path: Path):
    box = (1200, 700, 1700, 1300)
    original, protected = _photo_pair(tmp_path, size=(2000, 1500), box=box)
    out = write_report(tmp_path / "big.html", "protect", _protect_doc(original, protected, box))
    assert out.stat().st_size < 250_000  # 3 MP photos, but thumbnails of at most 480 px


def test_report_is_deterministic(tmp_path: Path):
    original, protected = _photo_pair(tmp_path)
    doc = _protect_doc(original, protected)
    a = write_report(tmp_path / "a.html", "protect", doc).read_bytes()
    b = write_report(tmp_path / "b.html", "protect", doc).read_bytes()
    assert a == b


def test_apply_results_without_checks_say_so(tmp_path: Path):
    original, protected = _photo_pair(tmp_path)
    doc = {"command": "apply", "results": [{"file": str(original), "status": "ok", "output": str(protected),
                                            "details": {"faces": [{"face": 0, "box": [100, 60, 180, 150],
                                                                   "masked": True, "scores": {"mfn192": 0.8}},
                                                                  {"face": 1, "box": [5, 5, 40, 40],
                                                                   "masked": False, "scores": {}}]}}]}
    html = write_report(tmp_path / "apply.html", "apply", doc).read_text()
    assert "no recognition check was run" in html and "Left unchanged" in html


def test_report_command_reads_a_streamed_jsonl_with_relative_paths(tmp_path: Path):
    original, protected = _photo_pair(tmp_path)
    result = _protect_doc(original.name, protected.name)["results"][0]  # names relative to the .jsonl's folder
    (tmp_path / "run.jsonl").write_text(json.dumps(result) + "\n")
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "run.jsonl"), "-o", str(out), "--quiet"]) == 0
    assert len(_check_self_contained(out.read_text())) == 3  # shareable: the protected photo and face close-ups
    assert main(["report", str(tmp_path / "run.jsonl"), "-o", str(out), "--quiet", "--report-originals"]) == 0
    assert len(_check_self_contained(out.read_text())) == 9


def test_verify_report_has_ranks_and_transforms(tmp_path: Path):
    original, protected = _photo_pair(tmp_path)
    rows = [{"model": m, "transform": t, "face": 0, "score": s, "matches": s >= thr, "rank": 1 if s >= thr else 3,
             "gallery_size": 7}
            for m, thr, s0 in (("mobileface", 0.204, 0.15), ("dlib", -0.622, -0.5))
            for t, s in zip(("none", "jpeg75", "resize0.5", "blur1"), (s0, s0 + 0.05, s0 + 0.1, s0 + 0.02),
                            strict=True)]
    doc = {"command": "verify", "settings": {"original": str(original), "protected": str(protected),
                                             "gallery": "samples", "gallery_faces": 20,
                                             "thresholds": {"mobileface": 0.204, "dlib": -0.622}}, "rows": rows}
    assert len(_check_self_contained(write_report(tmp_path / "v.html", "verify", doc).read_text())) == 2
    html = write_report(tmp_path / "v.html", "verify", doc, originals=True).read_text()
    srcs = _check_self_contained(html)
    assert len(srcs) == 4  # the photo's three views and the transforms chart (no face box: no close-ups)
    assert "rank 3 of 7" in html and "rank 1 of 7" in html
    assert "after everyday changes" in html
    assert "Still recognised by 1 of 2 models (dlib)" in html


def test_eval_report_merges_files_and_draws_the_curves(tmp_path: Path, capsys):
    paths = []
    for method, eps, prot, ssim in (("pgd", 4, 0.2, 0.97), ("pgd", 8, 0.5, 0.93), ("tip-im", 4, 0.3, 0.96),
                                    ("tip-im", 8, 0.7, 0.92)):
        path = tmp_path / f"{method}-{eps}.json"
        path.write_text(json.dumps(_ident_doc(method, eps, prot, ssim)))
        paths.append(str(path))
    out = tmp_path / "eval.html"
    assert main(["report", *paths, "-o", str(out), "--quiet"]) == 0
    html = out.read_text()
    srcs = _check_self_contained(html)
    assert len(srcs) == 3  # protection vs eps, protection vs SSIM, per-judge bars
    assert "against the perturbation budget" in html and "against image quality" in html
    assert 'id="eval-eval-identification"' in html
    assert "Best run: tip-im ε 8 protects 70% of faces" in html  # the black-box judges' mean (dlib, faceres)
    assert html.count("<tr>") >= 12 + 4  # the 12 rows and the 4-run summary
    assert "report written" in capsys.readouterr().err


def test_robustness_and_verification_plots(tmp_path: Path):
    rows = [{"judge": j, "judge_seen_by_surrogates": "black-box", "transform": t, "attacker": "plain",
             "rank1_ut": r, "retained": r / 0.8, "rates": {"rank1_ut": r}} for j in ("dlib", "faceres")
            for t, r in (("none", 0.8), ("jpeg75", 0.6), ("blur1", 0.4))]
    rows.append({"judge": "dlib", "transform": "none", "attacker": "adaptive (linear probe)", "rank1_ut": 0.2,
                 "retained": 0.25})
    html = write_report(tmp_path / "rob.html", "eval", {"command": "eval robustness", "settings": {"method": "pgd"},
                                                        "rows": rows}).read_text()
    assert len(_check_self_contained(html)) == 1 and "Retained = protection after the transform" in html
    assert "{" not in html.split("<tbody>")[1].split("</tbody>")[0]  # nested rate dicts are not table cells
    doc = {"command": "eval verification", "settings": {}, "rows": [
        {"model": "dlib", "accuracy": 0.989, "threshold": -0.62}, {"model": "mfn512", "accuracy": 0.992}]}
    html = write_report(tmp_path / "ver.html", "eval", doc).read_text()
    assert len(_check_self_contained(html)) == 1 and "Accuracy of each model" in html


def test_emit_writes_the_report(tmp_path: Path, capsys):
    doc = _ident_doc("pgd", 8, 0.5, 0.9)
    emit(doc["command"], doc["settings"], doc["rows"], None, report=tmp_path / "sub" / "e.html")
    assert (tmp_path / "sub" / "e.html").read_text().startswith("<!DOCTYPE html>")
    assert "| judge |" in capsys.readouterr().out


def test_report_flag_on_every_command():
    parser = build_parser()
    for argv in (["protect", "x.jpg", "-o", "o"], ["demo"], ["verify", "a.jpg", "b.jpg"],
                 ["eval", "verification", "--dataset", "lfw=x"], ["eval", "identification", "--dataset", "lfw=x"]):
        assert parser.parse_args([*argv, "--report", "r.html"]).report == "r.html"


@pytest.mark.parametrize("case", ["not-json", "no-rows", "mixed", "missing", "overwrite"])
def test_report_command_bad_input_is_one_line(tmp_path: Path, capsys, case: str):
    bad = tmp_path / "bad.json"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_ident_doc("pgd", 8, 0.5, 0.9)))
    verify = tmp_path / "verify.json"
    verify.write_text(json.dumps({"command": "verify", "settings": {}, "rows": []}))
    bad.write_text({"not-json": "{oops", "no-rows": json.dumps({"x": 1})}.get(case, "{}"))
    argv = {"not-json": [str(bad)], "no-rows": [str(bad)], "mixed": [str(good), str(verify)],
            "missing": [str(tmp_path / "nope.json")], "overwrite": [str(good)]}[case]
    out = good if case == "overwrite" else tmp_path / "r.html"
    before = good.read_text()
    assert main(["report", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("faceveil: error:") and "\n" not in err
    assert good.read_text() == before and not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------------------------- real run + chromium


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def _screenshot(html: Path, png: Path) -> np.ndarray:
    _chromium(f"--screenshot={png}", "--window-size=1280,2000", html.resolve().as_uri())
    assert png.exists(), "chromium wrote no screenshot"
    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        return np.asarray(im.convert("RGB"))


def _assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.std() > 20  # pictures, bars and text, not an empty page
    colours = np.unique((pixels[::4, ::4] // 16).reshape(-1, 3), axis=0)
    assert len(colours) > 50


@needs_weights
@needs_chromium
@pytest.mark.slow
def test_real_protect_and_eval_reports_in_headless_chromium(tmp_path: Path):
    sample = str(weights.sample_photos()[0])
    report = tmp_path / "protect.html"
    rc = main(["protect", sample, "-o", str(tmp_path / "out"), "--iters", "2", "--judges", "mobileface,mfn512,mfn192",
               "--quiet", "--report", str(report)])
    assert rc in WRITTEN
    eval_json = tmp_path / "ident.json"
    eval_json.write_text(json.dumps(_ident_doc("pgd", 8, 0.5, 0.9)))
    eval_report = tmp_path / "eval.html"
    assert main(["report", str(eval_json), "-o", str(eval_report), "--quiet"]) == 0
    for html, sections in ((report, ('id="summary"', 'class="card photo-card"', 'class="face"', "How to read")),
                           (eval_report, ('id="eval-eval-identification"', "per judge model", "Results"))):
        _assert_not_blank(_screenshot(html, tmp_path / f"{html.stem}.png"))
        dom = _chromium("--dump-dom", html.resolve().as_uri()).stdout
        assert all(s in dom for s in sections), html.name
        srcs = IMG_SRC.findall(dom)
        assert srcs and all(s.startswith("data:image/") for s in srcs)


def test_markdown_table_renders_nested_dicts_inline():
    """A bench row's per-stage figures print as one cell of name-value pairs, formatted like other cells."""
    from faceveil.io.results import markdown_table

    table = markdown_table([{"case": "photo", "stage_share_of_networks": {"detect": 0.0412, "write": 0.0061}}])
    assert "| photo | detect 0.041 write 0.006 |" in table
