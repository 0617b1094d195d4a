"""Evaluation reports: the rows of one or several `--json` result files ({"command", "settings", "rows"}) as HTML
tables, and the plots a reader expects — protection against the budget eps and against image quality (SSIM), one
curve per method, per-judge bars, robustness bars per transform, verification accuracy per model."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from faceveil.io.results import format_cell
from faceveil.report import html as H
from faceveil.report import plots

# The protection figure of each protocol, in the order looked for; each is a rate in [0, 1], higher = better
# protected (identification: the true person is not ranked first; OPOM: protection success; APF: attack success).
PROTECTION_KEYS = {
    "rank1_ut": "Rank-1 protection",
    "top1_psr": "Top-1 protection success",
    "asr": "attack success rate",
    "protection": "protection rate",
}
MEANING = {
    "rank1_ut": "the true person is not ranked first when the protected face is searched in the gallery",
    "top1_psr": "the protected face's true identity is not the top-1 match",
    "asr": "the protected pair is no longer verified as the same person",
    "protection": "the face is protected",
}
# Per-judge bars of a single run show these rates, where present.
RATE_LABELS = {"rank1_ut": "Rank-1 untargeted", "rank5_ut": "Rank-5 untargeted", "rank1_t": "Rank-1 targeted",
               "rank5_t": "Rank-5 targeted", "top1_psr": "Top-1 PSR", "top5_psr": "Top-5 PSR", "asr": "ASR"}
# Settings carried into every row (and shown as columns when they differ between the merged files).
CARRIED_SETTINGS = ("method", "eps", "mode", "protocol", "iters", "gamma")
Plot = tuple[str, str, bool]  # PNG data URI, caption, spans the full width
RETAINED_REFERENCE = 1.0  # "retained" = rate after the transform / rate before: 1.0 = nothing lost


@dataclass
class Group:
    """The rows of every merged file that came from one command. `rows` carry their file's settings (for the
    plots); `table` carries only the settings that differ between the files (the columns a reader needs)."""

    command: str
    rows: list[dict] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    settings: list[dict] = field(default_factory=list)


def _judge(row: dict) -> str:
    return str(row.get("judge") or row.get("model") or "?")


def _fmt_eps(eps: Any) -> str:
    return f"ε {eps:g}" if isinstance(eps, int | float) else ""


def group_documents(docs: list[dict]) -> list[Group]:
    """Rows grouped by command; each row gets the carried settings of its file where it lacks them."""
    by_command: dict[str, list[dict]] = {}
    for doc in docs:
        by_command.setdefault(str(doc.get("command") or "results"), []).append(doc)
    groups = []
    for command, members in by_command.items():
        group = Group(command, settings=[d.get("settings") or {} for d in members])
        varying = [k for k in CARRIED_SETTINGS if len({repr(s.get(k)) for s in group.settings}) > 1]
        for doc, settings in zip(members, group.settings, strict=True):
            for row in doc.get("rows") or []:
                group.rows.append({**row, **{k: settings[k] for k in CARRIED_SETTINGS if k in settings
                                             and k not in row}})
                group.table.append({**{k: settings.get(k) for k in varying if k not in row}, **row})
        groups.append(group)
    return groups


def _protection_key(rows: list[dict]) -> str | None:
    return next((k for k in PROTECTION_KEYS if any(isinstance(r.get(k), int | float) for r in rows)), None)


def _judged_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """Black-box rows when the run marks white-box judges (a judge the mask was optimised against flatters it)."""
    black = [r for r in rows if r.get("white_box") is False or r.get("judge_seen_by_surrogates") == "black-box"]
    if black and len(black) < len(rows):
        return black, "black-box judges"
    return rows, "judges"


def _points(rows: list[dict], key: str) -> dict[tuple[str, Any], dict[str, float]]:
    """(method, eps) -> mean protection and mean SSIM over the judges."""
    cells: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get(key), int | float):
            cells[(str(row.get("method") or "?"), row.get("eps"))].append(row)
    out = {}
    for cell, members in cells.items():
        ssims = [r["ssim"] for r in members if isinstance(r.get("ssim"), int | float)]
        out[cell] = {"protection": mean(r[key] for r in members), "ssim": mean(ssims) if ssims else None,
                     "judges": len(members)}
    return out


def protection_plots(rows: list[dict]) -> list[Plot]:
    """(data URI, caption) of the protection-vs-eps and protection-vs-SSIM curves, when there is more than one
    point to draw, and per-judge bars."""
    key = _protection_key(rows)
    if key is None:
        return []
    rows, who = _judged_rows(rows)
    points = _points(rows, key)
    label = PROTECTION_KEYS[key]
    out = []
    eps_values = {e for _, e in points if isinstance(e, int | float)}
    if len(eps_values) >= 2:
        series: dict[str, list] = defaultdict(list)
        for (method, eps), p in points.items():
            if isinstance(eps, int | float):
                series[method].append((float(eps), p["protection"], ""))
        out.append((plots.curves(series, "Protection vs budget", "ε (L∞, 0..255 pixel units)", label,
                                 xticks=sorted(eps_values)),
                    f"{label} ({MEANING[key]}) against the perturbation budget, one curve per method (mean over "
                    f"{who}).", False))
    with_ssim = {c: p for c, p in points.items() if p["ssim"] is not None}
    if len(with_ssim) >= 2:
        series = defaultdict(list)
        for (method, eps), p in with_ssim.items():
            series[method].append((p["ssim"], p["protection"], _fmt_eps(eps)))
        out.append((plots.curves(series, "Protection vs image quality", "SSIM to the original (1 = identical)",
                                 label),
                    f"Protection against image quality, one curve per method, points labelled by ε (mean over {who}). "
                    "Up and to the right is better.", False))
    out += judge_bars(rows, key, points)
    return out


def judge_bars(rows: list[dict], key: str, points: dict) -> list[Plot]:
    """A single run: every rate per judge. Several runs: the protection figure per judge, one bar per run."""
    judges = list(dict.fromkeys(_judge(r) for r in rows))
    if len(points) == 1:
        rates = [k for k in RATE_LABELS if any(isinstance(r.get(k), int | float) for r in rows)]
        groups = {RATE_LABELS[k]: [next((r[k] for r in rows if _judge(r) == j and k in r), None) for j in judges]
                  for k in rates}
        caption = "Every rate per judge model (untargeted: the true person is not found; targeted: the chosen " \
                  "target is found instead)."
        return [(plots.grouped_bars(judges, groups, "Per judge model", "rate"), caption, False)]
    if len(points) > len(plots.PALETTE):
        return []
    groups = {}
    for method, eps in points:
        name = f"{method} {_fmt_eps(eps)}".strip()
        groups[name] = [next((r[key] for r in rows if _judge(r) == j and str(r.get("method") or "?") == method
                              and r.get("eps") == eps), None) for j in judges]
    return [(plots.grouped_bars(judges, groups, "Per judge model", PROTECTION_KEYS[key]),
             f"{PROTECTION_KEYS[key]} per judge model, one bar per run.", len(judges) * len(groups) > 16)]


def robustness_plots(rows: list[dict]) -> list[Plot]:
    """Retained protection per transform (mean over judges, judges as dots), one bar colour per method."""
    rows = [{**r, "transform": _robustness_case(r)} for r in rows
            if isinstance(r.get("retained"), int | float) and r.get("transform")]
    rows = [r for r in rows if r["transform"] != "none"]  # the reference itself: retained 1 by definition
    if not rows:
        return []
    transforms = list(dict.fromkeys(str(r["transform"]) for r in rows))
    methods = list(dict.fromkeys(str(r.get("method") or "?") for r in rows))
    groups, dots = {}, {}
    for method in methods:
        per_t = [[r["retained"] for r in rows if str(r["transform"]) == t and str(r.get("method") or "?") == method]
                 for t in transforms]
        groups[method] = [mean(v) if v else None for v in per_t]
        dots[method] = per_t
    top = max(1.05, max(r["retained"] for r in rows) + 0.05)
    chart = plots.grouped_bars(transforms, groups, "Protection retained after each transform", "retained",
                               ylim=(0, top), reference=(RETAINED_REFERENCE, "as strong as untransformed"),
                               dots=dots)
    return [(chart, "Retained = protection after the transform / protection without it; bars are the mean over "
                    "judges, dots the single judges. A transform that also breaks recognition of clean photos makes "
                    "protection look retained: check the clean columns in the table.", len(transforms) > 4)]


def _robustness_case(row: dict) -> str:
    """The transform, or the attacker for rows of an attacker (the adaptive linear probe) rather than a transform."""
    attacker = row.get("attacker")
    if attacker and attacker not in ("plain", "none"):
        return str(attacker) if row.get("transform") in (None, "none") else f"{row['transform']} + {attacker}"
    return str(row.get("transform"))


def verification_plots(rows: list[dict]) -> list[Plot]:
    rows = [r for r in rows if isinstance(r.get("accuracy"), int | float) and r.get("model")]
    if not rows:
        return []
    models = [str(r["model"]) for r in rows]
    low = max(0.0, min(r["accuracy"] for r in rows) - 0.1)
    chart = plots.grouped_bars(models, {"accuracy": [r["accuracy"] for r in rows]}, "Verification accuracy",
                               "accuracy", ylim=(low, 1.0))
    return [(chart, "Accuracy of each model on the verification pairs (10-fold; threshold chosen on the other "
                    "folds).", False)]


def headline(rows: list[dict]) -> str:
    """The best run in one sentence, and every run in a small table, for a reader who looks at nothing else."""
    key = _protection_key(rows)
    if key is None or any(r.get("transform") for r in rows):
        return ""
    judged, who = _judged_rows(rows)
    points = _points(judged, key)
    if not points:
        return ""
    (method, eps), best = max(points.items(), key=lambda item: item[1]["protection"])
    tone = "ok" if best["protection"] >= 0.8 else "part" if best["protection"] >= 0.3 else "bad"
    quality = f"; SSIM {best['ssim']:.3f}" if best["ssim"] is not None else ""
    if best["protection"] == 0:
        title = "No run protects any face yet" if len(points) > 1 else f"{method} {_fmt_eps(eps)} protects no face"
    else:
        lead = "Best run: " if len(points) > 1 else ""
        title = f"{lead}{method} {_fmt_eps(eps)} protects {100 * best['protection']:.0f}% of faces"
    detail = f"{PROTECTION_KEYS[key]}: {MEANING[key]} (mean over {best['judges']} {who}{quality})."
    text = H.banner(tone, title, detail)
    if len(points) == 1:
        return text
    summary = [{"method": m, "eps": e, PROTECTION_KEYS[key]: p["protection"], "ssim": p["ssim"], who: p["judges"]}
               for (m, e), p in sorted(points.items(), key=lambda item: (item[0][0], str(item[0][1])))]
    rates = {PROTECTION_KEYS[key], "ssim"}
    return text + H.data_table(summary, lambda k, v: f"{v:.3f}" if k in rates and isinstance(v, float)
                               else format_cell(k, v), compact=True)


def group_section(group: Group) -> str:
    if any(r.get("transform") for r in group.rows):
        plots_html = robustness_plots(group.rows)
    else:
        plots_html = protection_plots(group.rows) or verification_plots(group.rows)
    figures = "".join(H.figure(uri, caption, wide=wide) for uri, caption, wide in plots_html)
    settings = common_settings(group.settings)
    return (f"<section class=\"card\" id=\"eval-{H.esc(group.command.replace(' ', '-'))}\">"
            f"<h2>{H.esc(group.command)}</h2>{headline(group.rows)}"
            + (f"<div class=\"plots\">{figures}</div>" if figures else "")
            + f"<h3 style=\"margin-top:14px\">Results</h3>{H.data_table(group.table, format_cell)}"
            + f"<details style=\"margin-top:10px\"><summary class=\"small muted\">Settings</summary>"
              f"{H.settings_list(settings)}</details></section>")


def common_settings(all_settings: list[dict]) -> dict:
    """The settings every merged file shares (all of them for one file)."""
    if len(all_settings) == 1:
        return all_settings[0]
    first = all_settings[0]
    shared = {k: v for k, v in first.items() if all(repr(s.get(k)) == repr(v) for s in all_settings[1:])}
    return {"files merged": len(all_settings), **shared}


def eval_body(payload: dict) -> tuple[str, str]:
    docs = list(payload.get("documents") or [payload])
    groups = group_documents(docs)
    commands = ", ".join(g.command for g in groups)
    rows = sum(len(g.rows) for g in groups)
    lede = f"{commands}: {rows} result row(s) from {len(docs)} file(s)"
    return lede, "".join(group_section(g) for g in groups)
