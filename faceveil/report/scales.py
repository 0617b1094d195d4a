"""How a model's similarity scores are drawn in a report: its decision threshold and the ends of its bar (shared by
the photo pages and the plots)."""

from __future__ import annotations

from dataclasses import dataclass

from faceveil.errors import FaceveilError

SCORE_TRACKS = {"cosine": (-0.5, 1.0), "l2": (-1.5, 0.0)}  # (low, high) ends of the similarity bars


@dataclass(frozen=True)
class Scale:
    """How one model's scores are drawn: its decision threshold and the ends of its bar."""

    threshold: float
    low: float
    high: float


def model_scale(model: str, thresholds: dict[str, float]) -> Scale:
    """The same track for every model of a metric, so that bars compare across rows: cosine from -0.5 (clearly
    different people) to 1 (identical), dlib's negated L2 distance from -1.5 to 0 (scores beyond are drawn at the
    end). The threshold comes from the run's settings, else from the registry."""
    threshold = thresholds.get(model)
    metric = None
    try:
        from faceveil.models import zoo

        metric = zoo.spec(model).metric
        threshold = zoo.threshold(model) if threshold is None else threshold
    except FaceveilError:  # a model this install does not know: infer from the threshold's sign
        pass
    if threshold is None:
        raise FaceveilError(f"no decision threshold for model {model!r} in the results or the registry")
    l2 = metric == "l2" or (metric is None and threshold < 0)
    low, high = SCORE_TRACKS["l2" if l2 else "cosine"]
    return Scale(float(threshold), low, high)
