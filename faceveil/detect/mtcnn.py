"""MTCNN face detector (P-Net, R-Net, O-Net) with 5 landmarks, on the weights from facenet-pytorch 2.6.0.

Coordinates: boxes are (x1, y1, x2, y2) in pixel-edge units (pixel i spans [i, i+1), so x2/y2 are exclusive
and a face is roughly `image[y1:y2, x1:x2]`); landmarks are in pixel-centre units (pixel i is centred at i),
the convention of cv2.warpAffine, dlib and the ArcFace template. Landmark order: left eye, right eye, nose,
left mouth corner, right mouth corner, where "left" means the image's left.

O-Net's landmark outputs are read as fractions of its crop measured from the crop's edges. A left-right flip
test on LFW confirms that reading: the residual bias is +0.15 px at 100 px faces and doubles at 2x size (a
tiny network bias, ~0.15 % of the face), so no half-pixel convention offset is missing.

The nets take RGB NCHW input scaled as (x - 127.5) / 128 and run in channels_last layout (P-Net on horizontal
stripes of each pyramid level, R-Net/O-Net on batches of crops), which is about 2x faster on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from faceveil.io import weights

# Bump when detection output changes, so cached detections are recomputed.
ALGORITHM_VERSION = "mtcnn-1"
_CHUNK = 256
_STRIPE_ROWS = 64
# Crops and pyramid levels are area-resampled from an image copy at least this many times their size.
_DETAIL = 4
T = TypeVar("T")  # a piece of detection work ...
R = TypeVar("R")  # ... and its result


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face: box (x1, y1, x2, y2), detector confidence, landmarks [5, 2] (x, y)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def size(self) -> float:
        """Geometric mean of the box sides."""
        x1, y1, x2, y2 = self.box
        return math.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))

    def to_dict(self) -> dict:
        """JSON-safe and exact (float32 landmarks survive the float64 round trip)."""
        return {"box": [float(v) for v in self.box], "score": float(self.score),
                "landmarks": np.asarray(self.landmarks, dtype=np.float32).astype(float).tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Face:
        box = tuple(float(v) for v in data["box"])
        marks = np.asarray(data["landmarks"], dtype=np.float32).reshape(5, 2)
        return cls(box=box, score=float(data["score"]), landmarks=marks)  # type: ignore[arg-type]

    def scaled(self, sx: float, sy: float) -> Face:
        """The same face in an image resized by (sx, sy)."""
        x1, y1, x2, y2 = self.box
        marks = (np.asarray(self.landmarks, dtype=np.float64) + 0.5) * (sx, sy) - 0.5
        return Face((x1 * sx, y1 * sy, x2 * sx, y2 * sy), self.score, marks.astype(np.float32))

    @staticmethod
    def nearest_to_center(faces: Sequence[Face], width: int, height: int) -> Face | None:
        """See the module function `nearest_to_center`."""
        return nearest_to_center(faces, width, height)


def match_face(face: Face, candidates: Sequence[Face]) -> Face | None:
    """The candidate (e.g. re-detected in a saved photo) whose landmarks are nearest the face's, within half the
    face size; None when there is none."""
    if not candidates:
        return None
    dist = [float(np.linalg.norm(c.landmarks - face.landmarks, axis=1).mean()) for c in candidates]
    best = int(np.argmin(dist))
    return candidates[best] if dist[best] < 0.5 * face.size else None


def nearest_to_center(faces: Sequence[Face], width: int, height: int) -> Face | None:
    """The face whose box centre is nearest the image centre (LFW's labelled face); None if no faces."""
    if not faces:
        return None
    cx, cy = width / 2, height / 2
    return min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)


# ----------------------------------------------------------------------------------------------- networks


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,3,H,W] normalised -> (face probability [N,H',W'], box regression [N,4,H',W']); computed on
        horizontal stripes (`stripes`), so activations stay in cache (~1.5x faster)."""
        parts = [self.stripe(x[:, :, a:b]) for a, b in self.stripes(x.shape[2])]
        return self.join(parts)

    def stripe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of one stripe of input rows, or of a whole input."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        logits = self.conv4_1(x)
        return torch.sigmoid(logits[:, 1] - logits[:, 0]), self.conv4_2(x)

    @staticmethod
    def stripes(height: int) -> list[tuple[int, int]]:
        """Input row ranges of at most _STRIPE_ROWS output rows each: output row j sees input rows 2j .. 2j+11
        only, so the stripes' outputs, one under the other, are the whole input's."""
        if height <= 2 * _STRIPE_ROWS + 12:
            return [(0, height)]
        rows_out = (height - 1) // 2 - 4
        return [(2 * j0, 2 * min(j0 + _STRIPE_ROWS, rows_out) + 10) for j0 in range(0, rows_out, _STRIPE_ROWS)]

    @staticmethod
    def join(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p for p, _ in parts], dim=1), torch.cat([r for _, r in parts], dim=2)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,3,24,24] -> (face probability [N], box regression [N,4])."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights come from Caffe: flatten in (W, H, C) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        logits = self.dense5_1(x)
        return torch.sigmoid(logits[:, 1] - logits[:, 0]), self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: probability, box regression and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,3,48,48] -> (probability [N], regression [N,4], landmarks [N,10]: 5 x then 5 y, fractions)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        logits = self.dense6_1(x)
        return torch.sigmoid(logits[:, 1] - logits[:, 0]), self.dense6_2(x), self.dense6_3(x)


def _load(net: nn.Module, name: str) -> nn.Module:
    state = torch.load(weights.path(f"mtcnn/{name}.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False).to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------- box helpers


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    mode "union" compares intersection over union, "min" intersection over the smaller box. The exact greedy
    result, computed as the fixed point of "kept = not overlapped by any kept better box" (a few passes).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = scores.argsort(descending=True)
    suppress = _overlap_matrix(boxes[order], threshold, mode)
    keep = torch.ones(len(order), dtype=torch.bool)
    for _ in range(len(order) + 1):
        new_keep = ~(suppress & keep[:, None]).any(0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def _overlap_matrix(boxes: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """suppress[i, j]: box i (better) overlaps box j (worse, j > i) by more than threshold."""
    n = len(boxes)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    out = torch.zeros(n, n, dtype=torch.bool)
    for start in range(0, n, 2048):
        rows = boxes[start:start + 2048]
        low = torch.maximum(rows[:, None, 0:2], boxes[None, :, 0:2])
        high = torch.minimum(rows[:, None, 2:4], boxes[None, :, 2:4])
        inter = (high - low).clamp(min=0).prod(dim=2)
        row_area = area[start:start + 2048, None]
        if mode == "min":
            denom = torch.minimum(row_area, area[None, :])
        else:
            denom = row_area + area[None, :] - inter
        out[start:start + 2048] = inter > threshold * denom
    return out.triu_(1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN box regression (offsets as fractions of width/height)."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
    return boxes + reg * wh


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre."""
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
    side = (boxes[:, 2:4] - boxes[:, 0:2]).max(dim=1, keepdim=True).values
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


# ----------------------------------------------------------------------------------------------- crops


class _Levels:
    """An image plus area-downscaled copies of it (the P-Net pyramid), for cheap R-Net/O-Net crops.

    Each crop is area-resampled (PIL BOX, fractional box edges) from the smallest copy in which the box still
    spans at least _DETAIL times the crop size; outside the image the crop is zero (black), as in the original
    MTCNN (facenet-pytorch instead stretches the part inside the image).
    """

    def __init__(self, image: Image.Image, pieces: _Pieces | None = None) -> None:
        self.levels: list[tuple[Image.Image, float, float]] = [(image, 1.0, 1.0)]
        self.pieces = pieces or _Pieces(1)

    def resized(self, sx: float, sy: float, size: tuple[int, int]) -> Image.Image:
        """A copy of the image at scale (sx, sy) with pixel size `size`, made from a larger copy; kept."""
        if size == self.levels[0][0].size:
            return self.levels[0][0]
        larger = [lv for lv in self.levels if min(lv[1], lv[2]) >= _DETAIL * max(sx, sy)]
        source = min(larger, key=lambda lv: lv[1])[0] if larger else self.levels[0][0]
        level = source.resize(size, Image.BOX)
        self.levels.append((level, sx, sy))
        self.levels.sort(key=lambda lv: -lv[1])
        return level

    def crops(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """boxes [N,4] (pixel-edge units of the full image) -> normalised net input [N,3,size,size]; consecutive
        slices of the boxes are cut in parallel."""
        edges = np.linspace(0, len(boxes), min(self.pieces.workers, len(boxes)) + 1).round().astype(int)
        parts = self.pieces.map(lambda part: self._mosaic(boxes[part[0]:part[1]].tolist(), size),
                                list(zip(edges[:-1], edges[1:], strict=True)))
        pixels = torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8))
        return (pixels.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125

    def _mosaic(self, boxes: list[list[float]], size: int) -> np.ndarray:
        """The crops of `boxes` [n, size, size, 3] uint8, each from the smallest copy with enough detail."""
        mosaic = Image.new("RGB", (size, size * len(boxes)))
        scales = [min(sx, sy) for _, sx, sy in self.levels]
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            side = min(x2 - x1, y2 - y1)
            pick = max((k for k, s in enumerate(scales) if side * s >= _DETAIL * size), default=0)
            image, sx, sy = self.levels[pick]
            mosaic.paste(_crop(image, (x1 * sx, y1 * sy, x2 * sx, y2 * sy), size), (0, i * size))
        return np.array(mosaic).reshape(len(boxes), size, size, 3)


class _Pieces:
    """Independent pieces of one detection run on `workers` threads, each torch op on one intra-op thread;
    results come back in order. Used as a context (the threads end with it); one worker runs them in turn."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Pieces:
        if self.workers > 1:
            # a fresh thread reads OpenMP's process default (all cores) until told otherwise
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="faceveil-detect",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def submit(self, fn: Callable[[T], R], item: T) -> Future[R]:
        """fn(item) on a worker (at once, here, with one worker)."""
        if self._pool is not None:
            return self._pool.submit(_piece, fn, item)
        done: Future[R] = Future()
        done.set_result(fn(item))
        return done

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        return [f.result() for f in [self.submit(fn, item) for item in items]]


def _piece(fn: Callable[[T], R], item: T) -> R:
    with torch.inference_mode():  # grad mode is per thread
        return fn(item)


def _crop(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Area-resample `box` (fractional, may leave the image) of a PIL image to size x size, zero outside."""
    x1, y1, x2, y2 = box
    x2, y2 = max(x2, x1 + 1e-3), max(y2, y1 + 1e-3)
    if x1 >= 0 and y1 >= 0 and x2 <= image.width and y2 <= image.height:
        return image.resize((size, size), Image.BOX, box=(x1, y1, x2, y2))
    ix1, iy1 = math.floor(x1), math.floor(y1)
    region = image.crop((ix1, iy1, math.ceil(x2), math.ceil(y2)))  # zero outside the image
    return region.resize((size, size), Image.BOX, box=(x1 - ix1, y1 - iy1, x2 - ix1, y2 - iy1))


# ----------------------------------------------------------------------------------------------- detector


class MTCNN:
    """Three-stage MTCNN. `detect` for ordinary photos, `detect_large` for big ones (downscale + refine).

    Threads: almost all MTCNN work is small tensor ops, which torch's multi-threading slows down (several
    times; 10x or worse when other processes keep the cores busy, as ffmpeg does in the video pipeline). So every
    op runs on one intra-op thread, and the cores share the work by pieces instead: `workers` Python threads
    (default: torch's thread count) each score whole pyramid levels with P-Net and cut slices of the R-Net/O-Net
    crops (torch and PIL release the GIL inside them). Every piece is computed exactly as one thread would, and
    the pieces are joined in order, so the result does not depend on `workers`. torch.set_num_threads is
    process-wide: do not detect from one Python thread while another runs torch.
    """

    def __init__(self, min_face_size: float = 20.0, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709, workers: int | None = None) -> None:
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.workers = workers
        self.pnet = _load(PNet(), "pnet")
        self.rnet = _load(RNet(), "rnet")
        self.onet = _load(ONet(), "onet")

    @property
    def settings(self) -> dict:
        """Everything that changes the output (used as part of cache keys)."""
        return {"algorithm": ALGORITHM_VERSION, "min_face_size": self.min_face_size,
                "thresholds": list(self.thresholds), "factor": self.factor}

    # ---- public API

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image, best score first."""
        image = _check_image(image)
        with self._shared_work() as pieces:
            levels = _Levels(Image.fromarray(image), pieces)
            boxes = self._stage1(levels)
            if len(boxes):
                boxes = self._stage2(levels, boxes)
            return self._stage3(levels, boxes) if len(boxes) else []

    @torch.inference_mode()
    def detect_large(self, image: np.ndarray, max_side: int = 1024) -> list[Face]:
        """Detect on a copy downscaled to `max_side`, then re-run O-Net on full-resolution crops of each face.

        Faces smaller than min_face_size pixels in the downscaled copy are not found.
        """
        image = _check_image(image)
        h, w = image.shape[:2]
        if max(h, w) <= max_side:
            return self.detect(image)
        ratio = max_side / max(h, w)
        small_size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        full = Image.fromarray(image)
        small = full.resize(small_size, Image.BOX, reducing_gap=3.0)
        faces = self.detect(np.asarray(small))
        scaled = [f.scaled(w / small_size[0], h / small_size[1]) for f in faces]
        return self.refine(full, scaled)

    @torch.inference_mode()
    def refine(self, image: Image.Image | np.ndarray, faces: Sequence[Face]) -> list[Face]:
        """Re-run O-Net on a square crop around each face's box; new box and landmarks, original score."""
        if not faces:
            return []
        if isinstance(image, np.ndarray):
            image = Image.fromarray(_check_image(image))
        boxes = _square(torch.tensor([f.box for f in faces], dtype=torch.float64))
        with self._shared_work() as pieces:
            _, reg, marks = _batched(self.onet, _Levels(image, pieces).crops(boxes, 48))
        marks = _landmarks(boxes, marks.double())
        boxes = _regress(boxes, reg.double())
        return [Face(tuple(b.tolist()), f.score, m.numpy().astype(np.float32))  # type: ignore[arg-type]
                for b, f, m in zip(boxes, faces, marks, strict=True)]

    @contextlib.contextmanager
    def _shared_work(self) -> Iterator[_Pieces]:
        """Every torch op on one intra-op thread, the work shared by pieces among `workers` threads (default:
        torch's thread count, read before it is set to one; the workers start inside the one-thread block)."""
        workers = self.workers or torch.get_num_threads()
        with _torch_threads(1), _Pieces(workers) as pieces:
            yield pieces

    # ---- stages

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def _stage1(self, levels: _Levels) -> torch.Tensor:
        """P-Net over the image pyramid (kept in `levels`) -> square candidate boxes [N,4] (float64).

        The levels are made one after another (each is resampled from the smallest larger one made before it),
        while the workers score the stripes of those already made."""
        image = levels.levels[0][0]
        scored = []
        for scale in self._scales(image.height, image.width):
            level, sx, sy = self._pyramid_level(levels, image, scale)
            # HWC -> NCHW view: already channels_last in memory, the layout the nets run fastest in.
            x = (torch.from_numpy(np.array(level)).permute(2, 0, 1)[None].float() - 127.5) * 0.0078125
            stripes = [levels.pieces.submit(self.pnet.stripe, x[:, :, a:b]) for a, b in self.pnet.stripes(x.shape[2])]
            scored.append((sx, sy, stripes))
        found = [self._pnet_candidates(*self.pnet.join([f.result() for f in stripes]), sx, sy)
                 for sx, sy, stripes in scored]
        found = [f for f in found if len(f)]
        if not found:
            return torch.zeros(0, 4, dtype=torch.float64)
        cand = torch.cat(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        return _square(_regress(cand[:, :4], cand[:, 5:9]))

    @staticmethod
    def _pyramid_level(levels: _Levels, image: Image.Image, scale: float) -> tuple[Image.Image, float, float]:
        """The image resampled for P-Net at `scale` (kept in `levels`), and its exact scale (sx, sy)."""
        w, h = image.size
        ws, hs = math.ceil(w * scale), math.ceil(h * scale)
        sx, sy = ws / w, hs / h
        return levels.resized(sx, sy, (ws, hs)), sx, sy

    def _pnet_candidates(self, prob: torch.Tensor, reg: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
        """Candidates [K, 9] (box 4, score, regression 4) from one pyramid level's P-Net outputs, after NMS 0.5."""
        rows, cols = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
        if len(rows) == 0:
            return torch.zeros(0, 9, dtype=torch.float64)
        x1, y1 = 2 * cols.double() / sx, 2 * rows.double() / sy
        boxes = torch.stack([x1, y1, x1 + 12 / sx, y1 + 12 / sy], dim=1)
        scores = prob[0, rows, cols].double()
        offsets = reg[0, :, rows, cols].T.double()
        cand = torch.cat([boxes, scores[:, None], offsets], dim=1)
        return cand[nms(boxes, scores, 0.5)]

    def _stage2(self, levels: _Levels, boxes: torch.Tensor) -> torch.Tensor:
        """R-Net on 24x24 crops -> square boxes [N,4]."""
        prob, reg = _batched(self.rnet, levels.crops(boxes, 24))
        ok = prob > self.thresholds[1]
        boxes, prob, reg = boxes[ok], prob[ok], reg[ok].double()
        keep = nms(boxes, prob, 0.7)
        return _square(_regress(boxes[keep], reg[keep]))

    def _stage3(self, levels: _Levels, boxes: torch.Tensor) -> list[Face]:
        """O-Net on 48x48 crops -> faces (final boxes, scores, landmarks)."""
        prob, reg, marks = _batched(self.onet, levels.crops(boxes, 48))
        ok = prob > self.thresholds[2]
        boxes, prob = boxes[ok], prob[ok]
        marks = _landmarks(boxes, marks[ok].double())
        boxes = _regress(boxes, reg[ok].double())
        keep = nms(boxes, prob, 0.7, mode="min")
        return [Face(tuple(boxes[i].tolist()), float(prob[i]), marks[i].numpy().astype(np.float32))  # type: ignore[arg-type]
                for i in keep.tolist()]


def _landmarks(boxes: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """O-Net landmark fractions [N,10] in the crop `boxes` -> pixel-centre coordinates [N,5,2]."""
    size = boxes[:, 2:4] - boxes[:, 0:2]
    frac = torch.stack([fractions[:, :5], fractions[:, 5:]], dim=2)
    return boxes[:, None, 0:2] + size[:, None, :] * frac - 0.5


def _batched(net: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run a net over crops in chunks (channels_last)."""
    crops = crops.contiguous(memory_format=torch.channels_last)
    parts = [net(crops[i:i + _CHUNK]) for i in range(0, max(len(crops), 1), _CHUNK)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Temporarily run torch ops on `count` intra-op threads."""
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


_DEFAULT: MTCNN | None = None


def default_detector() -> MTCNN:
    """A process-wide MTCNN with default settings (weights loaded once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MTCNN()
    return _DEFAULT
