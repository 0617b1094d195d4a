"""apply's check of the saved photo, without models: the masked faces' checks merged into apply's face rows in
protect's row shape, the verdict counts, and the line that says when a mask protects nothing."""

from __future__ import annotations

import pytest

from faceveil.cli.person import verdict_line
from faceveil.pipeline.person import verdict, with_checks
from faceveil.pipeline.results import FaceCheck, JudgeScore


def _check(face: int, matches: dict[str, bool], redetected: bool = True) -> FaceCheck:
    judges = {name: JudgeScore(0.5 if hit else 0.1, hit) for name, hit in matches.items()} if redetected else {}
    return FaceCheck(face, [0.0, 0.0, 10.0, 10.0], redetected, judges)


def test_checks_merge_into_the_masked_rows_only() -> None:
    rows = [{"face": 0, "box": [1, 1, 9, 9], "masked": True, "scores": {"mobileface": 0.7}},
            {"face": 1, "box": [20, 1, 29, 9], "masked": False, "scores": {"mobileface": 0.0}}]
    merged = with_checks(rows, [_check(0, {"mobileface": True, "dlib": False})])
    assert merged[0]["redetected"] is True and merged[0]["box"] == [1, 1, 9, 9]
    assert merged[0]["mobileface"] == {"score": 0.5, "matches": True} and merged[0]["dlib"]["matches"] is False
    assert merged[0]["scores"] == {"mobileface": 0.7}  # the matcher's own scores stay
    assert set(merged[1]) == {"face", "box", "masked", "scores"}


def test_verdict_counts_and_the_nothing_protected_line() -> None:
    checks = [_check(0, {"a": True, "b": True}), _check(1, {"a": True, "b": False}),
              _check(2, {"a": False, "b": False}), _check(3, {}, redetected=False)]
    counts = verdict(checks)
    assert counts == {"masked": 4, "protected": 1, "recognised_by_some": 1, "recognised_by_all": 1,
                      "not_redetected": 1}
    assert "protects none" not in verdict_line(counts, 2)
    nothing = verdict([_check(0, {"a": True, "b": True}), _check(1, {"a": True, "b": True})])
    line = verdict_line(nothing, 2)
    assert "still recognised by all: 2" in line and "protects none of these faces" in line


def test_a_texture_or_visibility_mask_records_the_budget_it_reaches(tmp_path) -> None:
    """A texture-shaped L-inf mask passes its mean eps in textured places: the file records the bound it reaches,
    so that the mask loads (load_mask refuses a mask above its file's budget); a plain L-inf mask keeps its eps."""
    import torch

    from faceveil.attacks.core import AttackConfig
    from faceveil.pipeline.maskfile import PersonMask, load_mask, save_mask
    from faceveil.pipeline.person import recorded_budget, within_enroll_cap

    masks = torch.full((1, 3, 256, 256), 4 / 255)
    masks[..., 100:120, :] = 20 / 255  # a brow band at 2.5 x the mean budget: above the largest file budget (16)
    masks = within_enroll_cap(masks, "linf")
    assert float(masks.max()) == pytest.approx(16 / 255) and float(masks.min()) == pytest.approx(4 / 255)
    plain, texture = AttackConfig(eps=8 / 255), AttackConfig(eps=8 / 255, budget="texture")
    assert recorded_budget(masks.clamp(max=8 / 255), plain) == 8 / 255
    assert recorded_budget(masks, texture) == float(masks.max())
    assert recorded_budget(masks / 4, AttackConfig(eps=8 / 255, ssim_target=0.93)) == 8 / 255
    refs = {"mobileface": torch.randn(2, 256, generator=torch.Generator().manual_seed(0))}
    mask = PersonMask(name="Ada", masks=masks, geometry="canonical", method="opom-convex", surrogates=["mobileface"],
                      eps=recorded_budget(masks, texture), norm="linf", references=refs,
                      meta={"iterations": 1, "seed": 0, "images_used": 2, "created": "2024-01-01T00:00:00+00:00"})
    save_mask(mask, tmp_path / "ada.fvmask")
    assert torch.equal(load_mask(tmp_path / "ada.fvmask").masks, masks)
