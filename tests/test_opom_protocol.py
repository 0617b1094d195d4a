"""OPOM identification protocol: the seeded split (>= 12 images, 10 train, the rest test), rank and Top-1/Top-5
counting on hand-made and brute-forced synthetic embeddings, M-M pairing, and tiny end-to-end runs on LFW."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LFW_ROOT, needs_lfw, needs_weights

from faceveil.attacks.core import CALIBRATED_DROPOUT, AttackConfig
from faceveil.errors import FaceveilError
from faceveil.evaluate.protocols import opom as P
from faceveil.methods.base import MaskResult

ROW_KEYS = {"judge", "method", "surrogates", "white_box", "mode", "masks", "top1_psr", "top5_psr", "mm_top1_psr",
            "mm_top5_psr", "clean_top1", "clean_top5", "psnr", "ssim", "n_probes", "n_mm_probes"}


def _people(counts: dict[str, int]) -> dict[str, list[Path]]:
    return {name: [Path(f"/lfw/{name}/{name}_{i:04d}.jpg") for i in range(1, n + 1)] for name, n in counts.items()}


PEOPLE = _people({"ann": 15, "bob": 12, "cid": 11, "dan": 30, "eve": 2, "fay": 13})


def test_split_rules():
    split = P.make_split(PEOPLE, seed=0)
    assert {p.name for p in split.people} == {"ann", "bob", "dan", "fay"}  # >= 12 images
    assert split.eligible_identities == 4
    for person in split.people:
        assert len(person.train) == 10 and len(person.test) == len(PEOPLE[person.name]) - 10
        assert not set(person.train) & set(person.test)
        assert set(person.train) | set(person.test) == set(PEOPLE[person.name])
    assert len(split.distractors) == split.available_distractors == sum(len(v) for v in PEOPLE.values())
    assert not split.counts()["distractors_capped"]


def test_split_seeded_and_limit_is_a_prefix():
    a, b, c = P.make_split(PEOPLE, seed=1), P.make_split(PEOPLE, seed=1), P.make_split(PEOPLE, seed=2)
    assert a == b
    assert [p.train for p in a.people] != [p.train for p in c.people] or [p.name for p in a.people] != [
        p.name for p in c.people]
    limited = P.make_split(PEOPLE, seed=1, limit=2, distractors=20)
    assert limited.people == a.people[:2]  # the first persons do not depend on --limit or the distractor cap
    assert len(limited.distractors) == 20 and limited.counts()["distractors_capped"]
    assert set(limited.distractors) <= set(a.distractors)
    assert limited.distractors == P.make_split(PEOPLE, seed=1, limit=2, distractors=20).distractors


def test_split_test_image_cap_keeps_persons_and_training_images():
    full, capped = P.make_split(PEOPLE, seed=1), P.make_split(PEOPLE, seed=1, test_images=2)
    assert [p.name for p in capped.people] == [p.name for p in full.people]
    for a, b in zip(full.people, capped.people, strict=True):
        assert a.train == b.train and len(b.test) == 2 and set(b.test) <= set(a.test)
    assert capped == P.make_split(PEOPLE, seed=1, test_images=2)
    assert capped.counts()["test_images_per_person"] == 2 and full.counts()["test_images_per_person"] == "all"
    assert capped.counts()["test_images"] == 2 * len(capped.people)
    with pytest.raises(FaceveilError, match="test_images"):
        P.make_split(PEOPLE, test_images=1)


def test_transfer_suffix_sets_momentum_and_dfanet_dropout():
    base = P.Settings(attack=AttackConfig(eps=8 / 255, momentum=0.0, dropout=0.0), progress=False)
    plain, combined = P.registry_method("opom-convex", 1, base), P.registry_method("opom-convex+md", 1, base)
    assert plain.settings.method == "opom-convex" and plain.settings.attack == base.attack
    assert combined.settings.method == "opom-convex+md"
    assert combined.settings.attack.momentum == 1.0 and combined.settings.attack.dropout == 0.0
    # each surrogate drops at its own calibrated rate (one rate for all leaves some recognising nobody)
    assert dict(combined.settings.attack.model_dropout) == CALIBRATED_DROPOUT
    assert combined.settings.attack.eps == base.attack.eps and not combined.settings.universal
    assert P.registry_method("fi-uap-all+md", 1, base).settings.universal
    with pytest.raises(FaceveilError, match="unknown method .nonsense."):
        P.registry_method("nonsense+md", 1, base)


def test_split_rejects_bad_settings():
    with pytest.raises(FaceveilError, match="min_images"):
        P.make_split(PEOPLE, min_images=11, train_images=10)
    with pytest.raises(FaceveilError, match="no identity"):
        P.make_split(PEOPLE, min_images=40)
    with pytest.raises(FaceveilError, match="distractors"):
        P.make_split(PEOPLE, distractors=0)


def test_own_ranks_hand_case():
    """1-D embeddings, L2 metric (score = -distance). Gallery (clean) at 0, 1.5, 20; probes (masked) at 1, 5, 30;
    distractors at 2, 6, 7, 8, 9, 10, 26. Probe 1 vs gallery 0: distance 5 ties with the distractor at 10, which
    therefore does not outrank the person."""
    gallery = torch.tensor([[0.0], [1.5], [20.0]])
    probes = torch.tensor([[1.0], [5.0], [30.0]])
    distractors = torch.tensor([[2.0], [6.0], [7.0], [8.0], [9.0], [10.0], [26.0]])
    ranks = P.own_ranks("l2", probes, gallery, P.sorted_scores("l2", probes, distractors))
    assert ranks.tolist() == [[0, 1, 7], [6, 0, 7], [8, 8, 0]]
    tally = P.Tally()
    tally.add(ranks)
    assert (tally.tests, tally.top1, tally.top5) == (6, 5, 5)


def test_tally_top1_top5():
    tally = P.Tally()
    tally.add(torch.tensor([[0, 1, 3], [6, 0, 2], [5, 8, 0]]))
    assert (tally.tests, tally.top1, tally.top5) == (6, 5, 2)  # rank 5 is still in the top 5
    assert tally.rates() == (5 / 6, 2 / 6)


def test_mm_pairs():
    assert P.mm_pairs(1) == [(0, 0)]  # Table 6: the same mask for n_M = 1
    pairs = P.mm_pairs(3)
    assert len(pairs) == 6 and len(set(pairs)) == 6 and all(g != p for g, p in pairs)


def _synthetic(seed: int, n_masks: int):
    """Two persons, distractors of other identities AND of the persons themselves (which must be left out)."""
    gen = torch.Generator().manual_seed(seed)
    people = [P.Person("ann", (), tuple(Path(f"ann{i}") for i in range(4))),
              P.Person("bob", (), tuple(Path(f"bob{i}") for i in range(3)))]
    distractors = [(n, Path(f"{n}-d{i}")) for i, n in enumerate(["x", "ann", "y", "bob", "x", "z", "y", "x"])]
    split = P.Split(people, distractors, 2, len(distractors))
    files = [f for p in people for f in p.test] + [f for _, f in distractors]
    table = P.EmbeddingTable(files, {"mfn192": torch.randn(len(files), 5, generator=gen)})
    masked = [[torch.randn(len(p.test), 5, generator=gen) for _ in range(n_masks)] for p in people]
    return split, table, masked


def _brute_force(split, table, probes, gallery_of) -> P.Tally:
    """The protocol by its definition, one test at a time."""
    tally = P.Tally()
    for k, person in enumerate(split.people):
        others = [table.of("mfn192", [f])[0] for n, f in split.distractors if n != person.name]
        probe_emb, gallery_emb = probes[k], gallery_of(k)
        for j in range(len(person.test)):
            for i in range(len(person.test)):
                if i == j:
                    continue
                own = float(torch.cosine_similarity(probe_emb[j], gallery_emb[i], dim=0))
                above = sum(float(torch.cosine_similarity(probe_emb[j], d, dim=0)) > own for d in others)
                tally.add(torch.tensor([[0, 1 + above]]))
    return tally


@pytest.mark.parametrize("n_masks", [1, 3])
def test_score_judge_matches_brute_force(n_masks):
    split, table, masked = _synthetic(seed=n_masks, n_masks=n_masks)
    row = P.score_judge("mfn192", split, table, masked)
    clean = [table.of("mfn192", p.test) for p in split.people]
    expected_clean = _brute_force(split, table, clean, lambda k: clean[k]).rates()
    assert row["clean_top1"] == pytest.approx(1 - expected_clean[0])
    assert row["clean_top5"] == pytest.approx(1 - expected_clean[1])
    mo = np.array([_brute_force(split, table, [m[p] for m in masked], lambda k: clean[k]).rates()
                   for p in range(n_masks)])
    assert row["top1_psr"] == pytest.approx(mo[:, 0].mean()) and row["top5_psr"] == pytest.approx(mo[:, 1].mean())
    mm = np.array([_brute_force(split, table, [m[p] for m in masked], lambda k, g=g: masked[k][g]).rates()
                   for g, p in P.mm_pairs(n_masks)])
    assert row["mm_top1_psr"] == pytest.approx(mm[:, 0].mean())
    assert row["mm_top5_psr"] == pytest.approx(mm[:, 1].mean())
    assert row["n_probes"] == row["n_mm_probes"] == 4 * 3 + 3 * 2
    assert ("top1_psr_std" in row) == (n_masks > 1)


def test_score_judge_hand_case():
    """Clean faces sit on their person's axis, distractors elsewhere: recognised at rank 1 (clean_top1 = 1), even
    though a distractor labelled with the person's own name sits right on it (left out). Mask 0 moves the probes onto
    the distractors' axis (protected at Top-1 and Top-5: 6 distractors there), mask 1 changes nothing."""
    e = torch.eye(4)
    people = [P.Person("ann", (), tuple(Path(f"ann{i}") for i in range(3)))]
    distractors = [("x", Path(f"x{i}")) for i in range(6)] + [("ann", Path("ann-other"))]
    split = P.Split(people, distractors, 1, len(distractors))
    test = torch.stack([e[0] + 0.01 * i * e[1] for i in range(3)])
    others = torch.stack([e[2] + 0.01 * i * e[3] for i in range(6)] + [e[0]])
    table = P.EmbeddingTable([*people[0].test, *(f for _, f in distractors)], {"mfn192": torch.cat([test, others])})
    masked = [[torch.stack([e[2] + 0.001 * i * e[3] for i in range(3)]), test.clone()]]
    row = P.score_judge("mfn192", split, table, masked)
    assert row["clean_top1"] == 1 and row["clean_top5"] == 1
    assert row["top1_psr"] == pytest.approx(0.5) and row["top5_psr"] == pytest.approx(0.5)  # mask 0: 1, mask 1: 0
    assert row["top1_psr_std"] == pytest.approx(0.5)


# ---- end to end ------------------------------------------------------------------------------------------------

def _random_masks(batch, ensemble, cfg: AttackConfig, options=None, progress=False) -> MaskResult:
    """A stand-in learner: two seeded uniform masks within the budget (no optimisation)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return MaskResult((torch.rand(2, 3, 256, 256, generator=gen) * 2 - 1) * cfg.eps, {})


@needs_lfw
@needs_weights
@pytest.mark.parametrize("mode", ["crops", "photos"])
@pytest.mark.slow
def test_tiny_run_with_a_stand_in_learner(mode):
    from faceveil.datasets.lfw import identities

    split = P.make_split(identities(LFW_ROOT), seed=3, limit=1, distractors=40)
    assert split.people[0].name == "Gordon_Brown" and len(split.people[0].test) == 3
    settings = P.Settings(method="random", mode=mode, attack=AttackConfig(eps=8 / 255), progress=False)
    rows, meta = P.run(split, ["mfn192"], ["mobileface"], _random_masks, settings)
    (row,) = rows
    assert ROW_KEYS <= set(row) and row["masks"] == 2 and row["mode"] == mode and not row["white_box"]
    assert row["n_probes"] == 6 and row["n_mm_probes"] == 6
    assert all(0 <= row[k] <= 1 for k in ("top1_psr", "top5_psr", "mm_top1_psr", "clean_top1", "ssim"))
    assert row["clean_top1"] == 1  # the paper's premise: the clean test faces are recognised
    assert 30 < row["psnr"] < 60
    assert meta["distractor_images"] == 40 and meta["test_images"] == 3
    assert meta["redetect_failures"] == {"mobileface": 0}


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_several_methods_share_one_clean_pass(monkeypatch):
    """Two methods in one run: the clean faces are embedded once, one row per (method, judge), each method with its
    own configuration ("+md": momentum 1, DFANet dropout), and the single-method run gives the same row."""
    from faceveil.datasets.lfw import identities

    seen: dict[str, AttackConfig] = {}

    def recording(name):
        def learner(batch, ensemble, cfg, options, progress=False):
            seen[name] = cfg
            return MaskResult(_random_masks(batch, ensemble, cfg).masks[:1], {})
        return learner

    embeds = []
    original = P.embed_files
    monkeypatch.setattr(P, "embed_files", lambda *a, **k: embeds.append(1) or original(*a, **k))
    split = P.make_split(identities(LFW_ROOT), seed=3, limit=1, distractors=30, test_images=3)
    base = P.Settings(attack=AttackConfig(eps=8 / 255), progress=False)
    methods = [P.MethodRun(recording(n), P.registry_method(n, 1, base).settings) for n in ("fi-uap", "fi-uap+md")]
    rows, meta = P.run_methods(split, ["mfn192"], ["mobileface"], methods)
    assert len(embeds) == 1
    assert [(r["method"], r["judge"]) for r in rows] == [("fi-uap", "mfn192"), ("fi-uap+md", "mfn192")]
    assert seen["fi-uap"].momentum == 0 and seen["fi-uap+md"].momentum == 1
    assert dict(seen["fi-uap+md"].model_dropout) == CALIBRATED_DROPOUT
    assert set(meta["learn_seconds"]) == {"fi-uap", "fi-uap+md"} and meta["test_images_per_person"] == 3
    single, single_meta = P.run(split, ["mfn192"], ["mobileface"], methods[0].learner, methods[0].settings)
    assert single == rows[:1] and set(single_meta["learn_seconds"]) == {"mobileface"}
    with pytest.raises(FaceveilError, match="twice"):
        P.run_methods(split, ["mfn192"], ["mobileface"], [methods[0], methods[0]])


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_universal_method_learns_once_on_everybody():
    """FI-UAP-all: one mask per surrogate set, learned on all protected persons' training images."""
    from faceveil.datasets.lfw import identities

    calls = []

    def learner(batch, ensemble, cfg, options, progress=False):
        calls.append(len(batch))
        return MaskResult(_random_masks(batch, ensemble, cfg).masks[:1], {})

    split = P.make_split(identities(LFW_ROOT), seed=1, limit=2, distractors=10)
    settings = P.Settings(method="universal", attack=AttackConfig(eps=8 / 255), progress=False, universal=True)
    rows, _ = P.run(split, ["mfn192"], ["mobileface"], learner, settings)
    assert calls == [20] and rows[0]["masks"] == 1


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_cli_tiny_run(tmp_path):
    from faceveil.cli import main

    out, report = tmp_path / "opom.json", tmp_path / "opom.html"
    code = main(["eval", "identification", "--protocol", "opom", "--dataset", f"lfw={LFW_ROOT}", "--limit", "1",
                 "--seed", "3", "--judges", "mfn192", "--surrogates", "mobileface", "--iters", "2",
                 "--distractors", "40", "--quiet", "--json", str(out), "--report", str(report)])
    assert code == 0
    doc = json.loads(out.read_text())
    settings = doc["settings"]
    assert settings["protocol"] == "opom" and settings["method"] == "opom-convex"
    assert settings["test_images_per_person"] == 5 and "transfer_suffix" not in settings
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html.lower() and "mfn192" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert settings["eps"] == 8 and settings["iters"] == 2 and settings["momentum"] == 0
    assert settings["distractors"] == 40 and settings["distractors_capped"] and settings["protected_identities"] == 1
    (row,) = doc["rows"]
    assert ROW_KEYS <= set(row) and row["judge"] == "mfn192" and row["surrogates"] == ["mobileface"]
    assert row["n_probes"] == 6 and 0 <= row["top1_psr"] <= 1


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_cli_users_mode_runs_enroll_and_apply(tmp_path, monkeypatch):
    """Users mode: the person enrolled, the mask file written and read back, apply run on the test photos (JPEG),
    every labelled face masked and scored on the re-read file; the budget is enroll's (the method's paper norm)."""
    from faceveil.cli import main
    from faceveil.pipeline import maskfile

    loaded = []
    original = maskfile.load_mask
    monkeypatch.setattr(maskfile, "load_mask", lambda path: loaded.append(path) or original(path))
    out = tmp_path / "users.json"
    code = main(["eval", "identification", "--protocol", "opom", "--mode", "users", "--dataset", f"lfw={LFW_ROOT}",
                 "--limit", "1", "--seed", "3", "--judges", "mfn192", "--surrogates", "mobileface", "--iters", "1",
                 "--test-images", "3", "--distractors", "20", "--quiet", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    settings = doc["settings"]
    assert settings["mode"] == "users" and settings["norm"] == "linf" and settings["eps"] == 8
    assert len(loaded) == 1 and loaded[0].suffix == ".fvmask"
    assert settings["users_applied"] == {"mobileface": {"test_photos": 3, "written": 3, "person_masked": 3,
                                                         "other_faces_masked": 0}}
    (row,) = doc["rows"]
    assert row["mode"] == "users" and row["n_probes"] == 6 and 0 <= row["top1_psr"] <= 1
    assert 0.7 < row["ssim"] < 0.999 and 25 < row["psnr"] < 50  # the mask is on the saved faces


@pytest.mark.parametrize("flags", [["--distractors", "many"], ["--extra", "5"], ["--gamma", "0.5"],
                                   ["--test-images", "1"], ["--test-images", "few"], ["--method", "fi-uap,,gap"],
                                   ["--method", "fi-uap,bogus+md"], ["--norm", "l2"],
                                   ["--mode", "users", "--method", "fi-uap-all"]])
def test_cli_rejects_bad_opom_flags(capsys, flags):
    from faceveil.cli import main

    root = LFW_ROOT or "/nonexistent"
    assert main(["eval", "identification", "--protocol", "opom", "--dataset", f"lfw={root}", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faceveil: error:")
