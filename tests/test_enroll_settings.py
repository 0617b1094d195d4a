"""enroll's settings without models: the levers a user leaves unset come from ENROLL_DEFAULTS, a texture budget
only under L-inf (AdvCloak's L2 default keeps its plain budget), and a value given always wins."""

from __future__ import annotations

import pytest

from faceveil.errors import FaceveilError
from faceveil.pipeline.person import enroll_settings
from faceveil.pipeline.presets import ENROLL_DEFAULTS


def test_unset_levers_are_enrolls_defaults() -> None:
    attack = enroll_settings(name="a").attack
    assert attack.norm == "linf" and attack.steps == ENROLL_DEFAULTS["iters"]
    assert attack.momentum == ENROLL_DEFAULTS["momentum"] and attack.budget == ENROLL_DEFAULTS["budget"]
    assert attack.ssim_target == ENROLL_DEFAULTS["ssim"] and attack.psnr_floor == ENROLL_DEFAULTS["psnr"]
    l2 = enroll_settings(name="a", method="advcloak-convex").attack
    assert l2.norm == "l2" and l2.budget == "linf"  # the texture map shapes an L-inf budget only


def test_given_values_win() -> None:
    attack = enroll_settings(name="a", momentum=0.5, dropout="calibrated", budget="texture", ssim=0.95, psnr=30,
                             iters=4).attack
    assert (attack.momentum, attack.budget, attack.ssim_target, attack.psnr_floor) == (0.5, "texture", 0.95, 30)
    assert attack.dropout == 0 and dict(attack.model_dropout)["mobileface"] > 0
    plain = enroll_settings(name="a", momentum=0, dropout=0, budget="linf", ssim=0, psnr=0).attack
    assert (plain.momentum, plain.dropout, plain.model_dropout, plain.budget, plain.ssim_target) == (
        0, 0, (), "linf", 0)
    with pytest.raises(FaceveilError, match="texture shapes an L-inf budget"):
        enroll_settings(name="a", norm="l2", budget="texture")


def test_enroll_strengths():
    """high: the texture budget of mean L-inf 16, 40 iterations, momentum 1; explicit values win over it; it is an
    L-inf budget, so an L2 method takes it only with its own eps; an unknown strength is one line."""
    from faceveil.pipeline.person import user_budget

    high = enroll_settings(name="a", strength="high").attack
    assert (high.steps, high.momentum, high.budget) == (40, 1.0, "texture")
    assert user_budget(high)[0] == pytest.approx(16.0)
    assert enroll_settings(name="a", strength="high", iters=20, budget="linf").attack.steps == 20
    assert enroll_settings(name="a", strength="mid").attack.steps == ENROLL_DEFAULTS["iters"]
    with pytest.raises(FaceveilError, match="L-inf budget"):
        enroll_settings(name="a", method="advcloak-convex", strength="high")
    assert enroll_settings(name="a", method="advcloak-convex", strength="high", eps=1500).attack.norm == "l2"
    with pytest.raises(FaceveilError, match="strength takes mid, high"):
        enroll_settings(name="a", strength="max")
