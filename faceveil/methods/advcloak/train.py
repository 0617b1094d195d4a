"""AdvCloak's two-stage training (Liu et al. 2023, §3.2.1 and §4.1.4).

Stage I, image-specific (G^I, D^I): each face gets its own perturbation G(X); losses L_GAN^I (Eq. 10),
L_norm^I (Eq. 12), L_adv^I (Eq. 14) with lambda_norm 1, lambda_adv 10, Adam lr 1e-4.
Stage II, person-specific (G^II, D^II, initialised from stage I): P persons x n faces per step; the person mask
is the mean of the n perturbations (Eq. 2) added to every face of the person (Eq. 3); losses L_GAN^II (Eq. 11),
L_norm^II (Eq. 13) and the class-wise adversarial loss (Eq. 15) or its subspace forms (Eq. 17-19: affine hull,
class centre, convex hull), with lambda_norm 1, lambda_adv 15. Adam betas (0.5, 0.9) in both stages.

Scaled to this machine: the paper's stage II learning rate, 2e-8, fine-tunes a network trained for many epochs on
48,000 faces; for the ~100 stage II steps that fit here it would change nothing (Adam moves each weight by about
the learning rate per step), so stage II defaults to half the stage I rate, 5e-5 (every value can be set).
eps, the norm hinge, is AdvFaces' 3 in its [-1, 1] pixel units, i.e. 1.5 in the [0, 1] units used here, on the
112x112x3 grid. Sizes here: ~330 stage I steps of 8 faces, ~120 stage II steps of 4 persons x 4 faces (the paper:
50,000 faces, 3,000 persons x 16).

Each step, the perturbation is taken to canonical space and pasted through faceveil.attacks.faces.FaceBatch
(face mask, clipping), and the surrogates (faceveil.attacks.core.Ensemble) see their own crops of the result:
what the generator is trained on is what a .fvmask does when applied. Training is deterministic for a seed (data
order from (seed, stage, epoch); no other randomness), so a resumed run continues exactly where it stopped.

Checkpoint file (torch.save, written atomically every `checkpoint_every` steps and at the end of a stage):
{"format": "faceveil-advcloak", "version", "generator_config", "discriminator_config",
 "stage1": {"generator", "discriminator", "opt_g", "opt_d", "step", "steps", "done", "settings"},
 "stage2": {... same ..., "subspace"} or absent}.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.attacks.core import Embeddings, Ensemble
from faceveil.attacks.faces import FaceBatch
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.io.atomic import atomic_path
from faceveil.methods.advcloak import losses
from faceveil.methods.advcloak.data import FaceSet
from faceveil.methods.advcloak.networks import (
    DISCRIMINATOR_CONFIG,
    GENERATOR_CONFIG,
    Discriminator,
    Generator,
    from_canonical,
    to_canonical,
)

FORMAT = "faceveil-advcloak"
VERSION = 1
BETAS = (0.5, 0.9)
# (learning rate, lambda_norm, lambda_adv) per stage: §4.1.4, stage II's rate scaled (module docstring)
PAPER_STAGE_SETTINGS = {1: (1e-4, 1.0, 10.0), 2: (2e-8, 1.0, 15.0)}
STAGE2_LR = 5e-5
EPS = 1.5  # AdvFaces' eps = 3 in [-1, 1] units


@dataclass
class TrainSettings:
    stage: int = 1
    subspace: str = "convex"  # stage II only: none | affine | center | convex
    epochs: float = 1.0
    batch: int = 8  # stage I faces per step
    persons: int = 4  # stage II persons per step ...
    images_per_person: int = 4  # ... and faces of each (persons with fewer are not used in stage II)
    lr: float | None = None  # None: the stage's default
    lambda_norm: float | None = None
    lambda_adv: float | None = None
    eps: float = EPS
    surrogates: tuple[str, ...] = ("mobileface", "mfn512")
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 5

    def resolved(self) -> TrainSettings:
        """Defaults of the stage filled in."""
        lr, lambda_norm, lambda_adv = PAPER_STAGE_SETTINGS[self.stage]
        lr = STAGE2_LR if self.stage == 2 else lr
        return dataclasses.replace(
            self, lr=self.lr if self.lr is not None else lr,
            lambda_norm=self.lambda_norm if self.lambda_norm is not None else lambda_norm,
            lambda_adv=self.lambda_adv if self.lambda_adv is not None else lambda_adv)

    def key(self) -> str:
        return f"stage{self.stage}"


@dataclass
class Networks:
    generator: Generator
    discriminator: Discriminator
    opt_g: torch.optim.Optimizer = field(init=False)
    opt_d: torch.optim.Optimizer = field(init=False)

    def make_optimisers(self, lr: float) -> None:
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=BETAS)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=BETAS)


# ------------------------------------------------------------------------------------------------ one step


@functools.cache
def _canonical_crop_matrix(geometry: str) -> torch.Tensor:
    return C.canonical_to_crop_matrices(torch.tensor(C.CANONICAL.template), geometry)


def canonical_batch(faces: torch.Tensor, geometries: list[str]) -> FaceBatch:
    """A FaceBatch whose regions are canonical faces [B,3,256,256] (crops mode: no 8-bit rounding)."""
    count = faces.shape[0]
    crops = {g: _canonical_crop_matrix(g).expand(count, 2, 3) for g in geometries}
    return FaceBatch(faces, torch.eye(2, 3, dtype=torch.float64).expand(count, 2, 3), crops, quantise=False)


class CleanFeatures:
    """Surrogate embeddings of the clean training faces, computed once per face (they never change)."""

    def __init__(self, ensemble: Ensemble, count: int):
        self.ensemble = ensemble
        self.store: dict[str, torch.Tensor] = {}
        self.known = torch.zeros(count, dtype=torch.bool)

    def get(self, index: np.ndarray, batch: FaceBatch) -> Embeddings:
        index_t = torch.as_tensor(index)
        todo = ~self.known[index_t]
        if todo.any():
            with torch.no_grad():
                fresh = self.ensemble.embed(batch.take(torch.nonzero(todo).flatten()), batch.regions[todo])
            for name, emb in fresh.items():
                if name not in self.store:
                    self.store[name] = torch.zeros(len(self.known), emb.shape[-1])
                self.store[name][index_t[todo]] = emb
            self.known[index_t[todo]] = True
        return {name: values[index_t] for name, values in self.store.items()}


def _discriminator_step(nets: Networks, clean_view: torch.Tensor, adversarial_view: torch.Tensor) -> float:
    nets.opt_d.zero_grad(set_to_none=True)
    loss = losses.gan_discriminator_loss(nets.discriminator(clean_view), nets.discriminator(adversarial_view.detach()))
    loss.backward()
    nets.opt_d.step()
    return loss.item()


@dataclass
class Forward:
    """One forward pass of a step: the views D compares, and G's loss with its terms."""

    clean_view: torch.Tensor
    adversarial_view: torch.Tensor
    loss_g: torch.Tensor
    terms: dict[str, float]


def forward(nets: Networks, ensemble: Ensemble, clean: CleanFeatures, faces: FaceSet, index: np.ndarray,
            s: TrainSettings, discriminator_step: bool = False) -> Forward:
    """G's loss on the faces at `index` (stage II: person-major, P x n); with `discriminator_step`, D is updated
    on this batch first and G's GAN term uses the updated D (the order of the paper's min-max alternation)."""
    batch = canonical_batch(faces.tensor(index), ensemble.geometries)
    view = from_canonical(batch.regions)
    perturbation = nets.generator(view)  # image-specific G(X) on the 112 grid
    if s.stage == 2:  # Eq. 2-3: one mask per person, the mean of its faces' perturbations, on all its faces
        persons = len(index) // s.images_per_person
        masks = perturbation.view(persons, s.images_per_person, *perturbation.shape[1:]).mean(1)
        applied = masks.repeat_interleave(s.images_per_person, 0)
    else:
        persons, masks, applied = len(index), perturbation, perturbation
    adversarial = batch.perturbed(to_canonical(applied))
    adversarial_view = from_canonical(adversarial)
    loss_d = _discriminator_step(nets, view, adversarial_view) if discriminator_step else float("nan")

    emb = ensemble.embed(batch, adversarial)
    reference = clean.get(index, batch)
    if s.stage == 2:
        distance = losses.class_adversarial_distance(ensemble, emb, reference, persons, s.subspace)
    else:
        distance = losses.image_adversarial_distance(ensemble, emb, reference)
    gan = losses.gan_generator_loss(nets.discriminator(adversarial_view))
    norm = losses.norm_loss(masks, s.eps)
    assert s.lambda_norm is not None and s.lambda_adv is not None, "settings not resolved()"
    loss_g = losses.generator_loss(gan, norm, distance, s.lambda_norm, s.lambda_adv)
    terms = {"loss_g": loss_g.item(), "loss_d": loss_d, "gan_g": gan.item(), "norm_loss": norm.item(),
             "adv_distance": distance.mean().item(), "mask_l2": float(losses.l2_norms(masks.detach()).mean())}
    return Forward(view, adversarial_view, loss_g, terms)


def train_step(nets: Networks, ensemble: Ensemble, clean: CleanFeatures, faces: FaceSet, index: np.ndarray,
               s: TrainSettings) -> dict[str, float]:
    """One D update then one G update on the faces at `index`; returns the loss terms."""
    out = forward(nets, ensemble, clean, faces, index, s, discriminator_step=True)
    nets.opt_g.zero_grad(set_to_none=True)
    out.loss_g.backward()
    nets.opt_g.step()
    return out.terms


# ------------------------------------------------------------------------------------------------ batches


def _epoch_order(seed: int, stage: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, epoch]).permutation(count)


def stage1_batches(faces: FaceSet, s: TrainSettings) -> tuple[int, Callable[[int], np.ndarray]]:
    """(steps per epoch, step -> face indices): seeded shuffles, one per epoch; the last short batch is dropped."""
    per_epoch = len(faces) // s.batch
    if per_epoch == 0:
        raise FaceveilError(f"stage I needs at least {s.batch} faces, got {len(faces)}")

    def batch_at(step: int) -> np.ndarray:
        epoch, within = divmod(step, per_epoch)
        order = _epoch_order(s.seed, 1, epoch, len(faces))
        return order[within * s.batch:(within + 1) * s.batch]

    return per_epoch, batch_at


def stage2_batches(faces: FaceSet, s: TrainSettings) -> tuple[int, Callable[[int], np.ndarray]]:
    """Each epoch visits every person with >= n faces once, P per step, with a seeded choice of n of its faces."""
    groups = faces.by_identity(s.images_per_person)
    per_epoch = len(groups) // s.persons
    if per_epoch == 0:
        raise FaceveilError(f"stage II needs {s.persons} persons with >= {s.images_per_person} faces; "
                            f"the training set has {len(groups)}")

    def batch_at(step: int) -> np.ndarray:
        epoch, within = divmod(step, per_epoch)
        order = _epoch_order(s.seed, 2, epoch, len(groups))
        rng = np.random.default_rng([s.seed, 2, epoch, within])
        chosen = [groups[k] for k in order[within * s.persons:(within + 1) * s.persons]]
        return np.concatenate([rng.choice(g, s.images_per_person, replace=False) for g in chosen])

    return per_epoch, batch_at


# ------------------------------------------------------------------------------------------------ checkpoints


def new_checkpoint(generator_config: dict | None = None, discriminator_config: dict | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "generator_config": dict(generator_config or GENERATOR_CONFIG),
            "discriminator_config": dict(discriminator_config or DISCRIMINATOR_CONFIG)}


def read_checkpoint(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise FaceveilError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FaceveilError(f"{path} is not an AdvCloak training checkpoint")
    return data


def write_checkpoint(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        torch.save(data, temp)


def _networks_from(data: dict, stage_state: dict | None) -> Networks:
    generator = Generator(**data["generator_config"])
    discriminator = Discriminator(**data["discriminator_config"])
    if stage_state is not None:
        generator.load_state_dict(stage_state["generator"])
        discriminator.load_state_dict(stage_state["discriminator"])
    return Networks(generator, discriminator)


def _stage_state(nets: Networks, step: int, steps: int, s: TrainSettings) -> dict:
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}
    return {"generator": copy.deepcopy(nets.generator.state_dict()),
            "discriminator": copy.deepcopy(nets.discriminator.state_dict()),
            "opt_g": copy.deepcopy(nets.opt_g.state_dict()), "opt_d": copy.deepcopy(nets.opt_d.state_dict()),
            "step": step, "steps": steps, "done": step >= steps, "settings": settings,
            "subspace": s.subspace if s.stage == 2 else None}


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    stage: int
    steps: int
    resumed_from: int
    seconds: float
    last: dict[str, float]


def _prepare(data: dict, s: TrainSettings, resume: bool, output: Path) -> tuple[Networks, int]:
    """Networks for the stage (fresh, from stage I, or resumed) and the step to start at."""
    assert s.lr is not None, "settings not resolved()"
    key = s.key()
    if key in data and not resume:
        state = data[key]
        what = "finished" if state.get("done") else f"partial (step {state['step']})"
        raise FaceveilError(f"{output} already holds a {what} stage {s.stage}: pass `resume` to continue it, or "
                            "choose another `output`")
    if key in data:
        state = data[key]
        if s.stage == 2 and state.get("subspace") != s.subspace:
            raise FaceveilError(f"{output} holds stage II with `subspace` {state.get('subspace')}, "
                                f"not {s.subspace}")
        nets = _networks_from(data, state)
        nets.make_optimisers(s.lr)
        nets.opt_g.load_state_dict(state["opt_g"])
        nets.opt_d.load_state_dict(state["opt_d"])
        return nets, int(state["step"])
    if s.stage == 2:
        first = data.get("stage1")
        if not first or not first.get("done"):
            raise FaceveilError(f"stage II starts from a finished stage I: {output} has none (train stage I "
                                "first, or start from a checkpoint with a finished stage I)")
        nets = _networks_from(data, first)  # G^II and D^II start as G^I and D^I
    else:
        torch.manual_seed(s.seed)
        nets = Networks(Generator(**data["generator_config"]), Discriminator(**data["discriminator_config"]))
    nets.make_optimisers(s.lr)
    return nets, 0


def train_stage(faces: FaceSet, s: TrainSettings, output: Path, data: dict, resume: bool = False,
                log_path: Path | None = None, progress: bool = True) -> TrainResult:
    """Run (or continue) one stage, checkpointing into `output`; `data` is the checkpoint so far (updated)."""
    s = s.resolved()
    if s.subspace not in losses.SUBSPACES:
        raise FaceveilError(f"`subspace` takes {', '.join(losses.SUBSPACES)}, got {s.subspace!r}")
    nets, start = _prepare(data, s, resume, output)
    per_epoch, batch_at = (stage1_batches if s.stage == 1 else stage2_batches)(faces, s)
    steps = max(1, math.ceil(s.epochs * per_epoch))
    ensemble = Ensemble(list(s.surrogates))
    for model in ensemble.models.values():
        model.eval()
    clean = CleanFeatures(ensemble, len(faces))
    log = _open_log(log_path, s.stage, start)
    began, last = time.perf_counter(), {}
    nets.generator.train()
    nets.discriminator.train()
    bar = tqdm(range(start, steps), desc=f"advcloak stage {s.stage}", disable=not progress, unit="step",
               initial=start, total=steps)
    try:
        for step in bar:
            last = train_step(nets, ensemble, clean, faces, batch_at(step), s)
            done = step + 1
            if done % s.log_every == 0 or done == steps:
                _log(log, {"stage": s.stage, "step": done, "epoch": round(done / per_epoch, 4), **last,
                           "seconds": round(time.perf_counter() - began, 2)})
                bar.set_postfix(adv=f"{last['adv_distance']:.3f}", l2=f"{last['mask_l2']:.2f}")
            if done % s.checkpoint_every == 0 or done == steps:
                data[s.key()] = _stage_state(nets, done, steps, s)
                write_checkpoint(output, data)
    finally:
        if log is not None:
            log.close()
    return TrainResult(s.stage, steps, start, time.perf_counter() - began, last)


def _open_log(path: Path | None, stage: int, start: int):
    """The JSON-lines loss log, with any lines of this stage past the resumed step dropped (they will be redone)."""
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("stage") != stage or entry.get("step", 0) <= start:
                kept.append(line)
    with atomic_path(path) as temp:
        temp.write_text("".join(f"{line}\n" for line in kept))
    return open(path, "a")  # noqa: SIM115 (closed by train_stage)


def _log(handle, entry: dict) -> None:
    if handle is not None:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
