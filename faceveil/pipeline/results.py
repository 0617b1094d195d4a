"""Typed results of the jobs: what each judge model says about each face of a saved photo. Every job (protect, apply,
the Python API) reports faces this way; `to_dict` is the shape of the JSON reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class JudgeScore:
    """One judge's similarity original -> protected (cosine, or -L2 for dlib) and whether it still matches at the
    model's calibrated threshold."""

    score: float
    matches: bool


@dataclass
class FaceCheck:
    """One face of a saved photo as the judges see it after re-reading, re-detecting and re-aligning it."""

    face: int  # index among the photo's checked faces, largest first
    box: list[float]
    redetected: bool  # found again in the saved file (else no judge could look at it)
    judges: dict[str, JudgeScore] = field(default_factory=dict)
    target: dict | None = None  # targeted methods: the identity steered to and the surrogates' scores to it

    @property
    def recognised_by(self) -> list[str]:
        return [name for name, judged in self.judges.items() if judged.matches]

    @property
    def protected(self) -> bool | None:
        """True when no judge recognises the face; None when it could not be checked (not re-detected)."""
        if not self.redetected or not self.judges:
            return None
        return not self.recognised_by

    def to_dict(self) -> dict:
        row: dict = {"face": self.face, "box": self.box, "redetected": self.redetected}
        row.update({name: {"score": j.score, "matches": j.matches} for name, j in self.judges.items()})
        if self.target is not None:
            row["target"] = self.target
        return row
