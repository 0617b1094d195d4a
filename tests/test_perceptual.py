"""The perceptual budget of the attack core (attacks.perceptual) and per-surrogate DFANet dropout, without models:
the differentiable SSIM equals the evaluation's, the texture map grows the budget where the face is textured (per
face, and per shared mask from its faces), the SSIM projection keeps masks at the target and `onto` puts them on it,
and calibrated dropout resolves per surrogate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from faceveil.attacks.core import (
    CALIBRATED_DROPOUT,
    AttackConfig,
    budget_map_of,
    calibrated_dropout,
    dropout_setting,
    feature_dropout,
    momentum_step,
)
from faceveil.attacks.faces import from_photos
from faceveil.attacks.perceptual import SsimBudget, face_area, ssim, texture_budget
from faceveil.detect.align import ARCFACE_112
from faceveil.errors import FaceveilError
from faceveil.evaluate.quality import ssim as evaluation_ssim
from faceveil.models import zoo


def _photo(seed: int, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A flat grey face with a textured band across the eyes (rows 60-100), and face-like landmarks."""
    gen = np.random.default_rng(seed)
    image = np.full((size, size, 3), 128.0)
    image[60:100] += gen.normal(0, 40, (40, size, 3))
    marks = (np.asarray(ARCFACE_112) - 56) * 1.2 + size / 2
    return np.clip(image, 0, 255).astype(np.uint8), marks


def _batch(mode: str, count: int = 2):
    photos = [_photo(seed) for seed in range(count)]
    return from_photos([p for p, _ in photos], [m for _, m in photos], [], mode)


def test_ssim_equals_the_evaluations() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 40, generator=gen)
    y = (x + torch.randn(2, 3, 40, 40, generator=gen) * 0.05).clamp(0, 1)
    ours = ssim(x.double(), y.double())
    for i in range(2):
        assert float(ours[i]) == pytest.approx(evaluation_ssim(x[i], y[i]), abs=1e-9)


def test_texture_map_grows_where_the_face_is_textured() -> None:
    batch = _batch("crops")
    faces = batch.canonical(batch.regions)
    per_face = texture_budget(faces)
    assert per_face.shape == faces.shape
    assert face_area(per_face.double()).flatten(1).mean(1).tolist() == pytest.approx([1.0, 1.0], abs=0.05)
    rows = per_face[0, 0].mean(1)
    assert float(rows.max()) > 2 * float(rows[120:140].mean())  # the eye band gets more than flat skin
    shared = texture_budget(faces, owner=torch.tensor([0, 0]))
    assert shared.shape == (1, *faces.shape[1:])
    cfg = AttackConfig(budget="texture", eps=8 / 255, alpha=1 / 255)
    assert budget_map_of(batch, cfg, torch.tensor([0, 0])).shape == shared.shape
    with pytest.raises(ValueError, match="L-inf"):
        budget_map_of(batch, AttackConfig(budget="texture", norm="l2"))
    # a step under the map: each pixel within eps times its budget
    delta, _ = momentum_step(torch.zeros_like(shared), None, torch.randn_like(shared), cfg, shared)
    assert bool((delta.abs() <= cfg.alpha * shared + 1e-9).all()) and float(delta.abs().max()) > cfg.alpha


@pytest.mark.parametrize("mode", ["crops", "photos"])
def test_ssim_projection_and_onto(mode: str) -> None:
    batch = _batch(mode, count=3)
    owner = torch.tensor([0, 0, 0])
    budget = SsimBudget(batch, 0.93, owner=owner)
    loud = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 24 / 255
    assert float(budget.measure(loud)[0][0]) < 0.93
    kept = budget(loud)
    assert 0.93 <= float(budget.measure(kept)[0][0]) < 0.95
    quiet = loud / 8
    onto = budget.onto(quiet)
    assert 0.925 <= float(budget.measure(onto)[0][0]) <= 0.94  # scaled up onto the budget
    floor = SsimBudget(batch, 0.0, psnr_floor=40.0, owner=owner)
    assert float(floor.measure(floor(loud))[1][0]) >= 40.0 - 0.1


def test_dropout_settings_and_calibrated_rates() -> None:
    assert set(CALIBRATED_DROPOUT) == set(zoo.SPECS)  # every model of the zoo calibrated
    assert dropout_setting("calibrated") == (0.0, calibrated_dropout())
    assert dropout_setting("0.1") == (0.1, ()) and dropout_setting(0) == (0.0, ())
    for bad in ("1", "-0.1", "lots"):
        with pytest.raises(FaceveilError, match="dropout"):
            dropout_setting(bad)


def test_one_rate_per_surrogate_matches_the_shared_hook() -> None:
    """surrogate_dropout with one rate for all draws the same masks as feature_dropout over all the models."""
    from faceveil.attacks.core import surrogate_dropout

    class Fake:
        def __init__(self, models):
            self.models = models

    torch.manual_seed(0)
    models = {"a": nn.Conv2d(3, 4, 3), "b": nn.Conv2d(3, 4, 3)}
    x = torch.rand(1, 3, 8, 8)
    with feature_dropout(list(models.values()), 0.3, torch.Generator().manual_seed(5)):
        shared = [m(x) for m in models.values()]
    cfg = AttackConfig(dropout=0.3)
    with surrogate_dropout(Fake(models), cfg, torch.Generator().manual_seed(5)):  # type: ignore[arg-type]
        each = [m(x) for m in models.values()]
    assert all(torch.equal(a, b) for a, b in zip(shared, each, strict=True))
    cfg = AttackConfig(dropout=0.3, model_dropout=(("a", 0.0),))
    with surrogate_dropout(Fake(models), cfg, torch.Generator().manual_seed(5)):  # type: ignore[arg-type]
        assert torch.equal(models["a"](x), nn.functional.conv2d(x, models["a"].weight, models["a"].bias))
        assert not torch.equal(models["b"](x), nn.functional.conv2d(x, models["b"].weight, models["b"].bias))
