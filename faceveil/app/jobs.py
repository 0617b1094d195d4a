"""The work the app does for a page, one job at a time on one worker thread (the CPU is the limit, and the models
stay loaded between jobs): protect, enroll a person mask, apply it, check two photos. Every job calls the public
Python API only (faceveil.api) and reports to its session's event log as each photo is done."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceveil import api
from faceveil.app.sessions import Photo, Session
from faceveil.errors import FaceveilError


@dataclass(frozen=True)
class ProtectRequest:
    strength: str
    seed: int = 0
    iters: int | None = None  # None: the strength's


@dataclass(frozen=True)
class AppSettings:
    """What the person starting the app chose (command-line flags), beside what each page asks for."""

    judges: str = "all"  # the models that check every result
    enroll_method: str = "opom-convex"
    enroll: tuple[tuple[str, Any], ...] = ()  # other enroll settings (tests make enrolling cheap)


# ------------------------------------------------------------------------------------------------ verdicts


def judges_of(row: dict[str, Any]) -> dict[str, bool]:
    """{judge: still matches} of one face row as the API reports it (FaceCheck.to_dict)."""
    return {name: bool(v["matches"]) for name, v in row.items() if isinstance(v, dict) and "matches" in v}


def face_verdict(row: dict[str, Any]) -> dict[str, Any]:
    """One face in words, as the page shows it, with the numbers behind the words."""
    number = int(row.get("face", 0)) + 1
    judged = judges_of(row)
    out: dict[str, Any] = {"face": number, "box": row.get("box"), "total": len(judged)}
    if not row.get("redetected", True) or not judged:
        return {**out, "checked": False, "recognised_by": [],
                "words": f"Face {number}: not found again in the result, so it could not be checked"}
    still = [name for name, matches in judged.items() if matches]
    if len(still) == len(judged):
        words = (f"Face {number}: still recognised by all {len(judged)} face-recognition models "
                 f"({', '.join(still)}): not protected")
    else:
        words = f"Face {number}: not recognised by {len(judged) - len(still)} of {len(judged)} face-recognition models"
        words += f" (still recognised by {', '.join(still)})" if still else ""
    return {**out, "checked": True, "recognised_by": still, "protected": not still, "words": words}


# ------------------------------------------------------------------------------------------------ the worker


class Worker:
    """Runs the sessions' jobs one after another; keeps the last Protector (its models) loaded."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faceveil-app")
        self._protector: tuple[ProtectRequest, api.Protector] | None = None

    def submit(self, session: Session, job: str, run, *args: Any) -> None:
        session.busy = True
        session.emit({"type": "queued", "job": job})
        self._pool.submit(self._run, session, job, run, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, session: Session, job: str, run, *args: Any) -> None:
        started = time.monotonic()
        try:
            if not session.ended:
                run(session, *args)
                session.emit({"type": "job-done", "job": job, "seconds": round(time.monotonic() - started, 2)})
        except FaceveilError as exc:
            session.emit({"type": "job-failed", "job": job, "message": str(exc)})
        except Exception as exc:  # a bug: the page still gets one line and the app keeps serving
            session.emit({"type": "job-failed", "job": job, "message": f"internal error: {type(exc).__name__}: {exc}"})
        finally:
            session.busy = False
            if session.ended:  # the page left while this ran: its folder goes now
                shutil.rmtree(session.folder, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- protect

    def protector(self, request: ProtectRequest) -> api.Protector:
        if self._protector is None or self._protector[0] != request:
            # the session folder is the app's own: a photo protected again (another strength) replaces its result
            advanced: dict[str, Any] = {"judges": self.settings.judges, "existing": "overwrite"}
            if request.iters is not None:
                advanced["iters"] = request.iters
            self._protector = (request, api.Protector(strength=request.strength, seed=request.seed, **advanced))
        return self._protector[1]

    def protect(self, session: Session, photos: list[Photo], request: ProtectRequest,
                chosen: dict[int, list[int]] | None = None) -> None:
        """Each photo protected alone (the same as `faceveil protect --batch-faces 1` with these settings) and
        written into the session's folder as soon as it is done. chosen: per photo id, the faces the person
        ticked (indices as api.detect_faces numbers them); a photo not in it has every face protected."""
        protector = self.protector(request)
        out_dir = session.folder_for("protected")
        chosen = chosen or {}
        for done, photo in enumerate(photos):
            if session.ended:
                return
            session.emit({"type": "photo-start", "job": "protect", "id": photo.id, "index": done,
                          "total": len(photos), "percent": round(100 * done / len(photos))})
            started = time.monotonic()
            ticked = chosen.get(photo.id)
            if ticked == []:
                photo.result = None
                photo.report = {"status": "no_face", "faces": [], "seconds": 0.0,
                                "message": "every face was unticked: nothing protected"}
            else:
                photo.report = self._protect_one(protector, photo, out_dir, ticked)
                photo.report["seconds"] = round(time.monotonic() - started, 2)
            session.emit({"type": "photo-done", "job": "protect", "id": photo.id, "index": done + 1,
                          "total": len(photos), "percent": round(100 * (done + 1) / len(photos)), **photo.report})

    @staticmethod
    def _protect_one(protector: api.Protector, photo: Photo, out_dir: Path, ticked: list[int] | None) -> dict:
        report = protector.protect_files([photo.path], out_dir, progress=False, faces=ticked)
        row = report.results[0]
        photo.result = Path(row.output) if row.status == "ok" and row.output else None
        rows = (row.details or {}).get("faces", [])
        if ticked is not None:  # the checks number the protected faces 0.. : back to the numbers the page showed
            rows = [{**face, "face": ticked[int(face.get("face", 0))]} for face in rows]
        return {"status": row.status, "message": _status_words(row.status, row.message),
                "faces": [face_verdict(face) for face in rows]}

    # -------------------------------------------------------------------------------------------- person masks

    def enroll(self, session: Session, photos: list[Photo], name: str, seed: int) -> None:
        session.emit({"type": "enroll-start", "job": "enroll", "photos": len(photos)})
        mask = api.enroll([p.path for p in photos], name=name, method=self.settings.enroll_method, seed=seed,
                          **dict(self.settings.enroll))
        path = session.folder_for("masks") / "person.fvmask"
        mask.save(path)
        session.mask, session.mask_name = path, name
        session.emit({"type": "enroll-done", "job": "enroll", "name": name})

    def apply(self, session: Session, photos: list[Photo]) -> None:
        if session.mask is None:
            raise FaceveilError("mask: enroll a person first (step 1)")
        out_dir = session.folder_for("masked")
        judges = None if self.settings.judges == "all" else self.settings.judges.split(",")
        for done, photo in enumerate(photos):
            if session.ended:
                return
            session.emit({"type": "photo-start", "job": "apply", "id": photo.id, "index": done,
                          "total": len(photos), "percent": round(100 * done / len(photos))})
            started = time.monotonic()
            if photo.kind == "video":
                photo.report = self._apply_video(session, photo, out_dir, done, len(photos))
            else:
                result = api.apply(session.mask, photo.path, judges=judges)
                photo.result = result.save(out_dir / photo.path.name)
                faces = [face_verdict(check.to_dict()) for check in result.faces]
                photo.report = {"status": "ok" if faces else "no_face",
                                "message": "" if faces else "no face of this person was found: nothing changed",
                                "faces": faces}
            photo.report["seconds"] = round(time.monotonic() - started, 2)
            session.emit({"type": "photo-done", "job": "apply", "id": photo.id, "index": done + 1,
                          "total": len(photos), "percent": round(100 * (done + 1) / len(photos)), **photo.report})

    def _apply_video(self, session: Session, photo: Photo, out_dir: Path, done: int, total: int) -> dict:
        """The mask on the person's faces in every frame (tracked, no optimisation), the bar moving per frame."""
        last = [0.0]

        def on_frame(_: Path, frames: int, frames_total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] < 0.25 and frames != frames_total:  # a few events a second are enough for a bar
                return
            last[0] = now
            share = min(frames / frames_total, 1.0) if frames_total else 0.0
            session.emit({"type": "frame", "job": "apply", "id": photo.id, "frame": frames, "frames": frames_total,
                          "percent": round(100 * (done + share) / total)})

        report = api.apply_files(session.mask, [photo.path], out_dir, progress=False, on_frame=on_frame,
                                 existing="overwrite")
        row = report.results[0]
        photo.result = Path(row.output) if row.output else None
        details = row.details or {}
        tracks, masked = details.get("tracks", 0), details.get("masked_tracks", 0)
        words = (f"The mask is on {masked} of {tracks} faces followed through {details.get('frames')} frames"
                 if row.status == "ok" else row.message if row.status == "no_face"
                 else _status_words(row.status, row.message))
        return {"status": "ok" if row.status == "ok" and photo.result else row.status, "kind": "video",
                "message": words, "faces": [], "frames": details.get("frames"), "tracks": tracks, "masked": masked}

    # -------------------------------------------------------------------------------------------- check

    def verify(self, session: Session, original: Photo, other: Photo) -> None:
        judges = None if self.settings.judges == "all" else self.settings.judges.split(",")
        checks = api.verify(original.path, other.path, judges=judges)
        faces = [face_verdict(check.to_dict()) for check in checks]
        session.emit({"type": "verify-done", "job": "verify", "original": original.id, "other": other.id,
                      "faces": faces, "message": "" if faces else f"no face found in {original.name}"})


def _status_words(status: str, message: str) -> str:
    if status == "no_face":
        return "no face found in this photo: nothing to protect"
    if status == "error":
        return f"could not be protected: {message}"
    return message
