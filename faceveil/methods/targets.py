"""Target identities for targeted identity protection (TIP-IM and its baselines): a set of other people (or
virtual people) a protected face may be steered towards, each with at least one aligned face and its embedding by
every surrogate.

Sources: a folder (`--targets DIR`: sub-folders are identities, or one identity per image file at the top level),
or by default the installed sample photos, where every detected face is one virtual target identity. Targets that
are the protected person themselves (matched by any surrogate at its calibrated threshold) are excluded per face,
so a face is never steered towards itself: in the sample photos the protected face is among the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from faceveil.attacks.core import Embeddings, Ensemble, clean_embeddings
from faceveil.attacks.faces import from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import inverse_matrix, warp_matrix
from faceveil.detect.cache import detect_file
from faceveil.detect.mtcnn import MTCNN, Face
from faceveil.errors import FaceveilError
from faceveil.io.images import read_image
from faceveil.io.paths import is_image_path
from faceveil.models import zoo

# The paper's target set: 10 identities (TIP-IM §5.1; more helps little, Appendix C).
DEFAULT_MAX_TARGETS = 10
# Tight, pre-aligned face crops often defeat the detector: retry on a copy with this much border on each side.
RETRY_PAD = 0.4
# Default targets keep only faces the detector is sure of: sample3.jpg holds a false "face" (a chest, score 0.92).
MIN_SAMPLE_SCORE = 0.95


@dataclass(frozen=True, eq=False)
class TargetFace:
    """One aligned face: the canonical region around it (uint8 HxWx3) and its 5 landmarks in that region."""

    source: str
    photo: np.ndarray
    landmarks: np.ndarray


@dataclass(frozen=True)
class TargetIdentity:
    name: str
    faces: tuple[TargetFace, ...]


@dataclass
class FaceTargets:
    """The candidate targets of each protected face: the first K identities of the set that are not that person."""

    index: torch.Tensor  # [B, K] identity index into the target set
    embeddings: Embeddings  # model -> [B, K, D] identity centres
    names: list[str]  # every identity name of the set

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def chosen(self, choice: torch.Tensor) -> Embeddings:
        """Each face's centre [B, D] of its candidate at position choice[b]."""
        rows = torch.arange(self.index.shape[0])
        return {name: e[rows, choice] for name, e in self.embeddings.items()}

    def identity_index(self, choice: torch.Tensor) -> torch.Tensor:
        return self.index[torch.arange(self.index.shape[0]), choice]


class TargetSet:
    """Target identities with every face's embedding and every identity's centre, per surrogate."""

    def __init__(self, identities: list[TargetIdentity], ensemble: Ensemble):
        if not identities:
            raise FaceveilError("the target set is empty: no face found in the target images")
        self.identities = identities
        self.names = [t.name for t in identities]
        faces = [f for t in identities for f in t.faces]
        self.owner = torch.tensor([i for i, t in enumerate(identities) for _ in t.faces])
        batch = from_photos([f.photo for f in faces], [f.landmarks for f in faces], ensemble.geometries, "crops")
        self.face_embeddings = clean_embeddings(batch, ensemble)
        self.metrics = {name: ensemble.metric(name) for name in ensemble.names}
        self.centres = {name: self._centres(e, self.metrics[name]) for name, e in self.face_embeddings.items()}

    def __len__(self) -> int:
        return len(self.identities)

    def _centres(self, emb: torch.Tensor, metric: str) -> torch.Tensor:
        """Mean embedding per identity: of unit vectors for cosine models (direction is all they compare)."""
        emb = emb if metric == "l2" else F.normalize(emb, dim=-1)
        sums = torch.zeros(len(self), emb.shape[1]).index_add_(0, self.owner, emb)
        return sums / torch.bincount(self.owner, minlength=len(self)).unsqueeze(1)

    def same_person(self, emb: Embeddings) -> torch.Tensor:
        """[B, K]: identity k has a face that any surrogate matches with face b at its calibrated threshold."""
        hit = torch.zeros(next(iter(emb.values())).shape[0], len(self.owner), dtype=torch.bool)
        for name, faces in self.face_embeddings.items():
            hit |= zoo.score_matrix(self.metrics[name], emb[name], faces) >= zoo.threshold(name)
        per_identity = torch.zeros(hit.shape[0], len(self), dtype=torch.bool)
        for k in range(len(self)):
            per_identity[:, k] = hit[:, self.owner == k].any(dim=1)
        return per_identity

    def for_faces(self, emb: Embeddings, max_targets: int = DEFAULT_MAX_TARGETS) -> FaceTargets:
        """Each face's candidates: the first `max_targets` identities that are not that person (all faces get the
        same count K, the smallest any face has)."""
        allowed = ~self.same_person(emb)
        k = min(max_targets, int(allowed.sum(dim=1).min()))
        if k < 1:
            raise FaceveilError("no target identity left once the protected person is excluded: give a targets "
                                "folder with faces of other people")
        # stable sort puts allowed identities first, each in set order
        index = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)[:, :k]
        return FaceTargets(index, {name: c[index] for name, c in self.centres.items()}, self.names)


def target_face(photo: np.ndarray, landmarks: np.ndarray, source: str) -> TargetFace:
    """Keep only the canonical region of the face (all any surrogate crop needs), landmarks shifted into it."""
    canonical_to_photo = inverse_matrix(warp_matrix(landmarks, C.CANONICAL))
    x0, y0, x1, y1 = C.region_box(canonical_to_photo, photo.shape[1], photo.shape[0])
    crop = np.array(photo[y0:y1, x0:x1])  # a copy: the source may be a read-only view of a decoded file
    return TargetFace(source, crop, np.asarray(landmarks, dtype=np.float64) - [x0, y0])


def _faces_in(path: Path, detector: MTCNN) -> tuple[np.ndarray, list[Face]]:
    """The image (EXIF-oriented RGB) and its faces, largest first; retried with a border for tight crops."""
    faces, _ = detect_file(path, detector, max_side=1024)
    image = read_image(path).rgb
    if not faces:
        pad = round(RETRY_PAD * max(image.shape[:2]))
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        faces = [Face(tuple(v - pad for v in f.box), f.score, f.landmarks - pad)
                 for f in detector.detect_large(padded)]
    return image, sorted(faces, key=lambda f: -f.size)


def _largest_face(path: Path, detector: MTCNN) -> TargetFace | None:
    image, faces = _faces_in(path, detector)
    return target_face(image, faces[0].landmarks, str(path)) if faces else None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p) and not p.name.startswith("."))


def identities_from_folder(folder: Path | str, detector: MTCNN) -> list[TargetIdentity]:
    """Sub-folders are identities (largest face of each image); images at the top level are one identity each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceveilError(f"targets folder {folder}: not a folder")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        faces = tuple(f for f in (_largest_face(p, detector) for p in _images(sub)) if f is not None)
        if faces:
            out.append(TargetIdentity(sub.name, faces))
    for path in _images(folder):
        face = _largest_face(path, detector)
        if face is not None:
            out.append(TargetIdentity(path.stem, (face,)))
    if not out:
        raise FaceveilError(f"targets folder {folder}: no face found in any image")
    return out


def sample_identities(detector: MTCNN) -> list[TargetIdentity]:
    """Every confidently detected face in the installed sample photos, each one virtual identity ('sample3.jpg#1',
    numbered largest first)."""
    from faceveil.io import weights

    out = []
    for path in weights.sample_photos():
        image, faces = _faces_in(path, detector)
        sure = [f for f in faces if f.score >= MIN_SAMPLE_SCORE]
        out += [TargetIdentity(f"{path.name}#{i}", (target_face(image, f.landmarks, str(path)),))
                for i, f in enumerate(sure)]
    return out


def load_targets(folder: Path | str | None, detector: MTCNN, ensemble: Ensemble) -> TargetSet:
    """The target set from `folder`, or the sample-photo defaults when None."""
    identities = identities_from_folder(folder, detector) if folder else sample_identities(detector)
    return TargetSet(identities, ensemble)
