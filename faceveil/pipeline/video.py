"""Protect the faces in a video: track them frame by frame and paste each one's canonical-space perturbation.

Frames are decoded and encoded by ffmpeg (faceveil.io.video: H.264 mp4, the source's frame rate and audio,
written atomically), so the output has every frame of the input and the same duration. Faces are followed by
`FaceTracker` (full detection every few frames, the O-Net alone in between). Frames wait in a short queue
(`detect_every` frames, 2.7 MB each at 720p) before they are written: a face that a detection finds only some
frames after it came into view is traced back through the queued frames, so it is covered from its first frame.

`delta_for_track(track, frame)` picks each face's perturbation: a canonical [3,256,256] tensor in [0,1] units,
or None to leave that face as it is. It sees the frame before any face in it is changed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.detect.canonical import paste_into
from faceveil.detect.track import FaceTracker, Stopwatch, Track
from faceveil.io.video import (
    DEFAULT_CRF,
    DEFAULT_PRESET,
    DEFAULT_TUNE,
    VideoInfo,
    VideoWriter,
    iter_frames,
    probe_video,
)
from faceveil.pipeline.faces import default_confirmer

DeltaForTrack = Callable[[Track, np.ndarray], "torch.Tensor | None"]


@dataclass
class _Pending:
    """A decoded frame waiting to be written, with the faces tracked in it so far."""

    index: int
    frame: np.ndarray
    tracks: list[Track]


@dataclass
class _Stats:
    frames: int = 0
    faces: int = 0
    pasted: int = 0
    max_faces: int = 0
    frames_with_faces: int = 0
    backfilled: int = 0
    track_ids: set[int] = field(default_factory=set)
    decode: Stopwatch = field(default_factory=Stopwatch)
    paste: Stopwatch = field(default_factory=Stopwatch)
    encode: Stopwatch = field(default_factory=Stopwatch)

    def count(self, tracks: list[Track]) -> None:
        self.frames += 1
        self.faces += len(tracks)
        self.max_faces = max(self.max_faces, len(tracks))
        self.frames_with_faces += bool(tracks)
        self.track_ids.update(t.id for t in tracks)


def protect_video(
    src: Path | str,
    dst: Path | str,
    delta_for_track: DeltaForTrack,
    progress: bool = True,
    *,
    tracker: FaceTracker | None = None,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    tune: str | None = DEFAULT_TUNE,
    keep_metadata: bool = False,
    keep_date: bool = False,
    on_frame: Callable[[int, list[Track]], None] | None = None,
    keep_untouched: bool = True,
    drop_audio: bool = False,
    replace: bool = True,
    max_mode: int | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict:
    """Write dst: src with every tracked face's perturbation pasted on; returns statistics (see `_summary`;
    "written" says whether dst was written).

    tracker: a FaceTracker to use (default: a new one at the video's frame rate); it is reset first.
    on_frame(index, tracks): called for each frame as it is written, with the faces pasted on it.
    keep_untouched=False: a video on which no perturbation was pasted is not written (the photos' rule: nothing
    unprotected is written unless asked). drop_audio: the output has no sound track. replace=False: an existing dst
    is an error; max_mode caps its permission bits. on_progress(fraction of the frames written), after each frame
    (when the container says how many frames it holds).
    """
    started, cpu_started, children_started = time.perf_counter(), time.process_time(), _children_cpu()
    info = probe_video(src)
    tracker = tracker or FaceTracker(fps=float(info.fps), confirm=default_confirmer().faces)
    tracker.reset()
    stats = _Stats()
    writer = VideoWriter(dst, info.fps, audio_from=info, crf=crf, preset=preset, tune=tune,
                         keep_metadata=keep_metadata, keep_date=keep_date, drop_audio=drop_audio, replace=replace,
                         max_mode=max_mode)
    bar = tqdm(total=info.frame_count or None, unit="frame", desc="video", disable=not progress)
    with bar, contextlib.closing(iter_frames(src, info)) as frames:
        try:
            for pending in _tracked(frames, tracker, stats):
                _emit(pending, writer, delta_for_track, stats)
                if on_frame is not None:
                    on_frame(pending.index, pending.tracks)
                if on_progress is not None and info.frame_count:
                    on_progress(min(1.0, (pending.index + 1) / info.frame_count))
                bar.update(1)
            written = keep_untouched or stats.pasted > 0
            with stats.encode:
                if written:
                    writer.close()  # waits for ffmpeg to encode the last frames
                else:
                    writer.abort()
        except BaseException:
            writer.abort()
            raise
    summary = _summary(stats, tracker, info, time.perf_counter() - started, time.process_time() - cpu_started,
                       _children_cpu() - children_started)
    return {**summary, "written": written}


def _tracked(frames: Iterator[np.ndarray], tracker: FaceTracker, stats: _Stats) -> Iterator[_Pending]:
    """Frames with their tracked faces, in order, each held back `detect_every` frames for `_trace_new_tracks`."""
    queue: deque[_Pending] = deque()
    for index, frame in enumerate(_timed_iter(frames, stats)):
        tracks = tracker.update(frame)
        stats.backfilled += _trace_new_tracks(tracker, tracks, queue)
        queue.append(_Pending(index, frame, list(tracks)))
        if len(queue) > tracker.detect_every:
            yield queue.popleft()
    yield from queue


def _emit(pending: _Pending, writer: VideoWriter, delta_for_track: DeltaForTrack, stats: _Stats) -> None:
    with stats.paste:
        stats.pasted += _paste_all(pending.frame, pending.tracks, delta_for_track)
    with stats.encode:
        writer.write(pending.frame)
    stats.count(pending.tracks)


def _timed_iter(frames: Iterator[np.ndarray], stats: _Stats) -> Iterator[np.ndarray]:
    """The frames, with the time spent waiting for each one counted as decode time."""
    while True:
        with stats.decode:
            frame = next(frames, None)
        if frame is None:
            return
        yield frame


def _trace_new_tracks(tracker: FaceTracker, tracks: list[Track], queue: deque[_Pending]) -> int:
    """Follow each track that starts in this frame back through the queued frames; returns faces added."""
    added = 0
    for track in tracks:
        if track.age != 0 or not queue:
            continue
        earlier = list(reversed(queue))
        found = tracker.trace_back(track, [p.frame for p in earlier], [p.tracks for p in earlier])
        for pending, traced in zip(earlier, found, strict=False):
            pending.tracks.append(traced)
        added += len(found)
    return added


def _paste_all(frame: np.ndarray, tracks: list[Track], delta_for_track: DeltaForTrack) -> int:
    """Paste every face's perturbation onto the frame, in place; returns how many were pasted. All deltas are
    chosen first, so each callback sees the unchanged frame."""
    deltas = [(track, delta_for_track(track, frame)) for track in tracks]
    pasted = 0
    for track, delta in deltas:
        if delta is not None:
            pasted += paste_into(frame, track.landmarks, delta) is not None
    return pasted


def _children_cpu() -> float:
    """CPU seconds used by finished child processes (ffmpeg) so far."""
    times = os.times()
    return times.children_user + times.children_system


def _summary(stats: _Stats, tracker: FaceTracker, info: VideoInfo, seconds: float, cpu: float,
             ffmpeg_cpu: float) -> dict:
    """frames, fps, faces, tracks and time split (wall seconds; detection is part of tracking's time)."""
    frames = max(stats.frames, 1)
    return {
        "frames": stats.frames,
        "width": info.width,
        "height": info.height,
        "video_fps": float(info.fps),
        "has_audio": info.has_audio,
        "seconds": seconds,
        "fps": stats.frames / seconds if seconds > 0 else 0.0,
        "cpu_seconds": cpu,
        "ffmpeg_cpu_seconds": ffmpeg_cpu,
        "faces": stats.faces,
        "faces_per_frame": stats.faces / frames,
        "max_faces": stats.max_faces,
        "frames_with_faces": stats.frames_with_faces,
        "pasted": stats.pasted,
        "tracks": len(stats.track_ids),
        "backfilled": stats.backfilled,
        "detection_calls": tracker.detections,
        "onet_crops": tracker.onet_crops,
        "not_faces_skipped": tracker.not_faces,
        "split_seconds": {  # wall; decode/encode: waiting for ffmpeg's pipes (ffmpeg itself runs beside us)
            "decode": stats.decode.wall,
            "detection": tracker.detect_time.wall,
            "tracking": tracker.update_time.wall - tracker.detect_time.wall,
            "paste": stats.paste.wall,
            "encode": stats.encode.wall,
        },
        "split_cpu_seconds": {
            "decode": stats.decode.cpu,
            "detection": tracker.detect_time.cpu,
            "tracking": tracker.update_time.cpu - tracker.detect_time.cpu,
            "paste": stats.paste.cpu,
            "encode": stats.encode.cpu,
        },
    }
