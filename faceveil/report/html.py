"""HTML building blocks of the report: the page (inline CSS, no scripts, no external requests), tables, the
similarity bars and verdict banners. Everything returned is a string of HTML with all text escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from faceveil import __version__

CSS = """
:root { --ok: #1b7a3d; --ok-bg: #e6f4ea; --bad: #b3261e; --bad-bg: #fce8e6; --part: #8a5a00; --part-bg: #fef3d6;
        --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --card: #ffffff; --page: #f3f5f7; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 40px; }
header.top { display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; margin-bottom: 6px; }
header.top h1 { font-size: 26px; margin: 0; }
header.top .kind { color: var(--muted); font-size: 17px; }
p.lede { color: var(--muted); margin: 2px 0 18px; }
h2 { font-size: 20px; margin: 28px 0 10px; }
h3 { font-size: 16px; margin: 0 0 8px; }
.card > h2:first-child { margin-top: 0; }
section.card, div.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
                         padding: 16px 18px; margin: 0 0 16px; }
.banner { border-radius: 10px; padding: 14px 18px; margin: 0 0 16px; font-size: 17px; }
.banner strong { font-size: 19px; }
.banner.ok { background: var(--ok-bg); border: 1px solid #a6d8b5; }
.banner.bad { background: var(--bad-bg); border: 1px solid #f1b2ac; }
.banner.part { background: var(--part-bg); border: 1px solid #f0d28c; }
.verdict { font-weight: 600; margin: 4px 0 8px; }
.verdict.ok { color: var(--ok); } .verdict.bad { color: var(--bad); } .verdict.part { color: var(--part); }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 13px; font-weight: 600; }
.pill.ok { background: var(--ok-bg); color: var(--ok); } .pill.bad { background: var(--bad-bg); color: var(--bad); }
.pill.part { background: var(--part-bg); color: var(--part); } .pill.none { background: #eef1f4; color: var(--muted); }
.triple { display: grid; grid-template-columns: repeat(3, 1fr); gap: 10px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; display: block; border-radius: 6px; border: 1px solid var(--line); }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; }
.photo { position: relative; }
.photo .box { position: absolute; border: 2px solid #ffd54a; border-radius: 3px; box-shadow: 0 0 0 1px #0006; }
.photo .box span { position: absolute; top: -2px; left: -2px; transform: translateY(-100%); background: #ffd54a;
                   color: #222; font-size: 11px; font-weight: 700; padding: 0 4px; border-radius: 3px 3px 0 0; }
.face { display: grid; grid-template-columns: 380px 1fr; gap: 20px; border-top: 1px solid var(--line);
        padding-top: 14px; margin-top: 14px; }
.face .triple { gap: 6px; }
.face figcaption { font-size: 12px; }
table.bars { width: 100%; border-collapse: collapse; font-size: 14px; }
table.bars td { padding: 3px 6px; vertical-align: middle; }
table.bars th { font-size: 12px; font-weight: 600; color: var(--muted); text-align: left; padding: 0 6px 2px; }
table.bars td.model { white-space: nowrap; width: 1%; }
table.bars td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; width: 1%; }
table.bars td.says { white-space: nowrap; width: 1%; }
.track { position: relative; height: 16px; background: #edf0f3; border-radius: 4px; min-width: 160px; }
.track .zone { position: absolute; top: 0; bottom: 0; right: 0; background: #f6d5d2; border-radius: 0 4px 4px 0; }
.track .fill { position: absolute; top: 3px; bottom: 3px; left: 0; border-radius: 3px; }
.track .fill.bad { background: var(--bad); } .track .fill.ok { background: var(--ok); }
.track .thr { position: absolute; top: -3px; bottom: -3px; width: 2px; background: #222; }
.muted { color: var(--muted); }
.small { font-size: 13px; }
.target { background: #eef3fb; border: 1px solid #c9d8f0; border-radius: 8px; padding: 8px 12px; margin: 8px 0; }
table.data { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: right;
                               white-space: nowrap; }
table.data td.text { white-space: normal; min-width: 4em; }
table.data th { background: #f6f8fa; position: sticky; top: 0; }
table.data th.text, table.data td.text { text-align: left; }
div.scroll { overflow-x: auto; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 14px; }
.plots figure.wide { grid-column: 1 / -1; max-width: 920px; }
.plots figure img { border: none; }
dl.settings { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px; margin: 0; }
dl.settings dt { color: var(--muted); } dl.settings dd { margin: 0; word-break: break-word; }
.howto { font-size: 14px; color: var(--muted); }
.howto b { color: var(--ink); }
footer { color: var(--muted); font-size: 12px; margin-top: 26px; }
.face figure { max-width: 760px; }
.face.solo { grid-template-columns: 1fr; } .face.solo > div:first-child { display: none; }
table.data.compact { width: auto; min-width: 50%; margin-bottom: 12px; }
table.data td.wide { min-width: 16em; }
@media (max-width: 760px) { .face { grid-template-columns: 1fr; } }
"""



def esc(value: Any) -> str:
    """HTML-escaped text; a file name that is not UTF-8 (kept by Python as surrogates) gets replacement characters
    instead of failing when the page is written."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return escape(text, quote=True)


def page(title: str, kind_label: str, lede: str, body: str, footer: str = "") -> str:
    """The whole document: one file, inline CSS, no scripts."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        # No network at all: even if a future edit adds a remote URL, the browser must not fetch it.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header class=\"top\"><h1>{esc(title)}</h1><span class=\"kind\">{esc(kind_label)}</span></header>\n"
        f"<p class=\"lede\">{esc(lede)}</p>\n{body}\n"
        f"<footer>Made by faceveil {esc(__version__)} on this computer; nothing in this file was sent anywhere. "
        f"All images are embedded in the file.{' ' + esc(footer) if footer else ''}</footer>\n</main>\n</body>\n"
        "</html>\n"
    )


def banner(tone: str, headline: str, detail: str = "") -> str:
    extra = f"<br><span>{esc(detail)}</span>" if detail else ""
    return f"<div class=\"banner {tone}\"><strong>{esc(headline)}</strong>{extra}</div>"


def pill(tone: str, text: str) -> str:
    return f"<span class=\"pill {tone}\">{esc(text)}</span>"


def figure(src: str, caption: str, alt: str | None = None, wide: bool = False) -> str:
    cls = " class=\"wide\"" if wide else ""
    return (f"<figure{cls}><img src=\"{src}\" alt=\"{esc(alt or caption)}\">"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def settings_list(settings: dict[str, Any]) -> str:
    """A compact definition list of the run's settings (nested values as short text)."""
    items = []
    for key, value in settings.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        items.append(f"<dt>{esc(key)}</dt><dd>{esc(short_value(value))}</dd>")
    return f"<dl class=\"settings\">{''.join(items)}</dl>" if items else ""


def short_value(value: Any, limit: int = 160) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        text = ", ".join(short_value(v, 40) for v in value)
    elif isinstance(value, dict):
        text = "; ".join(f"{k}: {short_value(v, 40)}" for k, v in value.items())
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def data_table(rows: list[dict], cell, compact: bool = False) -> str:
    """An HTML table of result rows: the union of their keys as columns; `cell(key, value)` formats a value.
    Columns of numbers are right-aligned, the others left-aligned (header included)."""
    if not rows:
        return "<p class=\"muted\">(no rows)</p>"
    keys: list[str] = []
    for row in rows:  # nested values (per-rate dicts) stay in the JSON: a table cell cannot show them
        keys.extend(k for k, v in row.items() if k not in keys and not isinstance(v, dict))
    numeric = {k: all(_is_number(r.get(k)) for r in rows if r.get(k) is not None) for k in keys}
    head = "".join(f"<th>{esc(k)}</th>" if numeric[k] else f"<th class=\"text\">{esc(k)}</th>" for k in keys)
    body = []
    for row in rows:
        cells = []
        for k in keys:
            raw = cell(k, row.get(k))
            if numeric[k]:
                cells.append(f"<td>{esc(raw)}</td>")
            else:  # names never break at their hyphens, lists break after each "+"
                text = esc(raw).replace("-", "&#8209;").replace("+", "+<wbr>")
                cls = "text wide" if len(raw) > 24 else "text"
                cells.append(f"<td class=\"{cls}\">{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    table_class = "data compact" if compact else "data"
    return (f"<div class=\"scroll\"><table class=\"{table_class}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def similarity_bar(score: float, threshold: float, low: float, high: float) -> str:
    """A bar from `low` to the score on a [low, high] track; the threshold is a black line, the part of the track
    at or past it (where the model says 'same person') is shaded red, the fill is red when the score reaches it."""
    span = high - low

    def pos(v: float) -> float:
        return max(0.0, min(100.0, 100 * (v - low) / span))

    tone = "bad" if score >= threshold else "ok"
    t = pos(threshold)
    return (f"<div class=\"track\"><div class=\"zone\" style=\"left:{t:.1f}%\"></div>"
            f"<div class=\"fill {tone}\" style=\"width:{max(pos(score), 1.5):.1f}%\"></div>"
            f"<div class=\"thr\" style=\"left:calc({t:.1f}% - 1px)\"></div></div>")
