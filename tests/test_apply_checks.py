"""apply's check of the saved photo, without models: the masked faces' checks merged into apply's face rows in
protect's row shape, the verdict counts, and the line that says when a mask protects nothing."""

from __future__ import annotations

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
