"""`faceveil verify` and `faceveil.verify` on videos: frames sampled evenly, each checked against the same frame of
the original video or against a photo of the person; frames without a face in the original said as such; bad input
is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_weights
from PIL import Image

import faceveil
from faceveil.cli import main
from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.io.video import VideoWriter, read_frames_at, sample_frame_indices
from faceveil.pipeline.results import NO_FACE_IN_ORIGINAL, frames_verdict
from faceveil.pipeline.verify import FrameCheck
from faceveil.report.render import render

JUDGES = "mobileface,faceres"  # two judges keep the video checks short


def _write_video(path: Path, frames: list[np.ndarray]) -> Path:
    with VideoWriter(path, 10) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def _numbered_frames(count: int) -> list[np.ndarray]:
    """Flat frames whose grey level is their index x 20 (survives H.264 closely enough to tell them apart)."""
    return [np.full((48, 64, 3), 20 * i + 10, np.uint8) for i in range(count)]


def _face_video(tmp: Path, blank_first: int = 0) -> Path:
    """A short small video of sample photo 1 (shifted a pixel a frame), after `blank_first` grey frames."""
    with Image.open(weights.sample_photos()[0]) as im:
        im = im.convert("RGB")
        im.thumbnail((320, 320))
        photo = np.asarray(im)[:212]
    frames = [np.full_like(photo, 128) for _ in range(blank_first)]
    frames += [np.roll(photo, i, axis=1).copy() for i in range(4)]
    return _write_video(tmp / "clip.mp4", frames)


def test_sample_frame_indices_are_the_middles_of_equal_stretches():
    assert sample_frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert sample_frame_indices(80, 4) == [10, 30, 50, 70]
    assert sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]  # a short video: every frame
    assert sample_frame_indices(0, 8) == []
    with pytest.raises(FaceveilError, match="positive"):
        sample_frame_indices(100, 0)


def test_read_frames_at_reads_exactly_those_frames(tmp_path: Path):
    video = _write_video(tmp_path / "grey.mp4", _numbered_frames(6))
    frames = read_frames_at(video, [1, 4, 9])  # 9: past the end, absent
    assert sorted(frames) == [1, 4]
    for index, frame in frames.items():
        assert abs(float(frame.mean()) - (20 * index + 10)) < 4


def test_frames_verdict_counts_frames_and_models():
    def face(*still: str) -> dict:
        return {"face": 0, **{m: {"score": 0.9 if m in still else 0.1, "matches": m in still}
                              for m in ("faceres", "facenet-vgg", "dlib")}}
    frames = [[face("faceres")], [face("faceres", "facenet-vgg")], [face()], [], [{"face": 0, "redetected": False}]]
    protected, words = frames_verdict(frames)
    assert protected is False
    assert words == ("5 frames checked: the face is still recognised by at least one model in 2 of 4 (faceres in 2, "
                     f"facenet-vgg in 1); a face not found again in 1; 1 with {NO_FACE_IN_ORIGINAL}")
    assert frames_verdict([[face()], [face()]]) == (True, "2 frames checked: protected against all 3 models in 2 of 2")
    assert frames_verdict([[], []]) == (None, "2 frames checked: no face in the original frames")
    assert FrameCheck(3).verdict == NO_FACE_IN_ORIGINAL


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be a positive number of frames, got 0"),
    (["--transforms", "jpeg9"], "--transforms: unknown jpeg9"),
])
def test_verify_video_bad_settings_are_one_line(tmp_path: Path, capsys, args: list[str], message: str):
    video = _write_video(tmp_path / "grey.mp4", _numbered_frames(3))
    assert main(["verify", str(video), str(video), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_verify_unreadable_or_misordered_video_is_one_line(tmp_path: Path, capsys):
    video = _write_video(tmp_path / "grey.mp4", _numbered_frames(3))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(photo)
    cases = [(video, tmp_path / "missing.mp4", "no such file"), (video, tmp_path / "empty.mp4", "empty file"),
             (video, tmp_path / "junk.mp4", "not a readable video"), (tmp_path / "junk.mp4", video, "not a readable"),
             (video, photo, "give a protected video with its original video, or a photo of the person first")]
    for original, protected, message in cases:
        assert main(["verify", str(original), str(protected), "--models", "mobileface"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("faceveil: error:") and message in err and "\n" not in err, err


@needs_weights
@pytest.mark.slow
def test_verify_video_against_itself_matches_everywhere(tmp_path: Path, capsys):
    video = _face_video(tmp_path, blank_first=2)  # 6 frames: 2 grey, 4 of the photo
    out = tmp_path / "self.json"
    assert main(["verify", str(video), str(video), "--frames", "3", "--models", JUDGES, "--faces", "largest",
                 "--json", str(out), "--report", str(tmp_path / "self.html")]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["settings"]["frames"] == [1, 3, 5] and doc["settings"]["transforms"] == ["none"]
    assert doc["settings"]["frames_without_face_in_original"] == [1]
    assert "| frame | model | transform |" in printed and f"frame 1: {NO_FACE_IN_ORIGINAL}" in printed
    assert {r["frame"] for r in doc["rows"]} == {3, 5} and len(doc["rows"]) == 2 * 2
    for row in doc["rows"]:
        assert row["score"] == pytest.approx(1.0, abs=1e-3) and row["matches"] is True and row["rank"] == 1
    assert [f["protected"] for f in doc["frames"]] == [None, False, False]
    assert doc["summary"] == ("3 frames checked: the face is still recognised by at least one model in 2 of 2 "
                              f"(all 2 models in 2); 1 with {NO_FACE_IN_ORIGINAL}")
    assert doc["summary"] in printed
    page = (tmp_path / "self.html").read_text()
    assert "clip.mp4, frame 3" in page and "clip.mp4, frame 1" in page and doc["summary"] in page
    assert "clip.mp4, frame 5" in render("verify", doc)  # the JSON document renders the same way


@needs_weights
@pytest.mark.slow
def test_verify_video_against_a_photo_of_the_person(tmp_path: Path):
    video = _face_video(tmp_path)
    photo = weights.sample_photos()[0]
    checks = faceveil.verify(photo, video, judges=JUDGES.split(","), faces="largest", frames=2)
    assert [c.frame for c in checks] == [1, 3]
    for check in checks:
        assert isinstance(check, FrameCheck) and len(check.faces) == 1
        assert check.faces[0].recognised_by == JUDGES.split(",")  # the same person, downscaled
    assert faceveil.verify(video, video, judges=["mobileface"], frames=1)[0].faces  # the video against itself
    with pytest.raises(FaceveilError, match="as paths"):
        faceveil.verify(np.zeros((8, 8, 3), np.uint8), video)
