"""OPOM person masks on two real faces of one person (sample1 and sample3 show the same man), crops mode, mobileface
only, 2-3 iterations: every method increases its own objective, the mask is one perturbation shared by all the
person's faces (the core's `owner`), diverse masks differ, runs are seeded, and the method table is extensible."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import needs_weights

from faceveil.attacks.core import AttackConfig, Ensemble, feature_dropout, loss_gradient, run_attack
from faceveil.attacks.faces import from_photos
from faceveil.detect.cache import detect_file
from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.methods import registry
from faceveil.methods.base import PersonMaskOptions
from faceveil.methods.opom import learners

pytestmark = needs_weights
CFG = dataclasses.replace(learners.paper_config(0), steps=3, alpha=2 / 255)


class Person:
    """The same man in sample1 (second-largest face) and sample3 (second-largest face), and one other face."""

    def __init__(self) -> None:
        photos = weights.sample_photos()
        self.ensemble = Ensemble(["mobileface"])
        images, marks = [], []
        for index in (0, 2):
            found, _ = detect_file(photos[index], max_side=1024)
            face = sorted(found, key=lambda f: -f.size)[1]
            images.append(read_image(photos[index]).rgb)
            marks.append(face.landmarks)
        self.batch = from_photos(images, marks, self.ensemble.geometries, "crops")
        found, _ = detect_file(photos[1], max_side=1024)
        other = max(found, key=lambda f: f.size)
        self.other = from_photos([read_image(photos[1]).rgb], [other.landmarks], self.ensemble.geometries,
                                 "crops")


@pytest.fixture(scope="module")
def person() -> Person:
    return Person()


def _learn(person: Person, method: str, cfg: AttackConfig = CFG, **options) -> torch.Tensor:
    return registry.learn_person_masks(method, person.batch, person.ensemble, cfg, PersonMaskOptions(**options)).masks


@pytest.mark.parametrize("method", [e.name for e in registry.ENTRIES if e.paper == "OPOM" and e.name != "gap"])
@pytest.mark.slow
def test_each_method_increases_its_objective(person: Person, method: str) -> None:
    start = _learn(person, method, dataclasses.replace(CFG, steps=0))  # Delta_0 ~ U(-eps, eps), same seed
    learned = _learn(person, method)
    before = learners.objective_value(person.batch, person.ensemble, start, method)
    after = learners.objective_value(person.batch, person.ensemble, learned, method)
    assert after > before, (method, before, after)
    assert learned.shape == (1, 3, 256, 256)
    assert float(learned.abs().max()) <= CFG.eps + 1e-7


@pytest.mark.slow
def test_gap_training_increases_its_loss(person: Person) -> None:
    untrained = _learn(person, "gap", gap_epochs=0)
    trained = _learn(person, "gap", gap_epochs=3)
    before = learners.objective_value(person.batch, person.ensemble, untrained, "gap")
    after = learners.objective_value(person.batch, person.ensemble, trained, "gap")
    assert after > before
    # GAP puts the mask on the budget's boundary
    assert float(trained.abs().max()) == pytest.approx(CFG.eps, rel=1e-5)


def test_mask_is_shared_by_all_faces(person: Person) -> None:
    """With owner = [0, 0], the gradient of the one mask is the sum of the two faces' gradients."""
    def objective(emb, _step):
        return emb["mobileface"].square().sum(-1)

    delta = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 0.02 - 0.01
    owner = torch.zeros(2, dtype=torch.long)
    shared = loss_gradient(person.batch, person.ensemble, objective, delta, 0, CFG, torch.Generator(), owner=owner)
    apart = loss_gradient(person.batch, person.ensemble, objective, delta.expand(2, -1, -1, -1), 0, CFG,
                          torch.Generator())
    assert shared.shape == (1, 3, 256, 256)
    torch.testing.assert_close(shared[0], apart.sum(0), rtol=1e-4, atol=1e-7)
    masks = run_attack(person.batch, person.ensemble, objective, dataclasses.replace(CFG, steps=1), owner=owner)
    assert masks.shape == (1, 3, 256, 256)


def test_owner_must_cover_every_mask(person: Person) -> None:
    with pytest.raises(ValueError):
        run_attack(person.batch, person.ensemble, lambda e, s: e["mobileface"].sum(-1), CFG,
                   owner=torch.tensor([0, 2]))


@pytest.mark.slow
def test_diverse_masks_differ(person: Person) -> None:
    masks = _learn(person, "opom-convex", masks=2)
    assert masks.shape == (2, 3, 256, 256)
    assert float(masks.abs().amax()) <= CFG.eps + 1e-7
    # Different masks: most pixels differ (they start apart and are pushed apart, Eq. 19)
    assert float((masks[0] - masks[1]).abs().mean()) > CFG.eps / 4
    # Diverse masks start apart even without the random start (a common start would keep them equal).
    plain = _learn(person, "fi-uap", dataclasses.replace(CFG, random_start=False), masks=2)
    assert not torch.equal(plain[0], plain[1])


@pytest.mark.slow
def test_same_seed_same_mask(person: Person) -> None:
    a = _learn(person, "opom-convex")
    b = _learn(person, "opom-convex")
    c = _learn(person, "opom-convex", dataclasses.replace(CFG, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_convex_hull_run_reports_solver_time(person: Person) -> None:
    result = registry.learn_person_masks("opom-convex", person.batch, person.ensemble, CFG)
    assert result.info["hull_solver_ms_per_step"] > 0
    assert result.info["steps"] == CFG.steps


def test_fi_uap_all_learns_on_everybody(person: Person) -> None:
    options = PersonMaskOptions(universal_faces=person.other)
    result = registry.learn_person_masks("fi-uap-all", person.batch, person.ensemble, CFG, options)
    assert result.info["universal_faces"] == 1
    alone = _learn(person, "fi-uap")
    assert not torch.equal(result.masks, alone)  # the other identity's face changed the universal mask


def test_unknown_or_wrong_kind_of_method_is_one_line(person: Person) -> None:
    with pytest.raises(FaceveilError, match="unknown method 'no-such-method'"):
        _learn(person, "no-such-method")
    with pytest.raises(FaceveilError, match="'pgd' is of kind image"):
        _learn(person, "pgd")


def test_dfanet_dropout_reaches_tfjs_convolutions(person: Person) -> None:
    """mobileface is a TF.js graph with its own conv modules: DFANet's dropout must still thin it."""
    model = person.ensemble.models["mobileface"]
    crops = person.batch.crops(person.batch.regions, "arcface112")
    with torch.no_grad():
        clean = model(crops)
        with feature_dropout([model], 0.1, torch.Generator().manual_seed(0)):
            thinned = model(crops)
    assert not torch.allclose(clean, thinned)
