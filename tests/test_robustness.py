"""Robustness evaluation: the transform registry is seeded and shape-preserving; retained / gain on hand-made
rates; the plumbing of a whole run with a stand-in protocol; the adaptive linear probe undoes a synthetic linear
distortion without ever training on a test identity; a tiny `eval robustness` run on LFW writes its JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LFW_ROOT, needs_lfw, needs_weights

from faceveil.errors import FaceveilError
from faceveil.evaluate import adaptive, robustness, transforms
from faceveil.evaluate.protocols import require_protocol
from faceveil.evaluate.robustness import ADAPTIVE, NONE, PLAIN, Measured, ProbeImages, Scenario


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(*size, 3)  # smooth content plus noise
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(transforms.TRANSFORMS))
def test_transform_deterministic_shape_dtype(name):
    image = _image()
    a, b = transforms.apply(name, image, seed=7), transforms.apply(name, image, seed=7)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    marks = np.array([[10.0, 12], [30, 12], [20, 22], [12, 32], [28, 32]])
    moved = transforms.landmarks_after(name, marks, seed=7)
    assert np.array_equal(moved, transforms.landmarks_after(name, marks, seed=7)) and moved.shape == (5, 2)
    if transforms.TRANSFORMS[name].landmark_jitter:
        shift = np.linalg.norm(moved - marks, axis=1)
        assert np.allclose(shift, transforms.TRANSFORMS[name].landmark_jitter)
    else:
        assert np.array_equal(moved, marks)


def test_registry_covers_the_brief_and_random_ones_use_the_seed():
    assert {"jpeg95", "jpeg75", "jpeg50", "resize0.75", "resize0.5", "blur0.5", "blur1", "bits5", "median3",
            "cropPad", "realign"} <= set(transforms.TRANSFORMS)
    image = _image(1, (120, 100))
    crops = {transforms.apply("cropPad", image, seed=s).tobytes() for s in range(6)}
    assert len(crops) > 1
    assert transforms.item_seed(3, 0) == transforms.item_seed(3, 0) != transforms.item_seed(3, 1)
    assert transforms.parse_names("all") == list(transforms.TRANSFORMS)
    assert transforms.parse_names("jpeg75, blur1") == ["jpeg75", "blur1"]
    with pytest.raises(FaceveilError):
        transforms.parse_names("jpeg75,sharpen")


def test_retained_and_gain_hand_made():
    reference = Measured({"rank1_ut": 0.8}, {"rank1_ut": 0.1})
    after = Measured({"rank1_ut": 0.6}, {"rank1_ut": 0.3})
    row = robustness.make_row("rank1_ut", "dlib", ["mfn512", "mobileface"], "jpeg75", PLAIN, after, reference)
    assert row["judge_seen_by_surrogates"] == "black-box"
    assert row["rank1_ut"] == 0.6 and row["clean_rank1_ut"] == 0.3
    assert row["retained"] == pytest.approx(0.75)  # 0.6 / 0.8
    assert row["gain"] == pytest.approx(0.3)  # 0.6 - 0.3
    assert row["gain_retained"] == pytest.approx(0.3 / 0.7)
    white = robustness.make_row("rank1_ut", "mfn512", ["mfn512"], NONE, PLAIN, reference, reference)
    assert white["judge_seen_by_surrogates"] == "white-box" and white["retained"] == 1.0
    nothing = Measured({"rank1_ut": 0.0}, {"rank1_ut": 0.0})
    assert robustness.make_row("rank1_ut", "x", [], NONE, PLAIN, nothing, nothing)["retained"] is None


class _StandIn:
    """A protocol stand-in: 4-d 'embeddings' are channel means and a corner; protected = clean + a bright
    square; the rate is the fraction of probes whose embedding is far from its clean one."""

    protocol, metric, mode = "stand-in", "moved", "crops"

    def __init__(self) -> None:
        clean = [_image(i) for i in range(6)]
        protected = [np.clip(im.astype(int) + 60 * (np.indices(im.shape[:2]).sum(0) % 2)[..., None], 0, 255)
                     .astype(np.uint8) for im in clean]
        marks = [np.zeros((5, 2)) for _ in clean]
        self.clean_embeddings = _embed(clean)
        self.scenario = Scenario(["mobileface"], ["mobileface", "dlib"], ProbeImages(protected, marks),
                                 ProbeImages(clean, marks), [f"person{i // 2}" for i in range(6)])

    def scenarios(self):
        yield self.scenario

    def rates(self, scenario, judge, embeddings):
        moved = (embeddings - self.clean_embeddings).norm(dim=1) > 5
        return {"moved": float(moved.float().mean())}

    def meta(self):
        return {"stand_in": True}


def _embed(images):
    return torch.tensor([[*im.reshape(-1, 3).mean(0), float(im[0, 0].mean())] for im in images], dtype=torch.float32)


def test_run_plumbing_with_stand_in_protocol(monkeypatch):
    monkeypatch.setattr(robustness, "embed_images", lambda judge, images, marks: _embed(images))
    adapter = _StandIn()
    rows, meta = robustness.evaluate(adapter, robustness.Options(["blur1", "realign"], seed=0, adaptive=True,
                                                                 folds=3, progress=False))
    assert meta["stand_in"] and meta["metric"] == "moved" and list(meta["transforms"]) == ["blur1", "realign"]
    keys = [(r["judge"], r["transform"], r["attacker"]) for r in rows]
    assert keys == [(j, t, a) for j in ("mobileface", "dlib") for t, a in
                    ((NONE, PLAIN), ("blur1", PLAIN), ("realign", PLAIN), (NONE, ADAPTIVE))]
    by = {(r["judge"], r["transform"], r["attacker"]): r for r in rows}
    assert by[("mobileface", NONE, PLAIN)]["judge_seen_by_surrogates"] == "white-box"
    assert by[("dlib", NONE, PLAIN)]["judge_seen_by_surrogates"] == "black-box"
    assert by[("mobileface", NONE, PLAIN)]["moved"] == 1.0 and by[("mobileface", NONE, PLAIN)]["clean_moved"] == 0.0
    assert by[("mobileface", "realign", PLAIN)]["retained"] == 1.0  # no pixel change: same embeddings here
    adaptive_row = by[("mobileface", NONE, ADAPTIVE)]
    assert adaptive_row["adaptive_folds"] == 3 and adaptive_row["adaptive_train_pairs"] == [4, 4, 4]
    assert rows == robustness.evaluate(adapter, robustness.Options(["blur1", "realign"], 0, True, 3, False))[0]


class _Face:
    def __init__(self, landmarks):
        self.landmarks = np.asarray(landmarks, dtype=np.float32)


class _Detector:
    """Finds the faces it is given, or none once the image is dark (a face lost after a transform)."""

    def __init__(self, faces):
        self.faces, self.calls = faces, 0

    def detect_large(self, image):
        self.calls += 1
        return self.faces if image.mean() > 60 else []


def test_photos_mode_redetects_after_a_pixel_change_only():
    marks = np.array([[10.0, 12], [30, 12], [20, 22], [12, 32], [28, 32]])
    near, far = _Face(marks + 1.5), _Face(marks + 40)
    find = robustness.redetector(_Detector([far, near]))
    assert np.allclose(find(_image(), marks), marks + 1.5)  # the nearest face, within one eye distance
    assert robustness.redetector(_Detector([far]))(_image(), marks) is None
    detector = _Detector([near])
    probes = ProbeImages([_image(0), (_image(1) // 8).astype(np.uint8)], [marks, marks])
    moved, lost = robustness.transformed(probes, "blur1", seed=0, redetect=robustness.redetector(detector))
    assert lost == 1 and detector.calls == 2
    assert np.allclose(moved.landmarks[0], marks + 1.5) and np.array_equal(moved.landmarks[1], marks)
    again, lost = robustness.transformed(probes, "realign", seed=0, redetect=robustness.redetector(detector))
    assert lost == 0 and detector.calls == 2  # no pixel change: no detection, landmarks jittered instead
    assert not np.array_equal(again.landmarks[0], marks)


def _distorted(n: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, dim, generator=g, dtype=torch.float64)
    mix = torch.eye(dim, dtype=torch.float64) + 0.6 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
    shift = torch.randn(dim, generator=g, dtype=torch.float64)
    return clean, clean @ mix + shift


def test_adaptive_probe_recovers_linear_distortion():
    clean, protected = _distorted(300, 12, 0)
    groups = [f"id{i}" for i in range(200)]
    probe = adaptive.train(protected[:200], clean[:200], groups, "l2", seed=0)
    before = (protected[200:] - clean[200:]).norm(dim=1).mean()
    after = (probe(protected[200:]) - clean[200:]).norm(dim=1).mean()
    assert after < 0.05 * before
    assert probe.relative_lambda == min(adaptive.LAMBDA_GRID)  # exact linear data: the least shrinkage wins


@pytest.mark.slow
def test_adaptive_cross_fit_never_trains_on_a_test_identity():
    clean, protected = _distorted(60, 8, 1)
    identities = [f"id{i // 3}" for i in range(60)]  # 3 images each: folds must keep an identity together
    folds = adaptive.group_folds(identities, 5, seed=2)
    assert sorted(np.concatenate(folds).tolist()) == list(range(60))
    for held in folds:
        inside = {identities[i] for i in held}
        assert not inside & {identities[i] for i in np.setdiff1d(np.arange(60), held)}
    fit = adaptive.cross_fitted(protected, clean, identities, "cosine", folds=5, seed=2)
    cos_before = torch.nn.functional.cosine_similarity(protected, clean).mean()
    cos_after = torch.nn.functional.cosine_similarity(fit.mapped_protected.double(), clean).mean()
    assert fit.folds == 5 and cos_after > cos_before
    again = adaptive.cross_fitted(protected, clean, identities, "cosine", folds=5, seed=2)
    assert torch.equal(fit.mapped_protected, again.mapped_protected)
    with pytest.raises(FaceveilError):
        adaptive.cross_fitted(protected[:3], clean[:3], ["one"] * 3, "cosine")


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_tiny_cli_run_on_lfw(tmp_path):
    from faceveil.cli import main

    out = tmp_path / "robust.json"
    code = main(["eval", "robustness", "--protocol", "tip-im", "--dataset", f"lfw={LFW_ROOT}", "--method", "pgd",
                 "--limit", "2", "--extra", "5", "--iters", "2", "--judges", "mfn192", "--surrogates", "mobileface",
                 "--transforms", "jpeg75,realign", "--adaptive", "--quiet", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "eval robustness" and doc["settings"]["protected_identities"] == 2
    rows = [(r["judge"], r["transform"], r["attacker"]) for r in doc["rows"]]
    assert rows == [("mfn192", NONE, PLAIN), ("mfn192", "jpeg75", PLAIN), ("mfn192", "realign", PLAIN),
                    ("mfn192", NONE, ADAPTIVE)]
    for row in doc["rows"]:
        assert row["judge_seen_by_surrogates"] == "black-box"
        assert 0 <= row["rank1_ut"] <= 1 and 0 <= row["clean_rank1_ut"] <= 1


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_tiny_cli_run_opom_protocol(tmp_path):
    from faceveil.cli import main

    out, report = tmp_path / "robust-opom.json", tmp_path / "robust-opom.html"
    code = main(["eval", "robustness", "--protocol", "opom", "--dataset", f"lfw={LFW_ROOT}", "--method", "fi-uap",
                 "--limit", "1", "--distractors", "20", "--iters", "1", "--judges", "mobileface", "--surrogates",
                 "mobileface", "--transforms", "bits5", "--test-images", "2", "--quiet", "--json", str(out),
                 "--report", str(report)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["protocol"] == "opom" and doc["settings"]["metric"] == "top1_psr"
    assert doc["settings"]["test_images_per_person"] == 2
    html = report.read_text()  # the HTML report: self-contained (no scripts, nothing fetched), the transform shown
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html.lower() and "bits5" in html
    assert "http://" not in html and "https://" not in html and "url(" not in html
    assert [r["transform"] for r in doc["rows"]] == [NONE, "bits5"]
    assert all(r["judge_seen_by_surrogates"] == "white-box" and r["rates"]["tests"] > 0 for r in doc["rows"])


@needs_lfw
@needs_weights
@pytest.mark.slow
def test_tiny_cli_run_apf_protocol(tmp_path):
    from faceveil.cli import main
    from faceveil.methods.apf.networks import ApfServerModel, save_server_model

    torch.manual_seed(0)  # an untrained server model: the plumbing does not depend on training
    save_server_model(ApfServerModel(eps=8 / 255, meta={"server_models": ["mfn512"], "probe": "mobileface"}),
                      tmp_path / "server.pt")
    out = tmp_path / "robust-apf.json"
    code = main(["eval", "robustness", "--protocol", "apf", "--dataset", f"lfw={LFW_ROOT}", "--checkpoint",
                 str(tmp_path / "server.pt"), "--limit", "2", "--iters", "1", "--judges", "mobileface,mfn192",
                 "--transforms", "resize0.5", "--quiet", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["metric"] == "asr" and doc["settings"]["pairs"] == 2
    seen = {r["judge"]: r["judge_seen_by_surrogates"] for r in doc["rows"]}
    assert seen == {"mobileface": "white-box", "mfn192": "black-box"}  # the client's probe is a surrogate
    assert all(-1 <= r["asr"] <= 1 and 0 <= r["rates"]["recognised"] <= 1 for r in doc["rows"])


def test_bad_requests_are_one_line_errors(capsys):
    from faceveil.cli import main

    with pytest.raises(FaceveilError, match="unknown protocol"):
        require_protocol("lowkey")
    assert main(["eval", "robustness", "--protocol", "apf", "--surrogates", "mobileface", "--quiet"]) == 2
    assert main(["eval", "robustness", "--transforms", "jpeg75,sharpen", "--quiet"]) == 2
    assert main(["eval", "robustness", "--adaptive", "--adaptive-folds", "1", "--quiet"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("faceveil: error: ") for e in errors)


def test_strength_requests_are_checked_before_any_work(tmp_path, capsys):
    """`--strength` measures protect's recipe on the tip-im protocol only, and not mixed with the budget flags."""
    from faceveil.cli import main

    (tmp_path / "images").mkdir()
    lfw = f"lfw={tmp_path}"
    assert main(["eval", "robustness", "--dataset", lfw, "--protocol", "opom", "--strength", "mid", "--quiet"]) == 2
    assert main(["eval", "robustness", "--dataset", lfw, "--strength", "mid", "--eps", "4", "--quiet"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "tip-im protocol" in errors[0] and "drop --method, --eps" in errors[1]
