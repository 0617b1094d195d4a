"""AdvCloak: networks, loss terms, the two-stage training loop, person masks, enroll, the shipped generators."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceveil.attacks.budgets import paste_l2, pasted_l2, scale_paste_l2, scale_to_budget
from faceveil.attacks.core import AttackConfig
from faceveil.detect import canonical as C
from faceveil.methods.advcloak import losses, networks
from faceveil.methods.advcloak.data import FaceSet
from faceveil.methods.advcloak.generator import PACKAGED, load_generator
from faceveil.methods.advcloak.person import generate_masks
from tests.conftest import LFW_ROOT, needs_lfw, needs_weights

MAX_BYTES = 8 * 2**20


# ------------------------------------------------------------------------------------------------ networks


def test_generator_and_discriminator_shapes_and_size():
    torch.manual_seed(0)
    g, d = networks.Generator(), networks.Discriminator()
    faces = torch.rand(2, 3, networks.GRID, networks.GRID)
    out = g(faces)
    assert out.shape == faces.shape and out.abs().max() <= 1
    assert d(faces).shape == (2,)
    assert networks.parameter_bytes(g) <= MAX_BYTES
    # the first perturbations are small: near the norm hinge, not dozens of times it
    assert float(losses.l2_norms(out.detach()).max()) < 5


def test_grid_canonical_round_trip():
    """The generator grid is the ArcFace-112 window of canonical space: there and back keeps the face area."""
    canonical = F.interpolate(torch.rand(1, 3, 16, 16), size=(256, 256), mode="bilinear", align_corners=False)
    back = networks.to_canonical(networks.from_canonical(canonical))
    inside = C.face_mask()[0] > 0.99
    assert (back - canonical)[..., inside].abs().max() < 0.05
    assert float(networks.to_canonical(torch.ones(1, 3, 112, 112))[..., :20, :20].abs().max()) == 0


# ------------------------------------------------------------------------------------------------ loss terms


def _stub_ensemble(metric: str = "cosine"):
    """Duck-typed ensemble: one surrogate 'm' of the given metric (the losses only read weights and metric)."""
    return SimpleNamespace(weights={"m": 1.0}, metric=lambda _name: metric)


def test_gan_losses_match_eq_10():
    real, fake = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0])
    expected_d = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(losses.gan_discriminator_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(losses.gan_generator_loss(fake), torch.log(1 - torch.sigmoid(fake)).mean(), atol=1e-6)


def test_norm_loss_is_a_hinge_at_eps():
    small = torch.full((1, 3, 4, 4), 0.01)  # ||.|| = 0.0693
    large = torch.full((1, 3, 4, 4), 1.0)  # ||.|| = 6.93
    assert float(losses.norm_loss(small, eps=1.0)) == 1.0
    assert math.isclose(float(losses.norm_loss(large, eps=1.0)), math.sqrt(48), rel_tol=1e-6)
    both = torch.cat([small, large]).requires_grad_(True)
    losses.norm_loss(both, eps=1.0).backward()
    assert float(both.grad[0].abs().max()) == 0 and float(both.grad[1].abs().max()) > 0


def test_class_distances_order_and_plain_case():
    """Plain = 1 - cos to each face's own feature; affine <= convex <= centre (nested subspaces)."""
    g = torch.Generator().manual_seed(0)
    clean = {"m": torch.randn(2 * 3, 8, generator=g)}
    adversarial = {"m": torch.randn(2 * 3, 8, generator=g)}
    ens = _stub_ensemble()
    plain = losses.class_adversarial_distance(ens, adversarial, clean, 2, "none")
    assert torch.allclose(plain.flatten(), 1 - F.cosine_similarity(adversarial["m"], clean["m"]), atol=1e-6)
    centre = losses.class_adversarial_distance(ens, adversarial, clean, 2, "center")
    convex = losses.class_adversarial_distance(ens, adversarial, clean, 2, "convex")
    affine = losses.class_adversarial_distance(ens, adversarial, clean, 2, "affine")
    assert centre.shape == convex.shape == affine.shape == (2, 3)
    assert (affine <= convex + 1e-6).all() and (convex <= centre + 1e-6).all()
    # a query that is one of the members is at distance 0 from both hulls
    on_hull = losses.class_adversarial_distance(ens, clean, clean, 2, "convex")
    assert float(on_hull.abs().max()) < 1e-6
    with pytest.raises(ValueError):
        losses.class_adversarial_distance(ens, adversarial, clean, 2, "sphere")


def test_generator_loss_pushes_distance_up():
    d = torch.tensor([0.2, 0.4], requires_grad=True)
    losses.generator_loss(torch.tensor(0.0), torch.tensor(1.0), d, 1.0, 10.0).backward()
    assert (d.grad < 0).all()  # minimising the loss increases the distance


# ------------------------------------------------------------------------------------------------ masks


def test_person_mask_is_on_the_budget():
    """One forward pass of a shipped generator over a person's faces (Eq. 2), scaled to the run's budget."""
    faces = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    batch = SimpleNamespace(regions=faces, canonical=lambda regions: regions)
    l2, info = generate_masks(batch, AttackConfig(norm="l2", eps=2.0), "advcloak")
    assert l2.shape == (1, 3, 256, 256) and abs(float(pasted_l2(l2)) - 2.0) < 1e-4  # the budget is what is pasted
    assert info["generator"] == PACKAGED["advcloak"]
    linf, _ = generate_masks(batch, AttackConfig(norm="linf", eps=8 / 255), "advcloak")
    assert abs(float(linf.abs().max()) - 8 / 255) < 1e-6
    masks = scale_to_budget(torch.randn(2, 3, 8, 8), "l2", 2.0)
    assert torch.allclose(masks.flatten(1).norm(dim=1), torch.tensor([2.0, 2.0]))
    assert float(scale_to_budget(torch.zeros(1, 3, 4, 4), "linf", 0.1).abs().max()) == 0


def test_paste_l2_normalisation():
    masks = scale_paste_l2(torch.randn(2, 3, 256, 256), 1200)
    assert torch.allclose(paste_l2(masks), torch.full((2,), 1200 / 255), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ training


def _tiny_faces(persons: int = 2, per_person: int = 4) -> FaceSet:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (persons * per_person, 32, 32, 3), dtype=np.uint8)
    faces = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)  # blocky 256x256 "faces"
    return FaceSet(faces, np.repeat(np.arange(persons), per_person), [f"p{i}" for i in range(persons)])


def _tiny_run(stage: int, data: dict, tmp_path, name: str, epochs: float = 1, resume: bool = False):
    from faceveil.methods.advcloak import train

    s = train.TrainSettings(stage=stage, subspace="convex", epochs=epochs, batch=4, persons=2, images_per_person=2,
                            surrogates=("mobileface",), checkpoint_every=1)
    return train.train_stage(_tiny_faces(), s, tmp_path / name, data, resume=resume,
                             log_path=tmp_path / f"{name}.jsonl", progress=False)


@needs_weights
@pytest.mark.slow
def test_one_training_step_lowers_the_generator_loss():
    from faceveil.attacks.core import Ensemble
    from faceveil.methods.advcloak import train

    faces = _tiny_faces()
    s = train.TrainSettings(stage=1, batch=4, surrogates=("mobileface",), lr=1e-4).resolved()
    nets, _ = train._prepare(train.new_checkpoint(), s, False, None)
    ensemble = Ensemble(["mobileface"])
    clean = train.CleanFeatures(ensemble, len(faces))
    index = np.arange(4)
    train.train_step(nets, ensemble, clean, faces, index, s)  # a full step (D, then G) runs
    out = train.forward(nets, ensemble, clean, faces, index, s)
    before = out.loss_g.item()
    nets.opt_g.zero_grad(set_to_none=True)
    out.loss_g.backward()
    nets.opt_g.step()  # train_step's G update, under the same D
    after = train.forward(nets, ensemble, clean, faces, index, s).loss_g.item()
    assert after < before


@needs_weights
@pytest.mark.slow
def test_training_is_seeded_and_resumable(tmp_path):
    from faceveil.methods.advcloak import train

    first, second = train.new_checkpoint(), train.new_checkpoint()
    _tiny_run(1, first, tmp_path, "a.pt")
    _tiny_run(1, second, tmp_path, "b.pt")
    for key, value in first["stage1"]["generator"].items():
        assert torch.equal(value, second["stage1"]["generator"][key]), key
    result = _tiny_run(2, first, tmp_path, "a.pt")
    assert result.steps == 1 and first["stage2"]["done"] and first["stage2"]["subspace"] == "convex"
    reread = train.read_checkpoint(tmp_path / "a.pt")
    assert reread["stage2"]["step"] == 1
    log = (tmp_path / "a.pt.jsonl").read_text().splitlines()
    assert log and all('"loss_g"' in line for line in log)
    with pytest.raises(Exception, match="resume"):
        _tiny_run(2, reread, tmp_path, "a.pt")
    generator = load_generator(tmp_path / "a.pt")
    assert generator.stage == 2 and generator.subspace == "convex"


@needs_weights
@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from faceveil.methods.advcloak import train

    whole, interrupted = train.new_checkpoint(), train.new_checkpoint()
    _tiny_run(1, whole, tmp_path, "whole.pt")  # 2 steps
    _tiny_run(1, interrupted, tmp_path, "cut.pt", epochs=0.5)  # stops after step 1 ...
    resumed = train.read_checkpoint(tmp_path / "cut.pt")
    result = _tiny_run(1, resumed, tmp_path, "cut.pt", resume=True)  # ... and goes on from the file
    assert result.resumed_from == 1 and result.steps == 2
    for key, value in whole["stage1"]["generator"].items():
        assert torch.equal(value, resumed["stage1"]["generator"][key]), key
    steps = [line for line in (tmp_path / "cut.pt.jsonl").read_text().splitlines() if '"stage": 1' in line]
    assert len(steps) == 2  # one log line per step (log_every 5 or the last step), none repeated


@needs_weights
@needs_lfw
@pytest.mark.slow
def test_cli_trains_tiny_run_and_exports(tmp_path):
    from faceveil.cli import main

    out = tmp_path / "g.pt"
    args = ["train", "advcloak", "--dataset", f"lfw={LFW_ROOT}", "--identities", "6", "--epochs", "0.5",
            "--batch", "4", "--persons", "2", "--images-per-person", "2", "--surrogates", "mobileface",
            "--quiet", "-o", str(out)]
    assert main(args) == 0
    assert main(["train", "advcloak-export", str(out), "-o", str(tmp_path / "slim.pt")]) == 0
    assert load_generator(tmp_path / "slim.pt").stage == 2


@needs_weights
@needs_lfw
@pytest.mark.slow
def test_eval_advcloak_users_mode_enrolls_at_the_l2_budget(tmp_path):
    """`eval advcloak --mode users`: each method through enroll --norm l2 --eps L2 and apply (JPEG), scored on the
    re-read files; what apply pasted is on the face (SSIM below 1), the budget reported is the one asked for."""
    from faceveil.cli import main

    out = tmp_path / "users.json"
    assert main(["eval", "advcloak", "--dataset", f"lfw={LFW_ROOT}", "--methods", "advcloak-convex", "--mode",
                 "users", "--l2", "1500", "--judges", "mfn192", "--limit", "1", "--distractors", "20", "--quiet",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["mode"] == "users" and doc["settings"]["l2_255"] == 1500
    (row,) = doc["rows"]
    assert row["method"] == "advcloak-convex" and row["mode"] == "users" and row["l2_255"] == 1500
    assert 0 <= row["top1_psr"] <= 1 and 0.7 < row["ssim"] < 0.999


# ------------------------------------------------------------------------------------------------ shipped


@pytest.mark.parametrize("method", sorted(PACKAGED))
def test_packaged_generators_load(method):
    from faceveil.methods.advcloak.generator import packaged_path

    path = packaged_path(method)
    assert path.stat().st_size <= MAX_BYTES
    trained = load_generator(method)
    assert trained.stage == (1 if method == "advfaces-plus" else 2)
    expected = {"advcloak": "none", "advcloak-affine": "affine", "advcloak-center": "center",
                "advcloak-convex": "convex"}.get(method)
    assert trained.subspace == expected


def test_methods_are_person_methods_of_the_registry():
    from faceveil.methods import registry

    assert {"advcloak", "advcloak-convex", "advfaces-plus"} <= set(registry.names("person"))
    assert set(PACKAGED) == {e.name for e in registry.ENTRIES if e.paper == "AdvCloak"}


@needs_weights
def test_enroll_advcloak_convex_writes_a_loadable_mask(tmp_path):
    from faceveil.cli import main
    from faceveil.io import weights
    from faceveil.pipeline.maskfile import load_mask

    photos = [str(p) for p in weights.sample_photos()][:2]
    out = tmp_path / "me.fvmask"
    assert main(["enroll", "--name", "me", *photos, "-o", str(out), "--method", "advcloak-convex",
                 "--norm", "l2", "--mode", "crops", "--quiet"]) == 0
    mask = load_mask(out)
    assert mask.method == "advcloak-convex" and mask.norm == "l2" and mask.masks.shape == (1, 3, 256, 256)
    assert float((mask.masks * C.face_mask()).flatten(1).norm(dim=1).max()) <= mask.eps * (1 + 1e-5)
    assert abs(mask.eps - 1200 / 255 * C.CANONICAL_ZOOM) < 1e-6


@needs_weights
def test_enroll_writes_advcloak_masks_on_the_budget_its_settings_say(tmp_path):
    """What enroll writes is what apply pastes, so the budget is measured there (the mask times the face mask, at
    the 112-crop scale, as the protocol's paste_l2): by default the paper's L2 1200, else the eps asked for, within
    2 %. An L-inf budget is used everywhere on the face, not only by the mask's largest value."""
    from faceveil.cli import main
    from faceveil.io import weights
    from faceveil.pipeline.maskfile import load_mask

    photos = [str(p) for p in weights.sample_photos()][:2]

    def enrolled(*flags: str):
        out = tmp_path / "me.fvmask"
        assert main(["enroll", "--name", "me", *photos, "-o", str(out), "--method", "advcloak-convex",
                     "--mode", "crops", "--quiet", *flags]) == 0
        return load_mask(out)

    default = enrolled()
    assert default.norm == "l2"
    assert abs(float(paste_l2(default.masks)[0]) * 255 - 1200) / 1200 < 0.02
    assert abs(float(paste_l2(enrolled("--norm", "l2", "--eps", "600").masks)[0]) * 255 - 600) / 600 < 0.02
    linf = enrolled("--norm", "linf", "--eps", "8")
    face = linf.masks[0][:, C.face_mask()[0] > 0.5]
    assert linf.norm == "linf" and float(face.abs().max()) * 255 <= 8 + 1e-3
    assert float(face.abs().mean()) * 255 > 0.98 * 8
