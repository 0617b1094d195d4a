"""TIP-IM and its baselines on real sample faces, kept small (crops mode, mobileface, 2-3 targets, a few steps):
the relative identity loss goes down, greedy insertion picks what a brute-force evaluation of every candidate
picks, the protected person is never their own target, runs are reproducible, and the CLI flags reach the method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WRITTEN, needs_weights
from PIL import Image

from faceveil.attacks.core import (
    AttackConfig,
    Ensemble,
    candidate_step,
    clean_embeddings,
    loss_gradient,
    perturbed_embeddings,
)
from faceveil.attacks.faces import from_photos
from faceveil.attacks.losses import feature_distance
from faceveil.cli import build_parser, main
from faceveil.detect.cache import detect_file
from faceveil.detect.mtcnn import MTCNN
from faceveil.io import weights
from faceveil.io.images import read_image

CFG = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=3, momentum=1.0)


class World:
    """One protected face (sample3's largest real one, in crops mode) and targets made of other sample faces."""

    def __init__(self) -> None:
        from faceveil.methods.targets import MIN_SAMPLE_SCORE, TargetIdentity, TargetSet, target_face

        self.detector = MTCNN()
        self.ensemble = Ensemble(["mobileface"])
        photos = weights.sample_photos()
        self.faces = {}
        for i in (0, 2):  # sample1 (3 other people), sample3 (the protected person and 3 others)
            found, _ = detect_file(photos[i], self.detector, max_side=1024)
            image = read_image(photos[i]).rgb  # writable: torch warns on read-only arrays
            sure = [f for f in sorted(found, key=lambda f: -f.size) if f.score >= MIN_SAMPLE_SCORE]  # real faces
            self.faces[i] = [(image, f.landmarks) for f in sure]
        image, marks = self.faces[2][0]
        self.batch = from_photos([image], [marks], self.ensemble.geometries, "crops")
        self.original = clean_embeddings(self.batch, self.ensemble)

        def identities(i: int) -> list:
            return [TargetIdentity(f"s{i}-{k}", (target_face(im, m, f"s{i}"),))
                    for k, (im, m) in enumerate(self.faces[i])]

        self.others = TargetSet(identities(0), self.ensemble)
        self.with_self = TargetSet(identities(0) + identities(2)[:1], self.ensemble)  # + the protected face itself


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@needs_weights
def test_relative_identity_loss_decreases(world: World):
    from faceveil.methods import tip_im

    result = tip_im.protect(world.batch, world.ensemble, CFG, world.others, tip_im.TipImOptions(max_targets=2))
    target = {n: c[result.target_index] for n, c in world.others.centres.items()}

    def loss(delta: torch.Tensor) -> float:
        emb = perturbed_embeddings(world.batch, world.ensemble, delta)
        return float(tip_im.relative_identity_loss(world.ensemble, emb, world.original, target)[0])

    before, after = loss(torch.zeros_like(result.delta)), loss(result.delta)
    assert after < before - 0.05, (before, after)
    assert float(result.delta.abs().max()) <= CFG.eps + 1e-6
    assert result.history.shape == (CFG.steps, 1)


def _brute_force_gains(world: World, targets, delta: torch.Tensor, kind: str) -> torch.Tensor:
    """Algorithm 1 written out: one separate gradient, candidate and gain per target, distances by hand."""
    name = "mobileface"
    centres = targets.embeddings[name][0]  # [K, D]
    gains = []
    for k in range(targets.count):
        def toward_k(emb, _step, k=k):
            return (feature_distance(emb[name], centres[k:k + 1]) - feature_distance(emb[name], world.original[name]))

        grad = loss_gradient(world.batch, world.ensemble, toward_k, delta, 0, CFG, torch.Generator())
        emb = perturbed_embeddings(world.batch, world.ensemble, candidate_step(delta, grad, CFG))[name]
        margins = feature_distance(emb, world.original[name]) - feature_distance(emb.expand_as(centres), centres)
        pick = {"g": margins.max(), "g1": margins.exp().sum().log(), "g2": margins.min()}[kind]
        gains.append(torch.log(1 + pick.exp()))
    return torch.stack(gains)


@needs_weights
@pytest.mark.parametrize("kind", ["g", "g1", "g2"])
def test_greedy_insertion_picks_largest_gain(world: World, kind: str):
    from faceveil.methods import tip_im

    targets = world.others.for_faces(world.original, 3)
    chooser = tip_im.GreedyInsertion(world.batch, world.ensemble, world.original, targets, CFG, kind)
    delta = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1) * CFG.eps
    gains = chooser.gains(0, delta)[0]
    expected = _brute_force_gains(world, targets, delta, kind)
    torch.testing.assert_close(gains, expected, atol=1e-4, rtol=1e-4)
    chooser(0, delta)
    assert int(chooser.choice[0]) == int(expected.argmax())


@needs_weights
def test_protected_person_is_never_their_own_target(world: World):
    same = world.with_self.same_person(world.original)
    # the face itself, and sample1's second face: the same woman in another photo (mobileface 0.49, mfn512 0.63,
    # dlib distance 0.43: every model says so)
    assert same[0].tolist() == [False, True, False, True]
    targets = world.with_self.for_faces(world.original, 10)
    assert targets.index[0].tolist() == [0, 2]


@needs_weights
def test_same_seed_same_output(world: World):
    from faceveil.methods import tip_im

    options = tip_im.TipImOptions(gamma=1.0, gain="rand", max_targets=3, mmd_views=8)
    cfg = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=2, momentum=1.0, diversity=0.5, seed=7)
    a = tip_im.protect(world.batch, world.ensemble, cfg, world.others, options)
    b = tip_im.protect(world.batch, world.ensemble, cfg, world.others, options)
    assert torch.equal(a.delta, b.delta) and torch.equal(a.history, b.history)


def _method(world: World, method: str, **options):
    from faceveil.methods import registry
    from faceveil.methods.base import MethodOptions

    return registry.image_method(method, MethodOptions(**options), world.others)


@needs_weights
@pytest.mark.slow
def test_gamma_changes_the_perturbation(world: World):
    cfg = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=2, momentum=1.0)
    plain = _method(world, method="tip-im", gamma=0.0, max_targets=2)(world.batch, world.ensemble, cfg)
    natural = _method(world, method="tip-im", gamma=2.0, max_targets=2)(world.batch, world.ensemble, cfg)
    face = (world.batch.mask > 0.5).expand_as(plain.delta)  # what gets pasted
    assert (plain.delta != natural.delta)[face].float().mean() > 0.01
    assert natural.delta.abs()[face].mean() < plain.delta.abs()[face].mean()  # MMD pulls towards the original


@needs_weights
@pytest.mark.slow
def test_gain_rand_changes_target_statistics(world: World):
    cfg = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=6, momentum=1.0)
    greedy = _method(world, method="tip-im", gain="g", max_targets=3)(world.batch, world.ensemble, cfg).history[:, 0]
    rand = _method(world, method="tip-im", gain="rand", max_targets=3)(world.batch, world.ensemble, cfg).history[:, 0]

    def top_share(history: torch.Tensor) -> float:
        return float(torch.bincount(history).max()) / len(history)

    assert len(set(rand.tolist())) >= 2
    assert top_share(greedy) > top_share(rand)


def _mim_at(world: World, cfg: AttackConfig, targets, position: int):
    from faceveil.methods import baselines, tip_im

    chooser = tip_im.TargetChoice(targets, torch.tensor([position]))
    return tip_im.targeted_attack(world.batch, world.ensemble, baselines.mim_config(cfg), world.original, chooser)


@needs_weights
@pytest.mark.slow
def test_best_of_targets_keeps_the_lowest_loss_and_baselines_run(world: World):
    from faceveil.methods import baselines, tip_im

    cfg = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=1)
    options = tip_im.TipImOptions(max_targets=2)
    best = baselines.mim(world.batch, world.ensemble, cfg, world.others, options, best_of=True)
    targets = world.others.for_faces(world.original, 2)
    losses = []
    for position in range(2):
        emb = perturbed_embeddings(world.batch, world.ensemble, _mim_at(world, cfg, targets, position).delta)
        chosen = targets.chosen(torch.tensor([position]))
        losses.append(float(tip_im.relative_identity_loss(world.ensemble, emb, world.original, chosen)[0]))
    assert best.target_index[0] == int(targets.index[0, int(np.argmin(losses))])
    for method in (baselines.dim, baselines.single_target):
        assert method(world.batch, world.ensemble, cfg, world.others, options).delta.shape == best.delta.shape
    nearest = baselines.mt_dim(world.batch, world.ensemble, cfg, world.others, options)
    assert nearest.history.shape == (1, 1)


def test_cli_flags_reach_the_settings():
    from faceveil.cli.protect import protect_settings as _protect_settings
    from faceveil.methods import registry

    assert "tip-im" in registry.names("image") and registry.entry("tip-im").targeted
    parser = build_parser()
    args = parser.parse_args(["protect", "x", "-o", "y", "--method", "tip-im", "--gamma", "1.5", "--gain", "g2",
                              "--targets", "faces/"])
    s = _protect_settings(args)
    assert (s.method, s.gamma, s.gain, s.targets_dir) == ("tip-im", 1.5, "g2", Path("faces/"))
    paper = _protect_settings(parser.parse_args(["protect", "x", "-o", "y", "--paper-defaults"]))
    assert (paper.attack.eps, paper.attack.alpha, paper.attack.steps) == (12 / 255, 1.5 / 255, 50)
    assert (paper.attack.momentum, paper.max_targets, paper.attack.norm) == (1.0, 10, "linf")
    override = _protect_settings(parser.parse_args(["protect", "x", "-o", "y", "--paper-defaults", "--iters", "3"]))
    assert override.attack.steps == 3 and override.attack.eps == 12 / 255


@needs_weights
@pytest.mark.slow
def test_cli_uses_targets_dir_and_reports_the_target(tmp_path: Path, world: World):
    from faceveil.methods.targets import target_face

    folder = tmp_path / "targets"
    (folder / "alice").mkdir(parents=True)
    for name, (image, marks) in (("alice/a.png", world.faces[0][0]), ("bob.png", world.faces[0][1])):
        Image.fromarray(target_face(image, marks, name).photo).save(folder / name)
    src = tmp_path / "in" / "people.jpg"
    src.parent.mkdir()
    with Image.open(weights.sample_photos()[3]) as im:  # four other people
        im.convert("RGB").resize((640, 427)).save(src, quality=95)
    report = tmp_path / "report.json"
    code = main(["protect", str(src.parent), "-o", str(tmp_path / "out"), "--method", "tip-im", "--iters", "2",
                 "--surrogates", "mobileface", "--judges", "mobileface", "--faces", "largest", "--targets",
                 str(folder), "--json", str(report), "--quiet"])
    assert code in WRITTEN
    face = json.loads(report.read_text())["results"][0]["details"]["faces"][0]
    assert face["target"]["identity"] in {"alice", "bob"}
    assert set(face["target"]) >= {"identity", "chosen_steps", "steps", "mobileface"}
    assert -1 <= face["target"]["mobileface"]["score"] <= 1
