"""faceveil.io.video: a 2-second 720p clip with a sine-tone track, made here with ffmpeg's lavfi sources."""

from __future__ import annotations

import hashlib
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from faceveil.errors import FaceveilError
from faceveil.io import atomic

pytest.importorskip("imageio_ffmpeg")

from faceveil.io.video import VideoWriter, ffmpeg_exe, iter_frames, probe_video, process_video  # noqa: E402


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _clip(
    path: Path, *, audio: bool = True, size: str = "1280x720", rate: str = "30", seconds: int = 2
) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", "-shortest"]
    _ffmpeg(*args, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_probe(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.width, info.height) == (1280, 720)
    assert info.fps == 30 and info.frame_count == 60
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.has_audio and info.audio_codec == "aac"


def test_read_write_keeps_frames_duration_and_audio(clip: Path, tmp_path: Path) -> None:
    before = _sha(clip)
    first = next(iter(iter_frames(clip)))
    assert first.shape == (720, 1280, 3) and first.dtype == np.uint8 and first.flags.writeable
    out = tmp_path / "out.mp4"
    process_video(clip, out)
    info = probe_video(out)
    assert sum(1 for _ in iter_frames(out)) == 60
    assert info.fps == 30 and (info.width, info.height) == (1280, 720)
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert info.has_audio and info.audio_codec == "aac"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert _sha(clip) == before
    again = next(iter(iter_frames(out)))
    assert np.abs(again.astype(int) - first.astype(int)).mean() < 4  # H.264 at CRF 18


def test_frame_transform_is_applied(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "dark.mp4"
    process_video(clip, out, lambda frame: frame // 2)
    src, dst = next(iter(iter_frames(clip))), next(iter(iter_frames(out)))
    assert abs(float(dst.mean()) - float(src.mean()) / 2) < 3


def test_no_audio_odd_size_and_ntsc_rate(tmp_path: Path) -> None:
    src = _clip(tmp_path / "odd.mp4", audio=False, size="322x242", rate="30000/1001", seconds=1)
    info = probe_video(src)
    assert not info.has_audio and info.fps == Fraction(30000, 1001)
    out = tmp_path / "out" / "odd.mp4"
    out.parent.mkdir()
    frames = [np.zeros((241, 321, 3), np.uint8)] * 3
    with VideoWriter(out, info.fps) as writer:
        for frame in frames:
            writer.write(frame)
    written = probe_video(out)
    assert (written.width, written.height) == (320, 240)  # cropped to even, never rescaled
    assert written.fps == Fraction(30000, 1001) and not written.has_audio


def test_interrupt_leaves_nothing(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt), VideoWriter(out, 30, audio_from=probe_video(clip)) as writer:
        for index, frame in enumerate(iter_frames(clip)):
            writer.write(frame)
            if index == 10:
                raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert atomic.live_temp_files() == []


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n")
    cases = (("empty.mp4", "empty"), ("text.mp4", "not a readable video"), ("none.mp4", "no such"))
    for name, words in cases:
        with pytest.raises(FaceveilError, match=words) as caught:
            probe_video(tmp_path / name)
        assert "\n" not in str(caught.value)
    with pytest.raises(FaceveilError, match="no frames"):
        VideoWriter(tmp_path / "x.mp4", 30).close()


def test_rotation_metadata_is_applied(clip: Path, tmp_path: Path) -> None:
    rotated = tmp_path / "rotated.mp4"
    _ffmpeg("-display_rotation", "90", "-i", str(clip), "-c", "copy", str(rotated))
    info = probe_video(rotated)
    assert info.rotation == 90 and (info.width, info.height) == (720, 1280)
    assert next(iter(iter_frames(rotated))).shape == (1280, 720, 3)


def _tags(path: Path) -> str:
    cmd = [ffmpeg_exe(), "-hide_banner", "-i", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True).stderr.split("Stream #")[0]


def test_location_is_stripped_unless_kept(tmp_path: Path) -> None:
    small = _clip(tmp_path / "small.mp4", size="320x240", seconds=1)
    tagged = tmp_path / "tagged.mp4"
    _ffmpeg("-i", str(small), "-c", "copy", "-metadata", "location=+51.5000-000.1200/", str(tagged))
    assert "+51.5000" in _tags(tagged)
    out = tmp_path / "out"
    out.mkdir()
    process_video(tagged, out / "plain.mp4", lambda frame: frame)
    process_video(tagged, out / "kept.mp4", keep_metadata=True)
    assert "+51.5000" not in _tags(out / "plain.mp4")
    assert "+51.5000" in _tags(out / "kept.mp4")
    assert probe_video(out / "plain.mp4").has_audio and probe_video(out / "kept.mp4").has_audio


def test_keep_date_keeps_the_creation_time_alone(tmp_path: Path) -> None:
    small = _clip(tmp_path / "small.mp4", size="320x240", seconds=1)
    tagged = tmp_path / "tagged.mov"
    _ffmpeg("-i", str(small), "-c", "copy", "-metadata", "location=+51.5000-000.1200/",
            "-metadata", "creation_time=2021-05-06T07:08:09.000000Z", str(tagged))
    assert probe_video(tagged).creation_time == "2021-05-06T07:08:09.000000Z"
    process_video(tagged, tmp_path / "dated.mp4", keep_date=True)
    process_video(tagged, tmp_path / "plain.mp4")
    tags = _tags(tmp_path / "dated.mp4")
    assert "2021-05-06T07:08:09" in tags and "+51.5000" not in tags
    assert probe_video(tmp_path / "plain.mp4").creation_time is None
