"""`faceveil eval goal` (faceveil.evaluate.goal): every judge faces only surrogates outside its family, the recipes
resolve to attack configs with their levers, bad input is one line, and a tiny LFW run gives one summary row per
recipe with per-judge black-box rates (slow)."""

from __future__ import annotations

import json

import pytest
from conftest import LFW_ROOT, needs_lfw, needs_weights

from faceveil.cli.main import main
from faceveil.errors import FaceveilError
from faceveil.evaluate.goal import recipe
from faceveil.evaluate.protocols.tip_im import surrogate_groups
from faceveil.models import zoo
from faceveil.pipeline.presets import EVERY_FAMILY, RECIPES


def test_every_judge_faces_only_other_families():
    judges = list(zoo.SPECS)
    groups = surrogate_groups(judges, None, zoo.parse_models(EVERY_FAMILY))
    assert sorted(j for js in groups.values() for j in js) == sorted(judges)
    assert len(groups) == len({zoo.spec(j).family for j in judges})
    for surrogates, group_judges in groups.items():
        families = {zoo.spec(m).family for m in surrogates}
        assert all(zoo.spec(j).family not in families for j in group_judges)
    # the previous default: mobileface + mfn512; its own judges face the other one
    previous = surrogate_groups(["mobileface", "mfn512", "dlib"], None, ["mobileface", "mfn512"])
    assert previous == {("mfn512",): ["mobileface"], ("mobileface",): ["mfn512"], ("mobileface", "mfn512"): ["dlib"]}
    assert surrogate_groups(["faceres-deep"], None, ["faceres"]) == {}


def test_recipes_resolve_to_their_levers():
    for name in RECIPES:
        cfg = recipe(name).attack(seed=3)
        assert cfg.seed == 3 and cfg.steps == recipe(name).iters
    hinge = recipe("texture-hinge").attack()
    assert hinge.budget == "texture" and hinge.ssim_penalty and hinge.ssim_target == 0.93 and hinge.psnr_floor == 33
    assert dict(recipe("texture-hinge-dropout").attack().model_dropout)["dlib"] == 0.15
    previous = recipe("previous").attack()
    assert previous.eps == 8 / 255 and previous.alpha == 1 / 255 and previous.ssim_target == 0
    with pytest.raises(FaceveilError, match="unknown recipe"):
        recipe("nope")


def test_bad_input_is_one_line(capsys):
    assert main(["eval", "goal", "--dataset", "lfw=/nonexistent", "--presets", "nope", "--quiet"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert main(["eval", "goal", "--dataset", "nope=/x", "--quiet"]) == 2


@pytest.mark.slow
@needs_lfw
@needs_weights
def test_tiny_goal_run(tmp_path):
    out = tmp_path / "goal.json"
    assert main(["eval", "goal", "--dataset", f"lfw={LFW_ROOT}", "--probes", "2", "--extra", "3", "--presets",
                 "previous", "--judges", "mobileface,mfn512,dlib", "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["recipe"] == "previous" and 0 <= row["mean_rank1_ut"] <= 1 and row["runs"] == 3
    assert {k for k in row if k.startswith("r1ut_")} == {"r1ut_mobileface", "r1ut_mfn512", "r1ut_dlib"}
    assert all(not r["white_box"] for r in doc["settings"]["judge_rows"])
    assert doc["settings"]["save_as"] == "jpg"
