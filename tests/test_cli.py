"""The command line as a user meets it: protect a real sample photo end to end, bad inputs give one-line errors
and never stop the batch, originals stay byte-identical, metadata is stripped."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import WRITTEN, needs_weights
from PIL import Image

from faceveil.cli import main
from faceveil.io import weights


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_face_photo(tmp: Path) -> Path:
    """sample3 downscaled (faster to protect), with a GPS tag in its EXIF."""
    with Image.open(weights.sample_photos()[2]) as im:
        im = im.convert("RGB").resize((640, 427))
        exif = Image.Exif()
        exif[0x8825] = {1: "N", 2: (52.0, 13.0, 0.0)}  # GPSInfo
        exif[0x0110] = "TestCam"  # camera model
        path = tmp / "in" / "people.jpg"
        path.parent.mkdir()
        im.save(path, exif=exif, quality=95)
    return path


@needs_weights
def test_protect_end_to_end(tmp_path: Path, capsys):
    src = _small_face_photo(tmp_path)
    bad = src.parent / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    empty = src.parent / "empty.png"
    empty.write_bytes(b"")
    before = {p: _sha(p) for p in src.parent.iterdir()}
    report = tmp_path / "report.json"
    code = main(["protect", str(src.parent), "-o", str(tmp_path / "out"), "--iters", "3", "--surrogates",
                 "mobileface", "--judges", "mobileface,mfn512", "--faces", "largest", "--json", str(report),
                 "--quiet"])
    assert code == 2  # two bad files: non-zero exit, but the good one was still protected
    assert {p: _sha(p) for p in src.parent.iterdir()} == before
    out = tmp_path / "out" / "people.jpg"
    assert out.is_file()
    with Image.open(out) as im:
        exif = im.getexif()
        assert 0x8825 not in exif and 0x0110 not in exif
    doc = json.loads(report.read_text())
    results = {Path(r["file"]).name: r for r in doc["results"]}
    assert results["people.jpg"]["status"] == "ok"
    assert results["broken.jpg"]["status"] == "error" and results["empty.png"]["status"] == "error"
    face = results["people.jpg"]["details"]["faces"][0]
    assert face["redetected"] and "mobileface" in face and "mfn512" in face
    assert doc["command"] == "protect" and doc["settings"]["surrogates"] == ["mobileface"]
    assert doc["settings"]["attack"]["steps"] == 3 and doc["settings"]["attack"]["smoothing"] == 0
    assert "people.jpg" in capsys.readouterr().out


@needs_weights
@pytest.mark.slow
def test_consecutive_photos_are_optimised_together_each_reporting_its_own_result(tmp_path: Path):
    """Faces of consecutive photos share one optimisation (--batch-faces); a broken file and a photo without a face
    between them still report their own status, every good photo is written and verified, and the same seed gives
    the same files again."""
    src = _small_face_photo(tmp_path)
    for name in ("b_people.jpg", "e_people.jpg"):
        shutil.copy(src, src.parent / name)
    (src.parent / "c_broken.jpg").write_bytes(b"not an image")
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(src.parent / "d_sky.png")
    flags = ["--iters", "2", "--surrogates", "mobileface", "--judges", "mobileface", "--faces", "largest", "--quiet"]
    runs = {}
    for name, extra in (("together", []), ("again", []), ("alone", ["--batch-faces", "1"])):
        report = tmp_path / f"{name}.json"
        assert main(["protect", str(src.parent), "-o", str(tmp_path / name), "--json", str(report),
                     *flags, *extra]) == 2  # the broken file
        runs[name] = {Path(r["file"]).name: r for r in json.loads(report.read_text())["results"]}
    together = runs["together"]
    assert [together[n]["status"] for n in sorted(together)] == ["ok", "error", "no_face", "ok", "ok"]
    for name in ("b_people.jpg", "e_people.jpg", "people.jpg"):
        assert together[name]["details"]["batch"] == {"photos": 3, "faces": 3}
        assert together[name]["details"]["faces"][0]["redetected"]
        assert _sha(tmp_path / "together" / name) == _sha(tmp_path / "again" / name)
        assert "batch" not in runs["alone"][name]["details"]


@needs_weights
def test_no_face_is_reported_and_copied_only_on_request(tmp_path: Path):
    src = tmp_path / "in" / "sky.png"
    src.parent.mkdir()
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(src)
    for flag, expect in (([], False), (["--copy-unprotected"], True)):
        out_dir = tmp_path / f"out{len(flag)}"
        report = tmp_path / f"r{len(flag)}.json"
        assert main(["protect", str(src), "-o", str(out_dir), "--json", str(report), "--quiet", *flag]) == 0
        assert json.loads(report.read_text())["results"][0]["status"] == "no_face"
        assert (out_dir / "sky.png").exists() == expect


def test_output_folder_equal_to_input_folder_is_refused(tmp_path: Path):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    done = subprocess.run([sys.executable, "-m", "faceveil.cli", "protect", str(src), "-o", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
    assert "own folder" in done.stderr


def test_unknown_model_is_one_line_error(capsys):
    assert main(["bench", "models", "--models", "nosuchmodel"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "Traceback" not in err


def test_models_fetch_is_idempotent_when_present():
    if not all(r["sha256_ok"] for r in weights.file_status()):
        pytest.skip("weights not fetched yet (this test checks that a second run changes nothing)")
    stamp = {r["file"]: (weights.home() / r["file"]).stat().st_mtime_ns for r in weights.file_status()}
    assert main(["models", "fetch"]) == 0
    assert stamp == {r["file"]: (weights.home() / r["file"]).stat().st_mtime_ns for r in weights.file_status()}


@needs_weights
def test_models_check_passes(tmp_path: Path):
    out = tmp_path / "check.json"
    assert main(["models", "check", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    converted = [r for r in rows if r["check"] == "equals original runtime"]
    # 8 converted recognisers and BlazeFace (the face confirmation)
    assert len(converted) == 9 and all(r["relative_diff"] < 1e-4 for r in converted)


@needs_weights
def test_bench_models_writes_json(tmp_path: Path):
    out = tmp_path / "bench.json"
    assert main(["bench", "models", "--models", "mobileface", "--batches", "1,2", "--repeats", "1", "--json",
                 str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "bench models" and len(doc["rows"]) == 2
    assert all(r["ms_forward"] > 0 and r["ms_forward_backward"] > 0 for r in doc["rows"])


@needs_weights
def test_protect_video(tmp_path: Path):
    from faceveil.bench.video import make_test_clip
    from faceveil.io.video import probe_video

    src = tmp_path / "in" / "clip.mp4"
    src.parent.mkdir()
    make_test_clip(src, seconds=2.0)
    report = tmp_path / "r.json"
    assert main(["protect", str(src), "-o", str(tmp_path / "out"), "--iters", "2", "--surrogates", "mobileface",
                 "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())["results"][0]
    assert result["status"] == "ok" and result["faces"] >= 1
    before, after = probe_video(src), probe_video(tmp_path / "out" / "clip.mp4")
    assert after.frame_count == before.frame_count and after.has_audio


def _twenty_faces(path: Path) -> None:
    """A 5 x 4 grid of the sample photos' faces (each with a margin), like a group photo."""
    from faceveil.detect.mtcnn import MTCNN

    detector, tiles = MTCNN(), []
    for sample in weights.sample_photos():
        with Image.open(sample) as im:
            rgb = im.convert("RGB")
        for face in detector.detect_large(np.asarray(rgb)):
            x1, y1, x2, y2 = face.box
            m = 0.6 * (x2 - x1)
            tiles.append(rgb.crop((int(x1 - m), int(y1 - m), int(x2 + m), int(y2 + m))).resize((200, 200)))
    grid = Image.new("RGB", (1000, 800))
    for i in range(20):
        grid.paste(tiles[i % len(tiles)], ((i % 5) * 200, (i // 5) * 200))
    grid.save(path, quality=95)


@needs_weights
@pytest.mark.slow
def test_twenty_faces_all_protected(tmp_path: Path):
    src = tmp_path / "in" / "group.jpg"
    src.parent.mkdir()
    _twenty_faces(src)
    report = tmp_path / "r.json"
    assert main(["protect", str(src), "-o", str(tmp_path / "out"), "--iters", "1", "--surrogates", "mobileface",
                 "--judges", "mobileface", "--json", str(report), "--quiet"]) in WRITTEN
    result = json.loads(report.read_text())["results"][0]
    assert result["status"] == "ok" and result["faces"] >= 19, result["faces"]


def test_building_the_parser_imports_nothing_heavy():
    """`faceveil --help` stays fast: no torch, numpy or PIL while the parser is built."""
    code = ("import sys; from faceveil.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'numpy', 'PIL') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_robustness_protocols_come_from_one_list():
    from faceveil.cli import build_parser
    from faceveil.evaluate.protocols import ROBUSTNESS, robustness_module

    parser = build_parser()
    for name in ROBUSTNESS:
        assert parser.parse_args(["eval", "robustness", "--protocol", name]).protocol == name
        assert callable(robustness_module(name).robustness_adapter)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "robustness", "--protocol", "lowkey"])


def test_library_errors_name_the_flags_the_user_typed(capsys):
    """The library names a parameter (`transforms`); the command line says the flag (--transforms)."""
    from faceveil.cli import build_parser
    from faceveil.cli.common import as_flags

    assert main(["eval", "robustness", "--transforms", ",", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("faceveil: error: --transforms is empty") and "`" not in err
    parser = build_parser()
    args = parser.parse_args(["train", "advcloak", "--dataset", "lfw=x", "-o", "out.pt"])
    assert as_flags("pass `resume`, choose another `output`, `nothing` else", parser, args) == \
        "pass --resume, choose another --output, `nothing` else"


# ------------------------------------------------------------------------------------------- help for people


def test_version_and_bare_command_print_help(capsys):
    from faceveil import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"faceveil {__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: faceveil") and "faceveil protect PHOTOS/ -o OUT/" in out
    assert "thin layer" not in out  # no developer note for a user
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "usage: faceveil models" in out and "fetch" in out and "models_command" not in out


def test_protect_help_puts_everyday_options_first_and_explains_every_flag():
    from faceveil.cli import build_parser

    parser = build_parser()
    protect = next(a for a in parser._subparsers._group_actions).choices["protect"]
    titles = [group.title for group in protect._action_groups]
    assert titles.index("everyday options") < next(i for i, t in enumerate(titles) if t.startswith("method"))
    everyday = next(g for g in protect._action_groups if g.title == "everyday options")
    assert {"--strength", "--faces", "--format", "--report", "--keep-date"} <= {
        flag for action in everyday._group_actions for flag in action.option_strings}
    assert not [a.option_strings for a in protect._actions if not a.help], "every flag has a help text"
    text = protect.format_help()
    assert "(default: mid)" in text and "(default: None)" not in text
