"""Face tracking for video: full MTCNN detection now and then, the O-Net alone on every frame in between.

Per frame, `FaceTracker.update`:

1. refreshes every track: the O-Net runs on the square around the track's last box, moved by the track's
   recent motion, and gives a new box, 5 landmarks and a face probability; a track whose probability falls
   below `keep_score` is lost, and a track that comes to cover the same face as an older one is merged into it;
2. runs the full detector on the first frame, every `detect_every` frames after the last run, and at once
   whenever a track was lost (it may only have moved too fast for the O-Net's crop, or been hidden); detections
   are matched to tracks by box IoU (greedy, best pair first): a matched track takes the detection's box and
   landmarks instead of the O-Net's, an unmatched detection revives a track lost in the last `2 * detect_every`
   frames at the same place (same id) or starts a new track, and a track that more than `max_missed` detections
   in a row did not find is dropped even if the O-Net still likes it;
3. smooths each track's landmarks with a One-Euro filter (Casiez et al. 2012), one step per frame, whose cutoff
   rises with the face's speed in face sizes per second: a still face's pasted mask does not jitter, a moving
   one does not lag. The filter moves all 5 points with one gain, so the face's shape is not distorted.

Track ids are stable: a face keeps its id for as long as it is tracked, and gets it back if it is found again
near where it was lost. `trace_back` follows a new track backwards through earlier frames (the video pipeline
keeps a few), so a face that enters between two detections is covered from its first frame.

Boxes are (x1, y1, x2, y2) in pixel-edge units and landmarks [5, 2] in pixel-centre units, as in mtcnn.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from faceveil.detect.mtcnn import (
    MTCNN,
    Face,
    _batched,
    _landmarks,
    _Levels,
    _regress,
    _square,
    _torch_threads,
    default_detector,
)

Box = tuple[float, float, float, float]
_ONET_SIZE = 48
_ZERO_PIXEL = (0.0 - 127.5) * 0.0078125  # a black pixel, normalised as the nets expect


@dataclass(frozen=True, eq=False)
class Track:
    """One tracked face in one frame.

    landmarks: smoothed [5, 2] (use these to paste); box: the measured (unsmoothed) box; score: the face
    probability measured on this frame (the O-Net's, or the detector's); detected: this frame's measurement came
    from a full detection; age: frames since the track started (0 on its first frame; -1, -2, ... on the frames
    before it that `trace_back` found it in).
    """

    id: int
    landmarks: np.ndarray
    box: Box
    score: float
    detected: bool = False
    age: int = 0

    @property
    def size(self) -> float:
        """Geometric mean of the box sides."""
        return _box_size(self.box)


class Stopwatch:
    """Wall and CPU seconds (this process, all its threads) spent inside `with stopwatch:` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._start = (0.0, 0.0)

    def __enter__(self) -> Stopwatch:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]

    def as_dict(self) -> dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu}


# ----------------------------------------------------------------------------------------------- smoothing


@dataclass
class OneEuro:
    """One-Euro filter for a landmark set [5, 2], with one cutoff for all points (the shape stays rigid).

    min_cutoff (Hz): smoothing of a still face (lower = smoother); beta: how fast the cutoff rises with speed,
    per face size per second; d_cutoff (Hz): smoothing of the speed estimate.
    """

    fps: float = 25.0
    min_cutoff: float = 1.0
    beta: float = 4.0
    d_cutoff: float = 1.0
    _value: np.ndarray | None = field(default=None, init=False, repr=False)
    _speed: float = field(default=0.0, init=False, repr=False)

    def reset(self) -> None:
        self._value, self._speed = None, 0.0

    def __call__(self, points: np.ndarray, face_size: float) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        if self._value is None:
            self._value = points.copy()
            return self._value.copy()
        step = 1.0 / self.fps
        speed = float(np.linalg.norm(points - self._value, axis=-1).mean()) / max(face_size, 1.0) / step
        self._speed += _alpha(self.d_cutoff, step) * (speed - self._speed)
        cutoff = self.min_cutoff + self.beta * self._speed
        self._value = self._value + _alpha(cutoff, step) * (points - self._value)
        return self._value.copy()


def _smoothed(smoother: OneEuro | None, landmarks: np.ndarray, box: Box) -> np.ndarray:
    marks = np.asarray(landmarks, dtype=np.float64)
    return marks.copy() if smoother is None else smoother(marks, _box_size(box))


def _alpha(cutoff: float, step: float) -> float:
    tau = 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / step)


# ----------------------------------------------------------------------------------------------- O-Net


@dataclass(frozen=True)
class _Measure:
    box: Box
    landmarks: np.ndarray
    score: float


def _crop_input(frame: np.ndarray, square: torch.Tensor) -> torch.Tensor:
    """O-Net input [1,3,48,48] for a square box, area-resampled from just the frame region under it."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = square.tolist()
    ix0, iy0 = max(0, math.floor(x1)), max(0, math.floor(y1))
    ix1, iy1 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    if ix1 - ix0 < 1 or iy1 - iy0 < 1 or x2 - x1 < 1:
        return torch.full((1, 3, _ONET_SIZE, _ONET_SIZE), _ZERO_PIXEL)
    region = Image.fromarray(np.ascontiguousarray(frame[iy0:iy1, ix0:ix1]))
    shift = torch.tensor([ix0, iy0, ix0, iy0], dtype=square.dtype)
    return _Levels(region).crops((square - shift)[None], _ONET_SIZE)


def measure(detector: MTCNN, frame: np.ndarray, boxes: Sequence[Box]) -> list[_Measure]:
    """Run the O-Net on the square around each box: new box, landmarks and face probability per box."""
    if not boxes:
        return []
    with torch.inference_mode(), _torch_threads(1):
        squares = _square(torch.tensor(boxes, dtype=torch.float64))
        crops = torch.cat([_crop_input(frame, sq) for sq in squares])
        prob, reg, marks = _batched(detector.onet, crops)
        points = _landmarks(squares, marks.double())
        regressed = _regress(squares, reg.double())
    return [_Measure(tuple(b.tolist()), p.numpy(), float(s))  # type: ignore[arg-type]
            for b, p, s in zip(regressed, points, prob, strict=True)]


# ----------------------------------------------------------------------------------------------- geometry


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_size(box: Box) -> float:
    return math.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _shift(box: Box, motion: np.ndarray) -> Box:
    dx, dy = float(motion[0]), float(motion[1])
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def _centre(box: Box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def greedy_match(a: Sequence[Box], b: Sequence[Box], threshold: float) -> list[tuple[int, int]]:
    """Pairs (i, j) of boxes a[i], b[j], best IoU first, each box used once, IoU >= threshold."""
    pairs = sorted(((iou(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b)), reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for overlap, i, j in pairs:
        if overlap < threshold:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return out


# ----------------------------------------------------------------------------------------------- tracker


@dataclass
class _State:
    """A live track: its last raw measurement, motion per frame, smoothing filter and bookkeeping."""

    id: int
    box: Box
    score: float
    smoother: OneEuro | None
    motion: np.ndarray = field(default_factory=lambda: np.zeros(2))
    smoothed: np.ndarray | None = None
    start: int = 0
    missed: int = 0
    detected: bool = False
    pending: _Measure | Face | None = None

    @property
    def latest(self) -> _Measure | Face | _State:
        """This frame's measurement if there is one yet, else the last frame's state (both have .box)."""
        return self.pending if self.pending is not None else self

    def measure(self, m: _Measure | Face, detected: bool) -> None:
        """Set this frame's measurement (a later one, e.g. a matched detection, replaces an earlier one)."""
        self.pending, self.detected = m, detected

    def commit(self) -> None:
        """Take this frame's measurement: update the motion estimate and the smoothed landmarks."""
        m, self.pending = self.pending, None
        assert m is not None
        step = _centre(m.box) - _centre(self.box)
        self.motion = 0.5 * self.motion + 0.5 * step
        self.box, self.score = tuple(m.box), float(m.score)
        self.smoothed = _smoothed(self.smoother, m.landmarks, self.box)

    def predicted_box(self) -> Box:
        return _shift(self.box, self.motion)

    def track(self, frame_index: int) -> Track:
        assert self.smoothed is not None
        age = frame_index - self.start
        return Track(self.id, self.smoothed.astype(np.float32), self.box, self.score, self.detected, age)


@dataclass
class _Lost:
    id: int
    box: Box
    frame: int


class FaceTracker:
    """Track faces through a video: `update(frame)` once per frame, in order; see the module docstring.

    detector: an MTCNN (default: the shared one). detect_every: frames between full detections. max_side:
    frames with a longer side are detected on a copy downscaled to this (detect_large), then refined at full
    resolution. keep_score: the O-Net probability below which a track is lost. match_iou: the box overlap that
    ties a detection to a track. max_missed: detections in a row that may miss a track before it is dropped.
    fps, min_cutoff, beta: landmark smoothing (see OneEuro); smooth=False turns it off. confirm: (frame, faces) ->
    the faces among them that are faces (faceveil.detect.confirm); asked only before a track starts.
    """

    def __init__(self, detector: MTCNN | None = None, detect_every: int = 10, *, max_side: int = 1024,
                 keep_score: float = 0.5, match_iou: float = 0.3, max_missed: int = 2, fps: float = 25.0,
                 min_cutoff: float = 1.0, beta: float = 4.0, smooth: bool = True,
                 confirm: Callable[[np.ndarray, list[Face]], list[Face]] | None = None) -> None:
        if detect_every < 1:
            raise ValueError("detect_every must be at least 1")
        self.detector = detector or default_detector()
        self.detect_every, self.max_side = int(detect_every), int(max_side)
        self.keep_score, self.match_iou, self.max_missed = float(keep_score), float(match_iou), int(max_missed)
        self.fps, self.min_cutoff, self.beta, self.smooth = float(fps), float(min_cutoff), float(beta), smooth
        self.confirm = confirm
        self.reset()

    def reset(self) -> None:
        """Forget all tracks (a new video)."""
        self._states: list[_State] = []
        self._lost: list[_Lost] = []
        self._next_id = 0
        self.frame_index = -1
        self._since_detection = 0
        self.detections = 0  # full detector runs
        self.onet_crops = 0  # O-Net runs of tracking (refresh and trace_back)
        self.not_faces = 0  # detections refused by `confirm` (not a face): no track started
        self.detect_time = Stopwatch()  # in the full detector
        self.update_time = Stopwatch()  # in update (detection included) and trace_back

    # ---- per frame

    def update(self, frame: np.ndarray) -> list[Track]:
        """The tracked faces in the next frame (HxWx3 uint8 RGB), oldest track first.

        Runs torch on one thread: the work is many small ops, which a second thread slows down (10x and worse
        on a busy CPU, e.g. beside the ffmpeg encoder).
        """
        with self.update_time, torch.inference_mode(), _torch_threads(1):
            return self._update(frame)

    def _update(self, frame: np.ndarray) -> list[Track]:
        """Measure every track once (O-Net, or the detection it matched), then smooth: one filter step a frame."""
        self.frame_index += 1
        lost = self._refresh(frame)
        self._since_detection += 1
        if self.frame_index == 0 or lost or self._since_detection >= self.detect_every:
            self._detect(frame)
        for state in self._states:
            state.commit()
        return [s.track(self.frame_index) for s in self._states]

    def _refresh(self, frame: np.ndarray) -> bool:
        """O-Net on every track's predicted box; drop the lost ones and duplicates. True if any was lost."""
        if not self._states:
            return False
        found = measure(self.detector, frame, [s.predicted_box() for s in self._states])
        self.onet_crops += len(found)
        kept: list[_State] = []
        lost = False
        for state, m in zip(self._states, found, strict=True):
            if m.score < self.keep_score:
                self._lose(state)
                lost = True
            elif any(iou(m.box, k.box) > 0.5 for k in kept):
                self._lose(state)  # now on the same face as an older track: merged into it
            else:
                state.measure(m, detected=False)
                kept.append(state)
        self._states = kept
        return lost

    def _detect(self, frame: np.ndarray) -> None:
        self._since_detection = 0
        self.detections += 1
        with self.detect_time:
            faces = self.detector.detect_large(frame, self.max_side)
        new = [f for f in self._assign(faces) if not any(iou(f.box, s.latest.box) > 0.5 for s in self._states)]
        if self.confirm is not None and new:
            confirmed = self.confirm(frame, new)
            self.not_faces += len(new) - len(confirmed)
            new = confirmed
        for face in new:
            self._start(face)

    def _assign(self, faces: list[Face]) -> list[Face]:
        """Give matched tracks their detection, drop tracks missed too often; returns the unmatched faces."""
        pairs = greedy_match([s.latest.box for s in self._states], [f.box for f in faces], self.match_iou)
        for i, j in pairs:
            self._states[i].measure(faces[j], detected=True)
            self._states[i].missed = -1
        for state in self._states:
            state.missed += 1
            if state.missed > self.max_missed:
                self._lose(state)
        self._states = [s for s in self._states if s.missed <= self.max_missed]
        matched = {j for _, j in pairs}
        return [face for j, face in enumerate(faces) if j not in matched]

    def _start(self, face: Face) -> None:
        self._forget_old_losses()
        revived = max(self._lost, key=lambda lost: iou(lost.box, face.box), default=None)
        if revived is not None and iou(revived.box, face.box) >= self.match_iou:
            self._lost.remove(revived)
            track_id = revived.id
        else:
            track_id, self._next_id = self._next_id, self._next_id + 1
        state = _State(track_id, tuple(face.box), float(face.score), self._smoother(), start=self.frame_index)
        state.measure(face, detected=True)
        self._states.append(state)

    def _lose(self, state: _State) -> None:
        self._lost.append(_Lost(state.id, state.box, self.frame_index))

    def _forget_old_losses(self) -> None:
        horizon = self.frame_index - 2 * self.detect_every
        self._lost = [lost for lost in self._lost if lost.frame >= horizon]

    def _smoother(self) -> OneEuro | None:
        return OneEuro(self.fps, self.min_cutoff, self.beta) if self.smooth else None

    # ---- backwards

    def trace_back(self, track: Track, frames: Sequence[np.ndarray],
                   occupied: Sequence[Sequence[Track]] = ()) -> list[Track]:
        """Follow a track backwards: frames[0] is the frame before the track's first, frames[1] the one before
        that, and so on. Returns the track in as many of those frames as the O-Net keeps finding it, stopping
        where it overlaps a track in occupied[k] (the tracks already known in frames[k])."""
        with self.update_time, torch.inference_mode(), _torch_threads(1):
            return self._trace_back(track, frames, occupied)

    def _trace_back(self, track: Track, frames: Sequence[np.ndarray],
                    occupied: Sequence[Sequence[Track]]) -> list[Track]:
        smoother = self._smoother()
        _smoothed(smoother, track.landmarks, track.box)
        box, out = track.box, []
        for k, frame in enumerate(frames):
            (m,) = measure(self.detector, frame, [box])
            self.onet_crops += 1
            known = occupied[k] if k < len(occupied) else ()
            if m.score < self.keep_score or any(iou(m.box, t.box) > 0.5 for t in known):
                break
            marks = _smoothed(smoother, m.landmarks, m.box)
            out.append(Track(track.id, marks.astype(np.float32), m.box, m.score, False, -(k + 1)))
            box = m.box
        return out
