"""Typed results of the jobs: what each judge model says about each face of a saved photo. Every job (protect, apply,
the Python API) reports faces this way; `to_dict` is the shape of the JSON reports.

The verdicts in plain words live here, once, for every face row of that shape (a FaceCheck or its dict, whichever
job made it): the terminal tables, the JSON reports, the HTML report, `apply` and the Python API all say them
from `face_verdict`, `photo_verdict` and `FaceTally`. "ok" in a report only means the file was written; whether
its faces are protected is the verdict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# What one face row says, as a state: protected (no judge matches), recognised (some or all judges match),
# not_found (not re-detected in the saved file: no judge could look at it), unchecked (written without a check),
# left_alone (apply: not the enrolled person, nothing pasted).
PROTECTED, RECOGNISED, NOT_FOUND, UNCHECKED, LEFT_ALONE = "protected", "recognised", "not_found", "unchecked", \
    "left_alone"
NO_FACE_IN_ORIGINAL = "no face in the original frame"  # a sampled video frame with nothing to protect (verify)


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

    @property
    def verdict(self) -> str:
        """This face in plain words, e.g. "protected against 5 of 7 models; still recognised by faceres"."""
        return face_verdict(self._row()).words

    def _row(self) -> dict:
        row: dict = {"face": self.face, "box": self.box, "redetected": self.redetected}
        row.update({name: {"score": j.score, "matches": j.matches} for name, j in self.judges.items()})
        if self.target is not None:
            row["target"] = self.target
        return row

    def to_dict(self) -> dict:
        """The JSON row: box, re-detected, each judge's {score, matches}, and the verdict (protected, verdict)."""
        return with_verdict(self._row())


def judge_entries(row: Mapping[str, Any]) -> dict[str, dict]:
    """The judge -> {score, matches} entries of one face row (skipping box, target and the like)."""
    return {k: v for k, v in row.items()
            if isinstance(v, dict) and "score" in v and "matches" in v and k != "target"}


@dataclass(frozen=True)
class FaceVerdict:
    """What the judges say about one face row: its state, the judges that looked, those that still recognise it,
    and the same in plain words."""

    state: str  # PROTECTED | RECOGNISED | NOT_FOUND | UNCHECKED | LEFT_ALONE
    judges: list[str]
    recognised_by: list[str]

    @property
    def protected(self) -> bool | None:
        """True: no judge recognises it; False: some do; None: not checked (or not the job's face)."""
        return {PROTECTED: True, RECOGNISED: False}.get(self.state)

    @property
    def words(self) -> str:
        total, still = len(self.judges), self.recognised_by
        if self.state == PROTECTED:
            return f"protected against all {total} models" if total > 1 else f"protected against {self.judges[0]}"
        if self.state == RECOGNISED:
            if len(still) == total:
                return f"not protected: still recognised by all {total} models" if total > 1 else \
                    f"not protected: still recognised by {still[0]}"
            return f"protected against {total - len(still)} of {total} models; still recognised by {', '.join(still)}"
        if self.state == NOT_FOUND:
            return "not found again in the saved photo, so no model could check it"
        if self.state == LEFT_ALONE:
            return "left unchanged (not the enrolled person)"
        return "written; not checked by any model"


def face_verdict(row: Mapping[str, Any]) -> FaceVerdict:
    """The verdict of one face row (FaceCheck.to_dict's shape; apply's rows also carry `masked`)."""
    entries = judge_entries(row)
    if row.get("masked") is False:
        return FaceVerdict(LEFT_ALONE, [], [])
    if not row.get("redetected", True):
        return FaceVerdict(NOT_FOUND, [], [])
    if not entries:
        return FaceVerdict(UNCHECKED, [], [])
    still = [name for name, judged in entries.items() if judged.get("matches")]
    return FaceVerdict(RECOGNISED if still else PROTECTED, list(entries), still)


def with_verdict(row: dict) -> dict:
    """The row with its verdict added: `protected` (true, false, or null when not checked) and `verdict` (words)."""
    verdict = face_verdict(row)
    return {**row, "protected": verdict.protected, "verdict": verdict.words}


def face_rows(details: Mapping[str, Any] | None) -> list[dict]:
    """The face rows of a report row's details (protect's and apply's `faces`)."""
    return [f for f in (details or {}).get("faces") or [] if isinstance(f, dict)]


def photo_verdict(rows: Iterable[Mapping[str, Any]], detail: bool = True) -> tuple[bool | None, str]:
    """(protected, words) for a written photo from its face rows: protected is True when every face the job
    changed was checked and none is recognised, False when some face is still recognised, None when none was
    checked. One face: that face's words; several: how many are protected, and (detail) which are not and by
    whom (a table that lists the faces below says only the first part)."""
    verdicts = [(int(row.get("face", i)), face_verdict(row)) for i, row in enumerate(rows)]
    verdicts = [(i, v) for i, v in verdicts if v.state != LEFT_ALONE]
    if not verdicts:
        return None, "written; no face checked"
    states = [v.state for _, v in verdicts]
    protected = False if RECOGNISED in states else (True if all(s == PROTECTED for s in states) else None)
    if len(verdicts) == 1:
        return protected, verdicts[0][1].words
    judges = max((len(v.judges) for _, v in verdicts), default=0)
    against = f"all {judges} models" if judges > 1 else "the model"
    parts = [f"{states.count(PROTECTED)} of {len(verdicts)} faces protected against {against}"
             if judges else f"{len(verdicts)} faces"]
    if not detail:
        return protected, parts[0]
    by_models: dict[tuple[str, ...], list[str]] = {}  # faces recognised by the same models: said once
    for i, v in verdicts:
        if v.state == RECOGNISED:
            by_models.setdefault(tuple(v.recognised_by), []).append(str(i))
    for models, faces in by_models.items():
        who = f"all {judges} models" if len(models) == judges > 1 else ", ".join(models)
        parts.append(f"face{'s' if len(faces) > 1 else ''} {', '.join(faces)} still recognised by {who}")
    lost = [str(i) for i, v in verdicts if v.state == NOT_FOUND]
    if lost:
        parts.append(f"face {', '.join(lost)} not found again" if len(lost) == 1 else
                     f"faces {', '.join(lost)} not found again")
    if UNCHECKED in states:
        parts.append(f"{states.count(UNCHECKED)} not checked")
    return protected, "; ".join(parts)


def frames_verdict(frames: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[bool | None, str]:
    """(protected, words) over the sampled frames of a video, each given by its face rows (empty: no face in the
    original frame, nothing to protect there), e.g. "8 frames checked: the face is still recognised by at least one
    model in 3 of 8 (faceres in 3, facenet-vgg in 1)". protected: False when a face is still recognised in some
    frame, True when every face of every frame with one is protected, None otherwise."""
    head = f"{len(frames)} frame{'s' if len(frames) != 1 else ''} checked"
    verdicts = [[face_verdict(row) for row in rows] for rows in frames if rows]
    verdicts = [[v for v in frame if v.state != LEFT_ALONE] for frame in verdicts]
    verdicts = [frame for frame in verdicts if frame]
    if not verdicts:
        return None, f"{head}: no face in the original frames"
    who = "the face is" if all(len(frame) == 1 for frame in verdicts) else "a face is"
    recognised = [frame for frame in verdicts if any(v.state == RECOGNISED for v in frame)]
    safe = [frame for frame in verdicts if all(v.state == PROTECTED for v in frame)]
    if recognised:
        by_model: dict[str, int] = {}
        for frame in recognised:
            for model in dict.fromkeys(m for v in frame for m in v.recognised_by):
                by_model[model] = by_model.get(model, 0) + 1
        judges = max(len(v.judges) for frame in verdicts for v in frame)
        if judges > 1 and len(by_model) == judges and len(set(by_model.values())) == 1:
            models = f"all {judges} models in {len(recognised)}"
        else:
            models = ", ".join(f"{m} in {k}" for m, k in sorted(by_model.items(), key=lambda item: -item[1]))
        parts = [f"{head}: {who} still recognised by at least one model in {len(recognised)} of {len(verdicts)} "
                 f"({models})"]
    else:
        judges = max(len(v.judges) for frame in verdicts for v in frame)
        against = f"all {judges} models" if judges > 1 else "the model"
        parts = [f"{head}: protected against {against} in {len(safe)} of {len(verdicts)}"]
    lost = sum(any(v.state == NOT_FOUND for v in frame) for frame in verdicts)
    if lost:
        parts.append(f"a face not found again in {lost}")
    if len(verdicts) < len(frames):
        parts.append(f"{len(frames) - len(verdicts)} with {NO_FACE_IN_ORIGINAL}")
    protected = False if recognised else (True if len(safe) == len(verdicts) else None)
    return protected, "; ".join(parts)


@dataclass
class FaceTally:
    """Faces of a batch by verdict, and the summary line at the end of it."""

    photos_written: int = 0
    videos_written: int = 0
    protected: int = 0
    recognised: int = 0
    not_found: int = 0
    unchecked: int = 0

    @property
    def faces(self) -> int:
        return self.protected + self.recognised + self.not_found + self.unchecked

    def add(self, rows: Iterable[Mapping[str, Any]], video: bool = False) -> None:
        """One written photo's (or video's) face rows."""
        if video:
            self.videos_written += 1
        else:
            self.photos_written += 1
        for row in rows:
            state = face_verdict(row).state
            if state != LEFT_ALONE:
                setattr(self, state, getattr(self, state) + 1)

    def line(self) -> str:
        """E.g. "12 photos written; 30 of 41 faces protected against every model; 8 still recognised by some;
        3 not found again"."""
        photos = f"{self.photos_written} photo{'s' if self.photos_written != 1 else ''}"
        if self.videos_written:
            photos += f" and {self.videos_written} video{'s' if self.videos_written != 1 else ''}"
        photos += " written"
        checked = self.faces - self.unchecked
        if not checked:
            return photos + (f"; {self.unchecked} face(s) not checked" if self.unchecked else "")
        parts = [photos, f"{self.protected} of {self.faces} face{'s' if self.faces != 1 else ''} protected against "
                         "every model"]
        if self.recognised:
            parts.append(f"{self.recognised} still recognised by at least one model")
        if self.not_found:
            parts.append(f"{self.not_found} not found again")
        if self.unchecked:
            parts.append(f"{self.unchecked} not checked")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"photos_written": self.photos_written, "videos_written": self.videos_written, "faces": self.faces,
                "protected": self.protected,
                "still_recognised": self.recognised, "not_found_again": self.not_found,
                "not_checked": self.unchecked, "line": self.line()}
