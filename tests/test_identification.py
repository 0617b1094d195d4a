"""TIP-IM identification protocol on LFW: the seeded split is deterministic and its roles are disjoint; a tiny run
(2 protected identities, 2 PGD iterations, crops mode) gives one row per judge with every key and rates in [0, 1]."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import LFW_ROOT, needs_lfw, needs_weights

from faceveil.datasets.lfw import identities
from faceveil.datasets.splits import GALLERY_CAP, TARGET_IDENTITIES, make_split
from faceveil.evaluate.protocols.tip_im import rank_metrics, surrogate_groups
from faceveil.evaluate.quality import psnr, set_mmd, ssim

ROW_KEYS = {"judge", "method", "surrogates", "white_box", "mode", "rank1_t", "rank5_t", "rank1_ut", "rank5_ut",
            "psnr", "ssim", "mmd", "clean_rank1"}


def test_quality_identical_and_noisy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1) < 1e-12
    assert 30 < psnr(a, b) < 40 and 0 < ssim(a, b) < 1


def test_set_mmd_orders_naturalness():
    """Identical sets: 0; a lightly perturbed copy: small; a different set of faces: much larger."""
    rng = np.random.default_rng(1)
    faces = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(12)]
    noisy = [np.clip(f.astype(int) + rng.integers(-6, 7, f.shape), 0, 255).astype(np.uint8) for f in faces]
    assert set_mmd(faces, faces) == 0
    assert 0 < set_mmd(noisy, faces) < 0.1 * set_mmd(faces[:6], faces[6:])


def test_rank_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.9, 0.2]])
    rates = rank_metrics(scores, ["t", "me", "x"], ["me", "me"], {"t"})
    assert rates == {"rank1_t": 0.5, "rank5_t": 1.0, "rank1_ut": 0.5, "rank5_ut": 0.0}


def test_leave_one_family_out_groups():
    groups = surrogate_groups(["faceres", "faceres-deep", "dlib"], None)
    assert len(groups) == 2
    for surrogates, judges in groups.items():
        assert not any(j in surrogates for j in judges)
    assert surrogate_groups(["dlib"], ["dlib", "mfn512"]) == {("dlib", "mfn512"): ["dlib"]}


@needs_lfw
def test_split_disjoint_and_deterministic():
    people = identities(LFW_ROOT)
    split = make_split(people, seed=3, limit=20, extra=30)
    assert split == make_split(people, seed=3, limit=20, extra=30)
    assert split != make_split(people, seed=4, limit=20, extra=30)
    protected = {n for n, _ in split.probes}
    targets = {n for n, _ in split.targets}
    extras = {n for n, _ in split.gallery} - protected - targets
    assert len(protected) == 20 and len(targets) == TARGET_IDENTITIES and len(extras) == split.extra_identities == 30
    assert not protected & targets and not (protected | targets) & extras
    probe_files = {p for _, p in split.probes} | {p for _, p in split.targets}
    gallery_files = [p for _, p in split.gallery]
    assert len(set(gallery_files)) == len(gallery_files) and not probe_files & set(gallery_files)
    assert protected | targets <= {n for n, _ in split.gallery}  # each keeps at least one gallery image
    assert max(Counter(n for n, _ in split.gallery).values()) <= GALLERY_CAP


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_tiny_pgd_run_crops(tmp_path):
    from faceveil.cli import main

    out = tmp_path / "ident.json"
    code = main(["eval", "identification", "--dataset", f"lfw={LFW_ROOT}", "--method", "pgd", "--limit", "2",
                 "--extra", "10", "--iters", "2", "--judges", "mfn192,mobileface", "--surrogates", "mobileface",
                 "--mode", "crops", "--quiet", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "eval identification" and doc["settings"]["protected_identities"] == 2
    assert doc["settings"]["target_identities"] == TARGET_IDENTITIES
    rows = {r["judge"]: r for r in doc["rows"]}
    assert set(rows) == {"mfn192", "mobileface"}
    assert rows["mobileface"]["white_box"] and not rows["mfn192"]["white_box"]
    for row in rows.values():
        assert ROW_KEYS <= set(row) and row["mode"] == "crops" and row["surrogates"] == ["mobileface"]
        assert all(0 <= row[k] <= 1 for k in ("rank1_t", "rank5_t", "rank1_ut", "rank5_ut", "ssim", "clean_rank1"))
        assert row["psnr"] > 25 and row["mmd"] >= 0
