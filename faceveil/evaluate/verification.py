"""LFW View-2 verification: 10-fold accuracy per model through our own detection and alignment.

Per fold, the threshold is chosen on the nine other folds and applied to the held-out fold (the standard protocol);
the reported `threshold` is the best one over all pairs, which is what the registry ships as each model's decision
threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.datasets.lfw import Pair, read_pairs
from faceveil.models import zoo


def select_pairs(pairs: list[Pair], limit: int | None) -> list[Pair]:
    """A stratified slice: the same number of matched and mismatched pairs from every fold."""
    if not limit or limit >= len(pairs):
        return pairs
    folds = sorted({p.fold for p in pairs})
    per = max(1, limit // (2 * len(folds)))
    chosen = []
    for f in folds:
        for same in (True, False):
            chosen += [p for p in pairs if p.fold == f and p.same == same][:per]
    return chosen


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold (score >= t means same) maximising accuracy; returns (threshold, accuracy)."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # Predict "same" for indices >= k: accuracy = mismatched below k + matched at/above k.
    neg_below = np.concatenate([[0], np.cumsum(~y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    acc = (neg_below + pos_above) / len(s)
    k = int(np.argmax(acc))
    if k == 0:
        t = s[0] - 1e-6
    elif k == len(s):
        t = s[-1] + 1e-6
    else:
        t = (s[k - 1] + s[k]) / 2
    return float(t), float(acc[k])


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    accs = []
    for f in np.unique(folds):
        train = folds != f
        t, _ = best_threshold(scores[train], same[train])
        test = ~train
        accs.append(float(np.mean((scores[test] >= t) == same[test])))
    return float(np.mean(accs)), float(np.std(accs))


def pair_scores(model_name: str, crops_by_geometry: dict[str, dict[Path, np.ndarray]],
                pairs: list[Pair]) -> np.ndarray:
    model = zoo.load(model_name)
    crops = crops_by_geometry[model.spec.geometry]
    files = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {f: i for i, f in enumerate(files)}
    emb = zoo.embed_crops(model, np.stack([crops[f] for f in files]))
    a = emb[[index[p.a] for p in pairs]]
    b = emb[[index[p.b] for p in pairs]]
    return zoo.score(model.spec.metric, a, b).numpy()


def run(root: Path, model_names: list[str], limit: int | None, progress: bool = True) -> tuple[list[dict], dict]:
    from faceveil.datasets.faces import aligned_crops

    pairs = select_pairs(read_pairs(root), limit)
    files = sorted({p.a for p in pairs} | {p.b for p in pairs})
    geometries = sorted({zoo.spec(m).geometry for m in model_names})
    crops, info = aligned_crops(files, geometries, progress=progress)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    rows = []
    for name in tqdm(model_names, desc="models", disable=not progress):
        with torch.no_grad():
            scores = pair_scores(name, crops, pairs)
        mean, std = ten_fold_accuracy(scores, same, folds)
        t, _ = best_threshold(scores, same)
        s = zoo.spec(name)
        rows.append({"model": name, "family": s.family, "pairs": len(pairs), "accuracy": mean,
                     "accuracy_std": std, "threshold": t, "metric": s.metric})
    return rows, info


def save_thresholds(rows: list[dict], path: str | Path) -> None:
    """Write {model: {threshold, accuracy, pairs}} — the registry's calibrated decision thresholds. Models not in
    `rows` keep the entry the file already has."""
    import json

    from faceveil.io.results import write_json_atomic

    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update({r["model"]: {"threshold": r["threshold"], "accuracy": r["accuracy"], "pairs": r["pairs"],
                               "metric": r["metric"]} for r in rows})
    write_json_atomic(path, table)
