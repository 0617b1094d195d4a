"""The recogniser zoo: one registry with each model's family, input size, crop geometry, normalisation, embedding
size, metric and decision threshold, and one uniform interface.

Every `Recogniser` takes an aligned RGB batch in [0, 1], NCHW, at its own input size (its own crop geometry) and
returns its embedding, differentiably. Scores are "higher = more alike" for every model: cosine similarity, or the
negated L2 distance for dlib (whose embeddings are not centred, so cosine would be meaningless).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import torch
from torch import nn

from faceveil.errors import FaceveilError
from faceveil.io import weights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    fmt: str  # weight format: tfjs | onnx | tflite | dlib | tf-graphdef
    files: tuple[str, ...]  # cache-relative weight files, first one is what the loader opens
    input_size: int
    geometry: str  # crop geometry name in faceveil.detect.align
    embedding_dim: int
    metric: str  # "cosine" | "l2"
    scale: float  # x01 * scale ...
    offset: float  # ... - offset ...
    divisor: float  # ... / divisor  = what the original runtime is fed
    output_node: str = ""
    default_threshold: float = 0.0  # in score units (cosine, or -L2); replaced by the LFW-calibrated one
    notes: str = field(default="", compare=False)


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mobileface", "mobileface", "tfjs", ("human/mobileface.json", "human/mobileface.bin"), 112,
                  "arcface112", 256, "cosine", 255.0, 0.0, 1.0, "batchnorm0/add_1", 0.3,
                  "human-models MobileFace (ArcFace-style), graph normalises (x-127.5)/128 itself"),
        ModelSpec("faceres", "faceres", "tfjs", ("human/faceres.json", "human/faceres.bin"), 224,
                  "loose224", 1024, "cosine", 255.0, 0.0, 1.0, "global_pooling/Mean", 0.7,
                  "HSE FaceRes (MobileNet-v1), fp16-quantised weights"),
        ModelSpec("faceres-deep", "faceres", "tfjs", ("human/faceres-deep.json", "human/faceres-deep.bin"), 224,
                  "loose224", 1024, "cosine", 255.0, 0.0, 1.0, "global_pooling/Mean", 0.7,
                  "same layers as faceres, different weights: same family"),
        ModelSpec("dlib", "dlib", "dlib", ("dlib/dlib_face_recognition_resnet_model_v1.dat",), 150,
                  "dlib150", 128, "l2", 255.0, 0.0, 1.0, "", -0.6,
                  "dlib ResNet-29; L2 distance < 0.6 = same person (dlib's own rule)"),
        ModelSpec("mfn512", "mfn512", "onnx", ("onnx/fr_feature.onnx",), 112, "arcface112", 512, "cosine",
                  255.0, 127.0, 128.0, "", 0.3, "faceplugin MobileFaceNet with GDC head (ONNX)"),
        ModelSpec("mfn192", "mfn192", "tflite", ("tflite/MobileFaceNet.tflite",), 112, "arcface112", 192,
                  "cosine", 255.0, 127.5, 128.0, "", 0.3, "TensorFlow MobileFaceNet port (TFLite)"),
        ModelSpec("facenet-vgg", "facenet", "tf-graphdef", ("facenet/20180402-114759.pb",), 160, "facenet160",
                  512, "cosine", 255.0, 127.5, 128.0, "embeddings", 0.4,
                  "FaceNet Inception-ResNet-v1 20180402-114759 (VGGFace2), TF 1.x frozen graph, inference branch"),
        ModelSpec("facenet-casia", "facenet", "tf-graphdef", ("facenet/graph_final.pb",), 160, "facenet160",
                  512, "cosine", 255.0, 127.5, 128.0, "embeddings", 0.4,
                  "FaceNet Inception-ResNet-v1 20180408-102900 (CASIA-WebFace), batch-norm folded for OpenCV DNN"),
    )
}

# Why `mobilefacenet` (human-models) is absent: it converts exactly but returns the same embedding for every real
# face (measured), so it recognises nobody. `faceapi-dlib` is a quantised copy of dlib (cosine 0.999): not a judge.


def spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise FaceveilError(f"unknown model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def parse_models(text: str | None) -> list[str]:
    """'all', None or a comma list -> validated model names."""
    if not text or text == "all":
        return list(SPECS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        spec(n)
    return names


@cache
def calibrated_thresholds() -> dict[str, dict]:
    """LFW-calibrated thresholds shipped in faceveil/data/thresholds.json (written by `eval verification`)."""
    try:
        text = resources.files("faceveil").joinpath("data/thresholds.json").read_text()
    except FileNotFoundError:
        return {}
    return json.loads(text)


def threshold(name: str) -> float:
    """Decision threshold in score units: same person iff score >= threshold."""
    entry = calibrated_thresholds().get(name)
    return float(entry["threshold"]) if entry else spec(name).default_threshold


def _load_backbone(s: ModelSpec) -> nn.Module:
    path = weights.path(s.files[0])
    for rel in s.files[1:]:
        weights.path(rel)
    if s.fmt == "tfjs":
        from faceveil.models.loaders.tfjs import load_graph_model

        return load_graph_model(path, s.output_node)
    if s.fmt == "onnx":
        from faceveil.models.loaders.onnx_graph import load_onnx

        return load_onnx(path)
    if s.fmt == "tflite":
        from faceveil.models.loaders.tflite_graph import load_tflite

        return load_tflite(path)
    if s.fmt == "tf-graphdef":  # FaceNet-vgg's graph is fed at `input` (a queue feeds it in training)
        from faceveil.models.loaders.tf_graphdef import load_graphdef

        return load_graphdef(path, s.output_node, input_node="input", feeds={"phase_train": False})
    if s.fmt == "dlib":
        from faceveil.models.loaders.dlib_dat import load_dlib_resnet

        return load_dlib_resnet(path)
    raise FaceveilError(f"no loader for weight format {s.fmt!r}")


class Recogniser(nn.Module):
    """x01 [B,3,S,S] in [0,1] (S = spec.input_size, aligned with spec.geometry) -> embedding [B, D]."""

    def __init__(self, s: ModelSpec, backbone: nn.Module):
        super().__init__()
        self.spec = s
        self.backbone = backbone

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        size = self.spec.input_size
        if x01.shape[-2:] != (size, size):
            raise ValueError(f"{self.spec.name} expects {size}x{size} crops, got {tuple(x01.shape[-2:])}")
        x = (x01 * self.spec.scale - self.spec.offset) / self.spec.divisor
        return self.backbone(x)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return score(self.spec.metric, a, b)


def score(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise similarity of embeddings, higher = more alike (cosine, or -L2 distance)."""
    if metric == "l2":
        return -(a - b).norm(dim=-1)
    return nn.functional.cosine_similarity(a, b, dim=-1)


def score_matrix(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs similarity [len(a), len(b)], higher = more alike."""
    if metric == "l2":
        return -torch.cdist(a, b)
    a = nn.functional.normalize(a, dim=-1)
    b = nn.functional.normalize(b, dim=-1)
    return a @ b.T


_LOADED: dict[str, Recogniser] = {}


def load(name: str) -> Recogniser:
    """The recogniser `name`, loaded once per process, in eval mode, parameters frozen."""
    if name not in _LOADED:
        s = spec(name)
        model = Recogniser(s, _load_backbone(s)).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _LOADED[name] = model
    return _LOADED[name]


@torch.no_grad()
def embed_crops(model: Recogniser, crops, batch_size: int = 32) -> torch.Tensor:
    """Embed aligned uint8 crops [N, S, S, 3] (numpy or tensor) in batches, no autograd."""
    out = []
    for start in range(0, len(crops), batch_size):
        chunk = torch.as_tensor(crops[start:start + batch_size]).permute(0, 3, 1, 2).float().div(255.0)
        out.append(model(chunk.contiguous()))
    return torch.cat(out) if out else torch.empty(0, model.spec.embedding_dim)
