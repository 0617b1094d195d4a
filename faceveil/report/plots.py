"""The report's plots, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display) and
returned as PNG data URIs."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.figure import Figure

from faceveil.report.images import png_uri
from faceveil.report.scales import model_scale

DPI = 110
OK, BAD, INK, GRID = "#1b7a3d", "#b3261e", "#1f2328", "#d8dee4"
MAX_LABELLED_BARS = 24
PALETTE = ("#3366cc", "#dc7633", "#2e8b57", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#b7950b")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.patch.set_facecolor("white")
    return fig


def _style(ax, ylabel: str = "", xlabel: str = "") -> None:
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def to_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return png_uri(buffer.getvalue())


def curves(series: dict[str, list[tuple[float, float, str]]], title: str, xlabel: str, ylabel: str,
           ylim: tuple[float, float] | None = (0.0, 1.0), xticks: Sequence[float] | None = None) -> str:
    """One line per series (method): points (x, y, label); labels (e.g. the eps) are written beside the points."""
    fig = _figure(6.2, 3.8)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        color = PALETTE[i % len(PALETTE)]
        ax.plot(xs, ys, marker="o", color=color, linewidth=2, label=name)
        for x, y, label in points:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
    if ylim is not None:
        ax.set_ylim(ylim[0] - 0.03, ylim[1] + 0.05)
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{x:g}" for x in xticks])
    ax.set_title(title, fontsize=12, loc="left")
    _style(ax, ylabel, xlabel)
    ax.legend(frameon=False, fontsize=9)
    return to_uri(fig)


def grouped_bars(categories: Sequence[str], groups: dict[str, Sequence[float | None]], title: str, ylabel: str,
                 ylim: tuple[float, float] | None = (0.0, 1.0), reference: tuple[float, str] | None = None,
                 dots: dict[str, Sequence[Sequence[float]]] | None = None) -> str:
    """Bars per category, one colour per group; optional horizontal reference line and per-bar dots (the values
    a mean bar was made of)."""
    n = max(1, len(groups))
    width = 0.8 / n
    fig = _figure(max(6.2, 0.55 * len(categories) * max(1, n / 2) + 2), 3.8)
    ax = fig.add_subplot()
    for g, (name, values) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(categories))]
        heights = [float("nan") if v is None else v for v in values]
        bars = ax.bar(xs, heights, width * 0.92, color=PALETTE[g % len(PALETTE)], label=name)
        if len(categories) * n <= MAX_LABELLED_BARS:  # values on the bars: zero-height bars still say "0.00"
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        for x, members in zip(xs, (dots or {}).get(name) or [], strict=False):
            ax.scatter([x] * len(members), members, s=10, color=INK, zorder=3, linewidths=0)
    if reference is not None:
        ax.axhline(reference[0], color=INK, linestyle="--", linewidth=1)
        ax.annotate(reference[1], (len(categories) - 0.5, reference[0]), textcoords="offset points",
                    xytext=(0, 3), ha="right", fontsize=8)
    ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 5 else 0, ha="right"
                  if len(categories) > 5 else "center")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=12, loc="left")
    _style(ax, ylabel)
    if len(groups) > 1:  # above the axes, where it cannot hide a bar
        fig.legend(loc="outside upper right", frameon=False, fontsize=9, ncols=min(4, len(groups)))
    return to_uri(fig)


def transform_bars(rows: list[dict], thresholds: dict[str, float]) -> str | None:
    """Verify: per model, a bar per transform of how far the score original -> protected lies above (still
    recognised) or below (not recognised) that model's threshold, in the model's own score units — one axis for
    models whose scales differ. None without transformed rows."""
    transforms = list(dict.fromkeys(r["transform"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    if len(transforms) < 2 or not models:
        return None
    fig = _figure(7.4, 2.9)
    ax = fig.add_subplot()
    width = 0.8 / len(transforms)
    margins = []
    for t, name in enumerate(transforms):
        by_model = {r["model"]: r for r in rows if r["transform"] == name}
        values = []
        for model in models:
            score = by_model.get(model, {}).get("score")
            values.append(float("nan") if score is None else score - model_scale(model, thresholds).threshold)
        margins += [v for v in values if v == v]
        xs = [i - 0.4 + width * (t + 0.5) for i in range(len(models))]
        ax.bar(xs, values, width * 0.92, color=PALETTE[t % len(PALETTE)], label=_transform_label(name))
    top = max([0.1, *margins]) * 1.15
    bottom = min([-0.1, *margins]) * 1.15
    ax.axhspan(0, top, color="#fbe3e0", zorder=0)
    ax.axhline(0, color=INK, linewidth=1.2)
    ax.annotate("still recognised", (len(models) - 0.45, top), xytext=(0, -10), textcoords="offset points",
                ha="right", fontsize=8, color=BAD)
    ax.annotate("not recognised", (len(models) - 0.45, bottom), xytext=(0, 4), textcoords="offset points",
                ha="right", fontsize=8, color=OK)
    ax.set_ylim(bottom, top)
    ax.set_xticks(range(len(models)), models, fontsize=9)
    _style(ax, "score − threshold")
    ax.legend(frameon=False, fontsize=8, ncols=len(transforms), loc="lower left", bbox_to_anchor=(0, 1.0))
    return to_uri(fig)


def _transform_label(name: str) -> str:
    return {"none": "as saved", "jpeg75": "JPEG 75", "resize0.5": "½ size", "blur1": "blur"}.get(name, name)
