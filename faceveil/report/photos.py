"""Photo reports (protect, apply, verify): per photo the original and protected versions side by side with an
amplified view of what changed, and per face what every recognition model now says, in words a non-expert reads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from faceveil.errors import FaceveilError
from faceveil.pipeline.results import (
    LEFT_ALONE,
    NO_FACE_IN_ORIGINAL,
    NOT_FOUND,
    UNCHECKED,
    FaceTally,
    face_rows,
    judge_entries,
    photo_verdict,
)
from faceveil.pipeline.results import face_verdict as verdict_of
from faceveil.report import html as H
from faceveil.report import images as I
from faceveil.report.scales import model_scale

# Whole-photo imagery for at most this many photos, close-ups for at most this many faces per photo: beyond that
# the report lists the results without pictures, so that a batch of thousands still gives a file one can open.
MAX_PHOTOS_WITH_IMAGES = 40
MAX_FACES_WITH_CLOSEUPS = 12

HOW_TO_READ = (
    "<b>How to read this.</b> Each bar shows how alike a face-recognition model finds the original face and the "
    "protected one. The black line is the model's decision threshold (calibrated on LFW): a bar that reaches the "
    "red zone past it means the model still says “same person”. Green bars stop short of the line: the model no "
    "longer links the protected photo to the original. Models marked “optimised against” are the ones the mask "
    "was computed with; the others are independent checks."
)
HOW_TO_READ_CHANGES = " “Changes ×10” shows where the photo was altered, amplified ten times (grey = untouched)."


def how_to_read(originals: bool) -> str:
    return HOW_TO_READ + (HOW_TO_READ_CHANGES if originals else "")


def face_verdict(face: dict) -> tuple[str, str]:
    """(tone, sentence) for one face record, from the shared verdict (pipeline.results.face_verdict) in the
    report's longer words. Tones: ok, part, bad (what the judges say), lost (not re-detected), unchecked (no judge
    ran: `apply` without a check, or a face left unmasked)."""
    verdict = verdict_of(face)
    if verdict.state == NOT_FOUND:
        return "lost", ("The face detector no longer finds this face in the protected photo, so no model could "
                        "compare it (a different detector might still find it).")
    if verdict.state == LEFT_ALONE:
        return "unchecked", "Left unchanged: not the person whose mask this is."
    if verdict.state == UNCHECKED:
        return "unchecked", ("Masked; no recognition check was run here (check it with `faceveil verify ORIGINAL "
                             "PROTECTED`).")
    still, n = verdict.recognised_by, len(verdict.judges)
    if not still:
        return "ok", f"No longer recognised: none of the {n} face-recognition models matches it to the original."
    if len(still) == n:
        return "bad", f"Still recognised by all {n} models: this face is not protected against them yet."
    rest = "the other one no longer matches" if n - len(still) == 1 else f"the other {n - len(still)} no longer match"
    return "part", f"Still recognised by {len(still)} of {n} models ({', '.join(still)}); {rest} it to the original."


def css_tone(tone: str) -> str:
    return tone if tone in ("ok", "bad", "part") else "none"


def bars_table(entries: dict[str, dict], thresholds: dict[str, float], surrogates: list[str],
               ranks: dict[str, str] | None = None) -> str:
    """One row per model: name, similarity bar with the threshold line, score, threshold, what the model says."""
    rows = []
    for model, value in entries.items():
        score = value.get("score")
        note = " <span class=\"muted small\">(optimised against)</span>" if model in surrogates else ""
        if score is None:
            rows.append(f"<tr><td class=\"model\">{H.esc(model)}{note}</td><td><span class=\"muted\">face not found"
                        f"</span></td><td class=\"num\"></td><td class=\"num\"></td><td class=\"says\">"
                        f"{H.pill('none', 'not found')}</td></tr>")
            continue
        scale = model_scale(model, thresholds)
        says = H.pill("bad", "same person") if value.get("matches") else H.pill("ok", "different")
        rank = f"<td class=\"num small\">{H.esc(ranks.get(model, ''))}</td>" if ranks is not None else ""
        rows.append(f"<tr><td class=\"model\">{H.esc(model)}{note}</td>"
                    f"<td>{H.similarity_bar(score, scale.threshold, scale.low, scale.high)}</td>"
                    f"<td class=\"num\">{score:.3f}</td><td class=\"num muted\">{scale.threshold:.3f}</td>"
                    f"{rank}<td class=\"says\">{says}</td></tr>")
    rank_head = "<th>rank</th>" if ranks is not None else ""
    head = (f"<thead><tr><th>model</th><th>similarity original → protected</th><th>score</th><th>threshold</th>"
            f"{rank_head}<th>model says</th></tr></thead>")
    return f"<table class=\"bars\">{head}<tbody>{''.join(rows)}</tbody></table>"


def target_note(target: dict | None) -> str:
    """Targeted methods: the identity the face was steered towards, and which models now see that identity."""
    if not target or "identity" not in target:
        return ""
    steps = (f" (aimed at in {target['chosen_steps']} of {target['steps']} steps)"
             if "chosen_steps" in target and "steps" in target else "")
    entries = judge_entries(target)
    seen = [m for m, v in entries.items() if v.get("matches")]
    verdict = ""
    if entries:  # the run checks the target only with the models the mask was optimised against
        verdict = (f" Checked with {', '.join(entries)}: taken for that person by {', '.join(seen)}." if seen
                   else f" Checked with {', '.join(entries)}: not taken for that person yet.")
    return (f"<div class=\"target\">Disguised towards: <b>{H.esc(target['identity'])}</b>{H.esc(steps)}."
            f"{H.esc(verdict)}</div>")


def resolve(path: str | None, base: Path | None) -> Path | None:
    """A path from a results file: as written, else relative to the folder of that results file."""
    if not path:
        return None
    p = Path(path)
    if p.exists() or p.is_absolute() or base is None:
        return p
    return base / p


def embeddable(path: Path, base: Path | None) -> Path:
    """The photo to embed, or FaceveilError: a results file read from disk (base = its folder) may only bring in
    photos inside that folder (links resolved), so that a crafted JSON cannot pull any local image into a report."""
    if base is None:
        return path
    from faceveil.io.paths import safe_resolve

    real, root = safe_resolve(path), safe_resolve(base)
    if not real.is_relative_to(root):
        raise FaceveilError(f"{path} is outside the folder of the results file ({base}): not embedded")
    return real


def photo_figures(pair: I.PhotoPair, boxes: list[list[float]], jpeg: bool = False) -> str:
    """The before / after / change thumbnails, face boxes outlined by CSS over the original (pixels untouched);
    without the original (a shareable report), the protected photo alone with the boxes over it."""
    thumbs = I.thumbnails(pair)
    h, w = (pair.before if pair.before is not None else pair.after).shape[:2]
    outlines = "".join(
        "<div class=\"box\" style=\"left:{left:.2f}%;top:{top:.2f}%;width:{width:.2f}%;height:{height:.2f}%\">"
        .format(**I.box_percent(b, w, h)) + f"<span>{i}</span></div>" for i, b in enumerate(boxes))
    if pair.before is None:
        caption = "Protected (faces numbered)" if boxes else "Protected"
        return (f"<div class=\"triple\"><figure><div class=\"photo\"><img src=\"{thumbs['after']}\" "
                f"alt=\"protected photo\">{outlines}</div><figcaption>{caption}</figcaption></figure></div>")
    caption = "Original (faces numbered)" if boxes else "Original"
    original = (f"<figure><div class=\"photo\"><img src=\"{thumbs['before']}\" alt=\"original photo\">{outlines}"
                f"</div><figcaption>{caption}</figcaption></figure>")
    resized = " (resized to the original's size)" if pair.resized else ""
    change = "Changes ×10 (grey = untouched" + ("; the faint texture elsewhere is the JPEG re-save)" if jpeg else ")")
    return (f"<div class=\"triple\">{original}{H.figure(thumbs['after'], 'Protected' + resized)}"
            f"{H.figure(thumbs['change'], change)}</div>")


def face_block(index: int, face: dict, pair: I.PhotoPair | None, context: dict, extra: str = "") -> str:
    entries = judge_entries(face)
    tone, sentence = face_verdict(face)
    pictures = ""
    if pair is not None and face.get("box") and index < MAX_FACES_WITH_CLOSEUPS:
        c = I.face_closeups(pair, face["box"])
        pictures = (f"<div class=\"triple\">{H.figure(c['before'], 'original')}{H.figure(c['after'], 'protected')}"
                    f"{H.figure(c['change'], 'changes ×10')}</div>" if "before" in c
                    else f"<div class=\"triple\">{H.figure(c['after'], 'protected')}</div>")
    bars = bars_table(entries, context["thresholds"], context["surrogates"], face.get("ranks")) if entries else ""
    layout = "face" if pictures else "face solo"  # no close-ups (no face box): the bars take the full width
    return (f"<div class=\"{layout}\"><div>{pictures}</div><div><h3>Face {index}</h3>"
            f"<div class=\"verdict {css_tone(tone)}\">{H.esc(sentence)}</div>{target_note(face.get('target'))}{bars}"
            f"{extra}</div></div>")


def photo_card(result: dict, context: dict, with_images: bool) -> tuple[str, list[str]]:
    """One photo's card, and the tones of its faces (for the summary)."""
    source, output = resolve(result.get("file"), context["base"]), resolve(result.get("output"), context["base"])
    name = result.get("title") or Path(result.get("file") or "?").name
    details = result.get("details") or {}
    faces = [f for f in details.get("faces") or [] if isinstance(f, dict)]
    head = f"<h2>{H.esc(name)}</h2>"
    if result.get("status") != "ok":
        message = result.get("message") or result.get("status")
        return (f"<section class=\"card photo-card\">{head}<p>{H.pill('none', result.get('status', '?'))} "
                f"{H.esc(message)}</p></section>", [])
    if "frames" in details:  # a video: no stills to compare
        return (f"<section class=\"card photo-card\">{head}<p>Video: {H.esc(details.get('tracks'))} face track(s) "
                f"masked over {H.esc(details.get('frames'))} frames, written to {H.esc(output)}.</p></section>", [])
    pair, note = None, ""
    originals = context.get("originals", False)
    if with_images and output is not None and (source is not None or not originals):
        try:
            after = embeddable(output, context["base"])
            pair = (I.load_pair(embeddable(source, context["base"]), after) if originals and source is not None
                    else I.load_protected(after))
        except FaceveilError as exc:
            note = f"<p class=\"muted\">Pictures not shown: {H.esc(exc)}</p>"
    elif with_images:
        note = "<p class=\"muted\">Pictures not shown: the results do not name both photos.</p>"
    jpeg = output is not None and output.suffix.lower() in (".jpg", ".jpeg")
    pictures = photo_figures(pair, [f["box"] for f in faces if f.get("box")], jpeg) if pair is not None else note
    blocks = [face_block(i, f, pair, context, f.get("extra_html", "")) for i, f in enumerate(faces)]
    tones = [face_verdict(f)[0] for f in faces]
    where = f"<p class=\"muted small\">{H.esc(source)} → {H.esc(output)}</p>" if output else ""
    said = result.get("verdict") or photo_verdict(faces)[1]
    head += f"<p class=\"verdict\">{H.esc(said[:1].upper() + said[1:])}.</p>" if faces else ""
    return f"<section class=\"card photo-card\">{head}{where}{pictures}{''.join(blocks)}</section>", tones


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_banner(tones: list[str]) -> str:
    """The verdict over all faces, first thing on the page."""
    n = len(tones)
    if n == 0:
        return H.banner("none", "No face was checked.")
    ok, bad, part, lost, unchecked = (tones.count(t) for t in ("ok", "bad", "part", "lost", "unchecked"))
    if unchecked == n:
        return H.banner("none", f"{count(n, 'face')} found; no recognition check was run.",
                        "Check a protected photo with `faceveil verify ORIGINAL PROTECTED`.")
    if ok == n:
        return H.banner("ok", "Protected: " + ("the face is" if n == 1 else f"all {n} faces are")
                        + " no longer recognised by any of the models.")
    if bad == n:
        return H.banner("bad", "Not protected yet: every model still recognises "
                        + ("the face." if n == 1 else f"all {n} faces."),
                        "A stronger setting (--strength high, more --iters) or another method may help.")
    parts = [f"{count(k, 'face')} {what}" for k, what in (
        (ok, "no longer recognised by any model"), (part, "still recognised by some of the models"),
        (bad, "still recognised by every model"), (lost, "no longer found by the face detector"),
        (unchecked, "not checked")) if k]
    if ok:
        headline = f"{ok} of {count(n, 'face')} no longer recognised by any model."
    elif lost:
        headline = "Partly protected: the faces still found are recognised by at least one model."
    else:
        headline = "Partly protected: every face is still recognised by at least one model."
    return H.banner("part", headline, "; ".join(parts) + ". Details per face below.")


def per_model_line(results: list[dict]) -> str:
    """Per judge: on how many faces it still matches (the researcher's one-line summary)."""
    counts: dict[str, list[int]] = {}
    for r in results:
        for face in (r.get("details") or {}).get("faces") or []:
            for model, v in judge_entries(face).items():
                c = counts.setdefault(model, [0, 0])
                c[0] += bool(v.get("matches"))
                c[1] += 1
    if not counts:
        return ""
    parts = ", ".join(f"{m} {k}/{n}" for m, (k, n) in counts.items())
    return f"<p class=\"small muted\">Faces each model still recognises: {H.esc(parts)}.</p>"


def run_lede(settings: dict[str, Any]) -> str:
    """One line on how the photos were protected, from whatever settings the run recorded."""
    attack = settings.get("attack") if isinstance(settings.get("attack"), dict) else {}
    eps = attack.get("eps", settings.get("eps"))
    parts = []
    if settings.get("method"):
        parts.append(f"method {settings['method']}")
    if isinstance(eps, int | float):
        parts.append(f"budget ±{eps * 255 if eps <= 1 else eps:g}/255 per pixel")
    steps = attack.get("steps", settings.get("iters"))
    if steps:
        parts.append(f"{steps} iterations")
    if settings.get("surrogates"):
        parts.append("optimised against " + ", ".join(settings["surrogates"]))
    return "; ".join(parts)


def documents(payload: dict) -> list[dict]:
    return list(payload.get("documents") or [payload])


def context_for(doc: dict, originals: bool = False) -> dict:
    settings = doc.get("settings") or {}
    return {"thresholds": dict(settings.get("thresholds") or {}), "surrogates": list(settings.get("surrogates") or []),
            "base": Path(doc["_base"]) if doc.get("_base") else None, "originals": originals}


def protect_body(payload: dict, progress: bool = False, originals: bool = False) -> tuple[str, str]:
    """(lede, body) of a protect / apply report (the original photos only with originals=True)."""
    cards, tones, results_all, ledes = [], [], [], []
    shown = 0
    for doc in documents(payload):
        context = context_for(doc, originals)
        results = list(doc.get("results") or [])
        results_all += results
        ledes.append(run_lede(doc.get("settings") or {}))
        for result in tqdm(results, desc="report", unit="photo", disable=not progress or not sys.stderr.isatty()):
            with_images = shown < MAX_PHOTOS_WITH_IMAGES
            card, face_tones = photo_card(result, context, with_images)
            shown += result.get("status") == "ok"
            cards.append(card)
            tones += face_tones
    capped = (f"<p class=\"muted\">Pictures are shown for the first {MAX_PHOTOS_WITH_IMAGES} photos only.</p>"
              if shown > MAX_PHOTOS_WITH_IMAGES else "")
    files = count(len(results_all), "photo")
    lede = "; ".join(x for x in dict.fromkeys(ledes) if x)
    tally = FaceTally()
    for result in results_all:
        if result.get("status") == "ok":
            tally.add(face_rows(result.get("details")), video="frames" in (result.get("details") or {}))
    line = f"<p class=\"small\">{H.esc(tally.line())}.</p>" if results_all else ""
    body = (f"<div id=\"summary\">{summary_banner(tones)}{line}{per_model_line(results_all)}</div>"
            f"<p class=\"howto\">{how_to_read(originals)}</p>{capped}{''.join(cards)}")
    return f"{files}" + (f" — {lede}" if lede else ""), body


def ordinal_rank(rank: int | None, size: int | None) -> str:
    if rank is None:
        return ""
    return f"rank {rank} of {size}" if size else f"rank {rank}"


def verify_faces(doc: dict, frame: int | None = None) -> list[dict]:
    """Verify rows (model x transform x face) regrouped into protect-style face records, plus per-face transform
    rows for the robustness plot; a video's rows: those of one sampled frame."""
    faces: dict[int, dict] = {}
    for row in doc.get("rows") or []:
        if row.get("frame") != frame:
            continue
        face = faces.setdefault(int(row.get("face", 0)), {"ranks": {}, "by_transform": []})
        if row.get("transform", "none") == "none":
            face[row["model"]] = {"score": row.get("score"), "matches": bool(row.get("matches"))}
            face["ranks"][row["model"]] = ordinal_rank(row.get("rank"), row.get("gallery_size"))
        face["by_transform"].append(row)
    boxes = (doc.get("settings") or {}).get("face_boxes") or [] if frame is None else []
    for i, face in faces.items():
        if i < len(boxes):
            face["box"] = boxes[i]
        scored = [v for v in judge_entries(face).values() if v.get("score") is not None]
        face["redetected"] = bool(scored) or not judge_entries(face)
    return [faces[i] for i in sorted(faces)]


def verify_body(payload: dict, progress: bool = False, originals: bool = False) -> tuple[str, str]:
    """(lede, body) of a verify report: protect's view plus the gallery rank and the transforms."""
    from faceveil.report import plots

    cards, tones, lines = [], [], []
    for doc in tqdm(documents(payload), desc="report", unit="pair", disable=not progress or not sys.stderr.isatty()):
        settings = doc.get("settings") or {}
        context = context_for(doc, originals)
        frames = settings.get("frames")  # a video: a card per sampled frame, without pictures
        for frame in frames if isinstance(frames, list) else [None]:
            faces = verify_faces(doc, frame)
            for face in faces:
                chart = plots.transform_bars(face["by_transform"], context["thresholds"])
                face["extra_html"] = (
                    "<p class=\"small muted\">Rank: where the original face comes when the protected face is "
                    "searched in a gallery of the original plus other people's faces "
                    f"({H.esc(settings.get('gallery', ''))}); rank 1 = recognised first.</p>"
                    + (H.figure(chart, "The same check after everyday changes a photo goes through (JPEG quality "
                                       "75, half size, slight blur). Bars above the line: the model still "
                                       "recognises the person.") if chart else ""))
            result = {"file": settings.get("original"), "output": settings.get("protected"), "status": "ok",
                      "details": {"faces": faces}}
            if frame is not None:
                result["title"] = f"{Path(settings.get('protected') or '?').name}, frame {frame}"
                if not faces:
                    cards.append(f"<section class=\"card photo-card\"><h2>{H.esc(result['title'])}</h2><p>"
                                 f"{H.esc(NO_FACE_IN_ORIGINAL[:1].upper() + NO_FACE_IN_ORIGINAL[1:])}: nothing to "
                                 "protect there.</p></section>")
                    continue
            card, face_tones = photo_card(result, context, frame is None)
            cards.append(card)
            tones += face_tones
        if doc.get("summary"):
            lines.append(f"<p class=\"small\">{H.esc(doc['summary'])}.</p>")
    body = (f"<div id=\"summary\">{summary_banner(tones)}{''.join(lines)}</div>"
            f"<p class=\"howto\">{how_to_read(originals)}</p>"
            f"{''.join(cards)}")
    return f"{count(len(documents(payload)), 'original / protected pair')} checked", body
