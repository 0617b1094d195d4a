"""LFW verification protocol: the fold arithmetic on synthetic scores, and a 200-pair slice of the real View-2
protocol through our own detection and alignment (every recogniser must recognise before it is attacked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import LFW_ROOT, needs_lfw, needs_weights

from faceveil.datasets.lfw import read_pairs
from faceveil.evaluate.verification import best_threshold, select_pairs, ten_fold_accuracy


def test_best_threshold_separable():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([False, False, False, True, True, True])
    t, acc = best_threshold(scores, same)
    assert acc == 1.0 and 0.3 < t < 0.7


def test_ten_fold_uses_held_out_folds():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 300)
    scores = np.where(same, rng.normal(1, 0.5, 600), rng.normal(-1, 0.5, 600))
    folds = np.repeat(np.arange(10), 60)
    mean, std = ten_fold_accuracy(scores, same, folds)
    assert 0.95 < mean <= 1.0 and std < 0.05


@needs_lfw
def test_pairs_file_and_stratified_slice():
    pairs = read_pairs(LFW_ROOT)
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    chosen = select_pairs(pairs, 200)
    assert len(chosen) == 200 and sum(p.same for p in chosen) == 100
    assert sorted({p.fold for p in chosen}) == list(range(10))


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_every_model_recognises_on_lfw_slice(tmp_path):
    from faceveil.cli import main

    out = tmp_path / "verification.json"
    assert main(["eval", "verification", "--dataset", f"lfw={LFW_ROOT}", "--limit", "200", "--json", str(out),
                 "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "eval verification"
    accuracy = {r["model"]: r["accuracy"] for r in doc["rows"]}
    assert set(accuracy) == {"mobileface", "faceres", "faceres-deep", "dlib", "mfn512", "mfn192", "facenet-vgg",
                             "facenet-casia"}
    # 200 pairs is a small slice (one wrong pair = 0.5 %): the full 6,000-pair figures are in docs/benchmarks.md.
    assert all(a >= 0.88 for a in accuracy.values()), accuracy
    assert accuracy["dlib"] >= 0.97
