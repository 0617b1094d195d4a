"""Verdicts in plain words (issue 25 item 1): per face and per photo, in the JSON rows, the terminal tables, the HTML
report, apply and the Python API, all from pipeline.results; the summary line at the end of a batch; the exit status
(0 all written and no face still recognised, 3 a face still recognised, 2 errors, 130/143 interrupts; demo 0)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import WRITTEN, needs_weights

from faceveil.cli.common import EXIT_STILL_RECOGNISED, finish_batch
from faceveil.pipeline.batch import BatchItem, BatchReport, ItemResult, run_batch
from faceveil.pipeline.results import FaceCheck, FaceTally, JudgeScore, face_verdict, photo_verdict

JUDGES = ("mobileface", "faceres", "faceres-deep", "dlib", "mfn512", "mfn192", "facenet-vgg")


def _check(face: int, still: tuple[str, ...] = (), redetected: bool = True) -> FaceCheck:
    judges = {name: JudgeScore(0.6 if name in still else 0.1, name in still) for name in JUDGES} if redetected else {}
    return FaceCheck(face, [0.0, 0.0, 10.0, 10.0], redetected, judges)


def test_face_words_say_which_models_still_recognise() -> None:
    assert _check(0, ("faceres", "faceres-deep")).verdict == (
        "protected against 5 of 7 models; still recognised by faceres, faceres-deep")
    assert _check(0).verdict == "protected against all 7 models"
    assert _check(0, JUDGES).verdict == "not protected: still recognised by all 7 models"
    assert "not found again" in _check(0, redetected=False).verdict
    row = _check(1, ("dlib",)).to_dict()
    assert row["protected"] is False and row["verdict"].endswith("still recognised by dlib")
    assert row["dlib"] == {"score": 0.6, "matches": True}
    assert _check(0).to_dict()["protected"] is True and _check(0, redetected=False).to_dict()["protected"] is None


def test_apply_rows_get_the_same_words() -> None:
    """apply's rows: a masked face with FaceCheck's judge entries merged in, and faces of other people left alone."""
    masked = {"face": 0, "box": [1, 1, 9, 9], "masked": True, "scores": {"mobileface": 0.7},
              **{k: v for k, v in _check(0, ("faceres",)).to_dict().items() if k not in ("protected", "verdict")}}
    other = {"face": 1, "box": [20, 1, 29, 9], "masked": False, "scores": {"mobileface": 0.0}}
    assert face_verdict(masked).words == "protected against 6 of 7 models; still recognised by faceres"
    assert face_verdict(other).state == "left_alone"
    protected, words = photo_verdict([masked, other])
    assert protected is False and words == "protected against 6 of 7 models; still recognised by faceres"
    unchecked = {"face": 0, "box": [1, 1, 9, 9], "masked": True, "scores": {}}  # apply before it verified
    assert photo_verdict([unchecked]) == (None, "written; not checked by any model")


def test_photo_words_and_the_batch_line() -> None:
    rows = [_check(0).to_dict(), _check(1, ("faceres",)).to_dict(), _check(2, redetected=False).to_dict()]
    protected, words = photo_verdict(rows)
    assert protected is False
    assert words == ("1 of 3 faces protected against all 7 models; face 1 still recognised by faceres; face 2 not "
                     "found again")
    assert photo_verdict([_check(0).to_dict(), _check(1).to_dict()])[0] is True
    assert photo_verdict(rows, detail=False) == (False, "1 of 3 faces protected against all 7 models")
    tally = FaceTally()
    tally.add(rows)
    tally.add([_check(0).to_dict()])
    tally.add([], video=True)
    assert tally.line() == ("2 photos and 1 video written; 2 of 4 faces protected against every model; 1 still "
                            "recognised by at least one model; 1 not found again")
    assert tally.to_dict()["still_recognised"] == 1


def _report(*face_rows: list[dict], error: bool = False) -> BatchReport:
    """A batch through the real runner: each photo's outcome carries the given face rows."""
    items = [BatchItem(Path(f"p{i}.jpg")) for i in range(len(face_rows) + error)]

    def process(item: BatchItem) -> dict:
        index = int(item.path.stem[1:])
        if index == len(face_rows):
            raise RuntimeError("broken file")
        return {"status": "ok", "faces": len(face_rows[index]), "output": f"out/{item.path}",
                "details": {"faces": face_rows[index]}}

    return run_batch(items, process, quiet=True)


def test_json_rows_carry_the_verdict_and_the_summary_counts_it() -> None:
    apply_row = {"face": 0, "box": [0, 0, 9, 9], "masked": True, "redetected": True,
                 "mobileface": {"score": 0.1, "matches": False}}  # no verdict of its own: the runner adds it
    report = _report([_check(0).to_dict()], [_check(0, ("dlib",)).to_dict(), apply_row])
    first, second = report.results
    assert first.status == "ok" and first.protected is True and first.verdict == "protected against all 7 models"
    assert second.protected is False and "face 0 still recognised by dlib" in second.verdict
    assert second.details["faces"][1]["protected"] is True
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["results"][1]["protected"] is False and doc["results"][1]["verdict"] == second.verdict
    assert doc["verdict"]["protected"] == 2 and doc["verdict"]["still_recognised"] == 1
    assert doc["verdict"]["line"] == ("2 photos written; 2 of 3 faces protected against every model; 1 still "
                                      "recognised by at least one model")


def _args() -> argparse.Namespace:
    return argparse.Namespace(report=None, quiet=True)


@pytest.mark.parametrize("rows, error, code", [
    ([[_check(0).to_dict()]], False, 0),
    ([[_check(0, ("faceres",)).to_dict()]], False, EXIT_STILL_RECOGNISED),
    ([[_check(0, redetected=False).to_dict()]], False, 0),  # not found again: counted, not a failure
    ([[_check(0, ("faceres",)).to_dict()]], True, 2),  # an error outranks a verdict
])
def test_exit_status(rows: list, error: bool, code: int, capsys) -> None:
    assert EXIT_STILL_RECOGNISED == 3
    assert finish_batch(_report(*rows, error=error), "protect", _args()) == code
    assert capsys.readouterr().out.startswith("faceveil protect: 1 photo written; ")


def test_interrupts_keep_their_status() -> None:
    report = BatchReport([ItemResult("a.jpg", "ok", details={"faces": [_check(0, ("dlib",)).to_dict()]})],
                         interrupted=True, signal="SIGTERM")
    assert finish_batch(report, "protect", _args()) == 143


def test_the_api_says_the_same_words() -> None:
    from faceveil.api import ImageResult, face_verdict, verdict_text

    checks = [_check(0, ("faceres", "faceres-deep")), _check(1)]
    assert verdict_text(checks) == ("face 0: protected against 5 of 7 models; still recognised by faceres, "
                                    "faceres-deep\nface 1: protected against all 7 models")
    result = ImageResult(image=None, faces=checks)  # type: ignore[arg-type]
    assert not result.protected and result.summary.startswith("1 of 2 faces protected against all 7 models")
    assert face_verdict(checks[1].to_dict()) == "protected against all 7 models"


def test_the_html_report_shows_the_photo_verdict_and_the_batch_line() -> None:
    from faceveil.report.photos import protect_body

    report = _report([_check(0, ("faceres",)).to_dict()])
    _, body = protect_body(report.to_dict())
    assert "Protected against 6 of 7 models; still recognised by faceres." in body
    assert "1 photo written; 0 of 1 face protected against every model; 1 still recognised" in body


def test_the_protect_table_has_a_verdict_column(capsys) -> None:
    from faceveil.cli.protect import _print_table

    report = _report([_check(0, ("faceres",)).to_dict(), _check(1, redetected=False).to_dict()])
    _print_table(report.results, list(JUDGES))
    out = capsys.readouterr().out
    assert "| verdict |" in out.splitlines()[0]
    assert "| written |" in out and "| ok |" not in out
    assert "still recognised by faceres |" in out and "not found again in the saved photo" in out
    assert "| p0.jpg | | written |" + " |" * len(JUDGES) + " 0 of 2 faces protected against all 7 models |" in out
    assert "Thresholds: mobileface" in out and "dlib -" in out


def test_the_apply_table_has_a_verdict_column(capsys) -> None:
    from faceveil.cli.person import _print_apply_table

    masked = {"face": 0, "box": [1, 1, 9, 9], "masked": True, **_check(0, ("faceres",)).to_dict()}
    report = _report([masked])
    _print_apply_table(report.results)
    out = capsys.readouterr().out
    assert "| written |" in out and "protected against 6 of 7 models; still recognised by faceres" in out


@needs_weights
@pytest.mark.slow
def test_protect_prints_the_verdicts_and_exits_by_them(tmp_path: Path, capsys) -> None:
    """A real run with tiny settings: every face row and the photo have a verdict, the last line counts the faces,
    the exit status follows the verdict; demo's rule (3 -> 0) is checked on its code path."""
    from faceveil.api import sample_photos
    from faceveil.cli import main

    report = tmp_path / "r.json"
    code = main(["protect", str(sample_photos()[0]), "-o", str(tmp_path / "out"), "--strength", "low", "--iters",
                 "1", "--judges", "mobileface", "--json", str(report), "--quiet"])
    assert code in WRITTEN
    doc = json.loads(report.read_text())
    row = doc["results"][0]
    assert row["status"] == "ok" and isinstance(row["verdict"], str) and row["protected"] in (True, False, None)
    assert all("verdict" in face and "protected" in face for face in row["details"]["faces"])
    assert code == (EXIT_STILL_RECOGNISED if doc["verdict"]["still_recognised"] else 0)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"faceveil protect: {doc['verdict']['line']}"


def test_faces_recognised_by_the_same_models_are_said_once() -> None:
    rows = [_check(0, JUDGES).to_dict(), _check(1, JUDGES).to_dict(), _check(2, ("dlib",)).to_dict()]
    assert photo_verdict(rows)[1] == ("0 of 3 faces protected against all 7 models; faces 0, 1 still recognised by "
                                      "all 7 models; face 2 still recognised by dlib")


# ----------------------------------------------------------------------------------------------- progress, timings


def test_the_runner_hands_a_progress_hook_and_books_given_seconds() -> None:
    heard: list = []

    class Job:
        def set_progress(self, advance) -> None:
            heard.append(advance)

        def __call__(self, item: BatchItem) -> dict:
            heard[0](0.5)  # half a file done: the bar moves (a no-op without a terminal)
            return {"status": "no_face", "seconds": 1.25}

    report = run_batch([BatchItem(Path("a.jpg")), BatchItem(Path("b.jpg"))], Job(), quiet=True)
    assert callable(heard[0]) and heard[-1] is None  # taken back at the end
    assert [r.seconds for r in report.results] == [1.25, 1.25]


@needs_weights
@pytest.mark.slow
def test_progress_per_step_and_seconds_that_add_up(tmp_path: Path) -> None:
    """Two photos optimised together: the job reports each optimisation step, and the two rows' seconds are each
    photo's share (both above 0, adding up to the batch's wall time)."""
    import time

    from PIL import Image

    from faceveil.api import Protector, sample_photos
    from faceveil.pipeline.job import plan_files

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        with Image.open(sample_photos()[2]) as im:
            im.convert("RGB").resize((320, 213)).save(src / name, quality=95)
    protector = Protector(strength="low", iters=3, surrogates="mobileface", judges="mobileface", faces="largest")
    job = protector._protector()
    worth: list[float] = []
    job.report_progress = worth.append  # type: ignore[method-assign]
    plan = plan_files([src], tmp_path / "out", protector.settings)
    job.out_dir = plan.out_dir
    job.plan(plan.items)
    start = time.perf_counter()
    report = run_batch(plan.items, job, quiet=True)
    wall = time.perf_counter() - start
    assert [r.status for r in report.results] == ["ok", "ok"]
    assert report.results[0].details["batch"] == {"photos": 2, "faces": 2}
    faces = sum(r.faces for r in report.results)
    assert faces == 2 and len(worth) >= 3
    assert worth[:3] == pytest.approx([0.8 * 2 * k / 3 for k in (1, 2, 3)])  # two photos, three steps
    seconds = [r.seconds for r in report.results]
    assert all(s > 0 for s in seconds) and sum(seconds) == pytest.approx(wall, rel=0.2)


def test_the_line_is_named_after_the_command_run(capsys) -> None:
    args = argparse.Namespace(report=None, quiet=True, command="demo")
    assert finish_batch(_report([_check(0, ("dlib",)).to_dict()]), "protect", args) == EXIT_STILL_RECOGNISED
    assert capsys.readouterr().out == ("faceveil demo: 1 photo written; 0 of 1 face protected against every model; "
                                       "1 still recognised by at least one model\n")


@pytest.mark.parametrize("code, expected", [(0, 0), (EXIT_STILL_RECOGNISED, 0), (2, 2), (130, 130)])
def test_demo_exits_0_whatever_the_verdicts(monkeypatch, code: int, expected: int) -> None:
    from faceveil.cli import protect

    monkeypatch.setattr(protect, "_run_protect", lambda inputs, out, args: code)
    args = argparse.Namespace(output=protect.DEMO_FOLDER, existing="refuse")
    assert protect._cmd_demo(args) == expected
