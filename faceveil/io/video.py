"""Reading and writing videos through the ffmpeg binary that imageio-ffmpeg ships.

`probe_video` reads size, frame rate, frame count, duration and audio from the file (one stream-copy pass, no
decoding). `iter_frames` yields RGB uint8 frames (rotation metadata applied by ffmpeg). `VideoWriter` encodes
H.264 / yuv420p mp4 at the source frame rate into a temp file beside the target, muxing the source's audio in
the same pass (stream copy when mp4 can hold the codec, else AAC), and renames it into place on success only.
Container metadata (creation time, location, device) is dropped unless keep_metadata=True; keep_date=True keeps the
creation time alone.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.images import DEFAULT_MAX_PIXELS

__all__ = [
    "VideoInfo", "VideoWriter", "ffmpeg_exe", "iter_frames", "probe_video", "process_video", "read_frames_at",
    "sample_frame_indices",
]

COPYABLE_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3"})
DEFAULT_CRF = 18
DEFAULT_PRESET = "veryfast"
# x264's film-grain tuning keeps fine noise-like detail (what an identity mask is) instead of smoothing it.
DEFAULT_TUNE = "grain"
# Even size for 4:2:0 (crop, never rescale: rescaling would blur the mask); BT.709 matrix, tagged as such.
_VIDEO_FILTER = (
    "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0,"
    "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p"
)


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary (imageio-ffmpeg's, or $IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise FaceveilError("video needs the imageio-ffmpeg package: pip install imageio-ffmpeg") from exc
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:
        raise FaceveilError(f"no ffmpeg binary found: {exc}") from exc


# ----------------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds; width/height are those of the frames iter_frames yields (rotation applied)."""

    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int  # from the container's packets; iter_frames yields the exact number
    duration: float  # seconds, 0.0 when unknown
    has_audio: bool
    audio_codec: str | None
    video_codec: str
    rotation: int  # degrees the player rotates by (already applied to the frames)
    creation_time: str | None = None  # the container's creation_time tag (when it was filmed), as ffmpeg prints it

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def probe_video(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Inspect a video without decoding it; a clear FaceveilError if it is not a readable video."""
    path = Path(path)
    _check_input(path)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    cmd += ["-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    log = result.stderr
    if "matches no streams" in log:
        raise FaceveilError(f"{path}: no video stream (audio only?)")
    if result.returncode != 0:
        raise FaceveilError(f"{path}: not a readable video ({_last_line(log)})")
    info = _parse_probe(path, log)
    if info.width * info.height > max_pixels:
        size = f"{info.width}x{info.height}"
        raise FaceveilError(f"{path}: {size} frames are over the {max_pixels / 1e6:g} MP limit")
    return info


def _check_input(path: Path) -> None:
    if not path.is_file():
        raise FaceveilError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise FaceveilError(f"{path}: empty file (0 bytes)")


def _parse_probe(path: Path, log: str) -> VideoInfo:
    header = re.split(r"^(?:Output #0|Stream mapping:)", log, maxsplit=1, flags=re.M)[0]
    video = re.search(r"Stream #0:\d+\S*: Video: (\w+).*?, (\d{1,5})x(\d{1,5})[ ,\[]", header)
    if not video:
        raise FaceveilError(f"{path}: no video stream found")
    width, height = int(video.group(2)), int(video.group(3))
    rotation = _rotation(header[video.end():])
    if rotation % 180 == 90:
        width, height = height, width
    audio = re.search(r"Stream #0:\d+\S*: Audio: (\w+)", header)
    frames = re.findall(r"frame=\s*(\d+)", log)
    return VideoInfo(
        path=path, width=width, height=height, fps=_fps(header[video.start():], path),
        frame_count=int(frames[-1]) if frames else 0, duration=_duration(header),
        has_audio=audio is not None, audio_codec=audio.group(1) if audio else None,
        video_codec=video.group(1), rotation=rotation, creation_time=_creation_time(header),
    )


def _creation_time(header: str) -> str | None:
    match = re.search(r"^\s*creation_time\s*:\s*(\S+)\s*$", header, flags=re.M)
    return match.group(1) if match else None


def _rotation(after_video_line: str) -> int:
    block = re.split(r"Stream #", after_video_line, maxsplit=1)[0]
    match = re.search(r"rotation of (-?[\d.]+) degrees", block)
    return int(round(float(match.group(1)))) % 360 if match else 0


def _fps(video_line: str, path: Path) -> Fraction:
    line = video_line.splitlines()[0]
    match = re.search(r", ([\d.]+)(k?) fps", line) or re.search(r", ([\d.]+)(k?) tbr", line)
    if not match:
        raise FaceveilError(f"{path}: cannot tell the frame rate")
    value = float(match.group(1)) * (1000 if match.group(2) else 1)
    for base in (24, 30, 48, 60, 120, 240):
        if abs(value - base * 1000 / 1001) < 0.006:
            return Fraction(base * 1000, 1001)
    return Fraction(match.group(1)).limit_denominator(1000) * (1000 if match.group(2) else 1)


def _duration(header: str) -> float:
    match = re.search(r"Duration: (\d+):(\d+):([\d.]+)", header)
    if not match:
        return 0.0
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _last_line(log: str) -> str:
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "ffmpeg failed"


# ------------------------------------------------------------------------------------------------------ read


def iter_frames(path: Path | str, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield each frame as a writable H x W x 3 uint8 RGB array; ffmpeg stops when the generator closes."""
    info = info or probe_video(path)
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(info.path),
        "-map", "0:v:0", "-an", "-sn", "-dn", "-fps_mode", "passthrough",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]
    frame_bytes = info.width * info.height * 3
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, bufsize=frame_bytes,
            start_new_session=True,
        )
        try:
            yield from _read_raw_frames(proc.stdout, frame_bytes, (info.height, info.width, 3), info.path)
            if proc.wait() != 0:
                raise FaceveilError(f"{info.path}: cannot decode video ({_read_log(log)})")
        finally:
            _stop(proc)


def sample_frame_indices(frame_count: int, count: int) -> list[int]:
    """`count` frame indices evenly spaced over a video of `frame_count` frames: the middle frame of each of `count`
    equal stretches (so neither the first nor the last frame, often a fade; every frame when there are no more)."""
    if count <= 0:
        raise FaceveilError(f"`frames` must be a positive number of frames, got {count}")
    if frame_count <= count:
        return list(range(frame_count))
    return [(2 * i + 1) * frame_count // (2 * count) for i in range(count)]


def read_frames_at(path: Path | str, indices: list[int], info: VideoInfo | None = None) -> dict[int, np.ndarray]:
    """The frames at those indices (0 = first), decoding the video once up to the last of them; an index past the
    video's end (a container that over-counts its frames) is absent from the result."""
    wanted, out = set(indices), {}
    if not wanted:
        return out
    frames = iter_frames(path, info)
    try:
        for index, frame in enumerate(frames):
            if index in wanted:
                out[index] = frame
            if index >= max(wanted):
                break
    finally:
        frames.close()
    return out


def _read_raw_frames(
    stream: IO[bytes] | None, frame_bytes: int, shape: tuple[int, int, int], path: Path
) -> Iterator[np.ndarray]:
    assert stream is not None
    while True:
        buffer = bytearray(frame_bytes)
        filled = _fill(stream, buffer)
        if filled == 0:
            return
        if filled < frame_bytes:
            raise FaceveilError(f"{path}: video ended inside a frame (damaged file?)")
        yield np.frombuffer(buffer, dtype=np.uint8).reshape(shape)


def _fill(stream: IO[bytes], buffer: bytearray) -> int:
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        got = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            break
        filled += got
    return filled


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    proc.wait()


def _read_log(log: IO[bytes]) -> str:
    log.seek(0)
    return _last_line(log.read().decode("utf-8", "replace"))


# ----------------------------------------------------------------------------------------------------- write


class VideoWriter:
    """Encode RGB frames to an H.264 mp4, atomically; use as a context manager.

    audio_from: a source video whose audio is carried over (copied when mp4 can hold its codec) unless drop_audio.
    replace=False: an existing out_path is an error and stays as it is; max_mode caps the file's permission bits.
    An exception inside the `with` block (KeyboardInterrupt too) stops ffmpeg and removes the temp file.
    """

    def __init__(
        self,
        out_path: Path | str,
        fps: Fraction | float | int,
        *,
        audio_from: VideoInfo | None = None,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        tune: str | None = DEFAULT_TUNE,
        keep_metadata: bool = False,
        keep_date: bool = False,
        drop_audio: bool = False,
        replace: bool = True,
        max_mode: int | None = None,
    ) -> None:
        self.out_path = Path(out_path)
        self.drop_audio, self.replace, self.max_mode = drop_audio, replace, max_mode
        self.fps = Fraction(fps).limit_denominator(100_000)
        self.audio_from, self.crf, self.preset, self.tune = audio_from, crf, preset, tune
        self.keep_metadata, self.keep_date = keep_metadata, keep_date
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp: Path | None = None
        self._log: IO[bytes] | None = None
        self._shape: tuple[int, int, int] | None = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Append one H x W x 3 uint8 RGB frame (all frames the same size)."""
        if self._proc is None:
            self._start(frame.shape)
        if frame.shape != self._shape or frame.dtype != np.uint8:
            raise ValueError(f"frame must be {self._shape} uint8, got {frame.shape} {frame.dtype}")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except (BrokenPipeError, OSError) as exc:
            raise self._failure() from exc

    def close(self) -> Path:
        """Finish encoding and move the file into place; returns the output path."""
        if self._proc is None:
            raise FaceveilError(f"cannot write {self.out_path}: no frames")
        assert self._proc.stdin is not None and self._temp is not None
        try:
            self._proc.stdin.close()
            if self._proc.wait() != 0:
                raise self._failure()
            atomic.commit(self._temp, self.out_path, replace=self.replace, max_mode=self.max_mode)
        except BaseException:
            self.abort()
            raise
        self._cleanup_log()
        return self.out_path

    def abort(self) -> None:
        """Stop ffmpeg and remove the temp file; the target is left untouched."""
        if self._proc is not None:
            _stop(self._proc)
        if self._temp is not None:
            atomic.discard(self._temp)
        self._cleanup_log()

    def _start(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"frames must be H x W x 3 RGB, got {shape}")
        self._shape = (int(shape[0]), int(shape[1]), 3)
        self._temp = atomic.temp_path_for(self.out_path)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
            start_new_session=True,
        )

    def _command(self) -> list[str]:
        assert self._shape is not None and self._temp is not None
        height, width, _ = self._shape
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(self.fps),
            "-i", "-",
        ]
        if self.audio_from is None:
            cmd += ["-map", "0:v:0"]
        else:  # input 1: the source, for its audio and (keep_metadata) its tags; inputs come before maps
            audio = [] if self.drop_audio else ["-map", "1:a?", *self._audio_args()]
            cmd += ["-i", str(self.audio_from.path), "-map", "0:v:0", *audio]
        return cmd + [
            "-vf", _VIDEO_FILTER,
            "-c:v", "libx264", "-preset", self.preset, *(["-tune", self.tune] if self.tune else []),
            "-crf", str(self.crf), "-pix_fmt", "yuv420p",
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
            "-map_metadata", "1" if self.keep_metadata and self.audio_from is not None else "-1",
            *self._date_args(), "-map_chapters", "-1", "-movflags", "+faststart", "-f", "mp4", str(self._temp),
        ]

    def _date_args(self) -> list[str]:
        """keep_date alone: the source's creation time, and no other tag."""
        source = self.audio_from
        if self.keep_metadata or not self.keep_date or source is None or not source.creation_time:
            return []
        return ["-metadata", f"creation_time={source.creation_time}"]

    def _audio_args(self) -> list[str]:
        assert self.audio_from is not None
        if not self.audio_from.has_audio:
            return []
        if self.audio_from.audio_codec in COPYABLE_AUDIO:
            return ["-c:a", "copy"]
        return ["-c:a", "aac", "-b:a", "192k"]

    def _failure(self) -> FaceveilError:
        """The encoder's error, blamed on the source when it was the source (its sound, read by the encoder as
        input #1) that ffmpeg could not read: a damaged input is the input's fault, not the encoder's."""
        last = self._ffmpeg_error()
        full = ""
        if self._log is not None:
            self._log.seek(0)
            full = self._log.read().decode("utf-8", "replace")
        source = self.audio_from.path if self.audio_from is not None else None
        return encoder_error(full or last, last, self.out_path, source)

    def _ffmpeg_error(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        return _read_log(self._log) if self._log is not None else "ffmpeg failed"

    def _cleanup_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def encoder_error(log: str, last_line: str, out_path: Path, source: Path | None) -> FaceveilError:
    """The one-line error of a failed encode: 'SOURCE: damaged input' when ffmpeg's log names the source or its
    streams (input #1), else 'cannot encode OUT'."""
    if source is not None and (str(source) in log or re.search(r"#1:\d|[Ii]nput #1", log)):
        return FaceveilError(f"{source}: damaged input, ffmpeg cannot read it ({last_line})")
    return FaceveilError(f"cannot encode {out_path}: {last_line}")


# ------------------------------------------------------------------------------------------------ read+write


def process_video(
    src: Path | str,
    dst: Path | str,
    frame_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    tune: str | None = DEFAULT_TUNE,
    keep_metadata: bool = False,
    keep_date: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> VideoInfo:
    """Read src, pass each frame through frame_fn (default: none), write dst with src's fps and audio."""
    info = probe_video(src)
    writer = VideoWriter(
        dst, info.fps, audio_from=info, crf=crf, preset=preset, tune=tune, keep_metadata=keep_metadata,
        keep_date=keep_date,
    )
    with writer as out, contextlib.closing(iter_frames(src, info)) as frames:
        for index, frame in enumerate(frames):
            out.write(frame if frame_fn is None else frame_fn(frame))
            if on_frame is not None:
                on_frame(index)
    return info
