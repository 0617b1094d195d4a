"""Robustness transforms (deterministic, shape-keeping, doing what they say) and `faceveil verify` on a photo
against itself and against a protected copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import WRITTEN, needs_weights
from PIL import Image

from faceveil.cli import main
from faceveil.evaluate import transforms
from faceveil.evaluate.verify import CHECKED_TRANSFORMS
from faceveil.io import weights
from faceveil.models import zoo


def _texture(seed: int = 0) -> np.ndarray:
    """A smooth-plus-noisy test image (JPEG and blur visibly change it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(transforms.TRANSFORMS))
def test_transform_deterministic_and_same_shape(name: str):
    image = _texture()
    first, again = transforms.apply(name, image, seed=3), transforms.apply(name, image, seed=3)
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)


def test_transforms_change_the_image_as_expected():
    image = _texture()
    assert np.abs(transforms.apply("jpeg75", image).astype(int) - image).mean() > 1
    for name in ("resize0.5", "resize0.75", "blur1", "median3"):
        assert not np.array_equal(transforms.apply(name, image), image), name
    assert len(np.unique(transforms.apply("bits5", image))) <= 32
    assert not np.array_equal(transforms.apply("cropPad", image, 0), transforms.apply("cropPad", image, 1))
    np.testing.assert_array_equal(transforms.apply("realign", image), image)
    assert transforms.TRANSFORMS["realign"].landmark_jitter == 2.0


def test_perturb_landmarks_moves_each_point_by_the_distance():
    marks = np.array([[30.0, 40.0], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.0]])
    moved = transforms.perturb_landmarks(marks, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(moved - marks, axis=1), 2.0)
    np.testing.assert_array_equal(moved, transforms.perturb_landmarks(marks, 2.0, np.random.default_rng(0)))


def _small_sample(tmp: Path) -> Path:
    """sample3 downscaled: faster to detect and protect."""
    with Image.open(weights.sample_photos()[2]) as im:
        path = tmp / "in" / "people.jpg"
        path.parent.mkdir()
        im.convert("RGB").resize((640, 450)).save(path, quality=95)
    return path


def test_verify_unreadable_file_is_one_line_error(tmp_path: Path, capsys):
    assert main(["verify", str(tmp_path / "missing.jpg"), str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("faceveil: error: cannot read the original photo") and "\n" not in err


@needs_weights
def test_verify_no_face_in_original(tmp_path: Path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 90), (128, 128, 128)).save(blank)
    assert main(["verify", str(blank), str(blank)]) == 2
    assert "no face found in the original" in capsys.readouterr().err


@needs_weights
@pytest.mark.slow
def test_verify_photo_against_itself_and_a_protected_copy(tmp_path: Path, capsys):
    photo = _small_sample(tmp_path)
    out = tmp_path / "self.json"
    assert main(["verify", str(photo), str(photo), "--faces", "largest", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "verify" and "| model | transform |" in capsys.readouterr().out
    untouched = [r for r in doc["rows"] if r["transform"] == "none"]
    assert {r["model"] for r in untouched} == set(zoo.SPECS)
    for row in untouched:
        assert row["score"] == pytest.approx(0.0 if zoo.spec(row["model"]).metric == "l2" else 1.0, abs=1e-3)
        assert row["matches"] is True and row["rank"] == 1

    assert main(["protect", str(photo), "-o", str(tmp_path / "out"), "--iters", "3", "--surrogates", "mobileface",
                 "--faces", "largest", "--judges", "mobileface", "--quiet"]) in WRITTEN
    out = tmp_path / "protected.json"
    assert main(["verify", str(photo), str(tmp_path / "out" / photo.name), "--faces", "largest",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"original", "protected", "models", "gallery", "gallery_faces", "thresholds"} <= set(doc["settings"])
    assert len(doc["rows"]) == len(zoo.SPECS) * len(CHECKED_TRANSFORMS)
    for row in doc["rows"]:
        assert {"model", "transform", "face", "score", "matches", "rank", "gallery_size"} <= set(row)
        assert row["score"] is not None and 1 <= row["rank"] <= row["gallery_size"]
