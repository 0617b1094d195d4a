"""The baselines TIP-IM is compared with (TIP-IM §5.1; arXiv §5.1), all on the same relative identity loss
L_iden = D_f(x_p, x_t) - D_f(x_p, x_r) and the same target set, through the same core loop:

- single-target: TIP-IM with one fixed target (arXiv's "Single-Target"; the MMD term with gamma > 0).
- MIM: momentum iterative steps (MI-FGSM, mu = 1) towards one fixed target.
- DIM: MIM with input diversity (p = 0.5).
- MT-DIM: DIM with a dynamic target assignment from the target set in the inner minimisation: at every iteration
  each face aims at the target that minimises L_iden at the current iterate, i.e. its nearest target in feature
  space (no look-ahead step and no gain, which is what TIP-IM's greedy insertion adds).

The fixed target is by default the face's first candidate in target-set order. The paper's evaluation protocol
("single-target methods calculate the optimal result as final report by attempting a target from the same target
set") is `best_of=True`: one run per candidate target, keeping per face the result with the lowest L_iden on the
surrogates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from faceveil.attacks.core import AttackConfig, Embeddings, Ensemble, clean_embeddings, perturbed_embeddings
from faceveil.attacks.faces import FaceBatch
from faceveil.methods.base import ImageMethod, MethodOptions, Perturbation
from faceveil.methods.targets import FaceTargets, TargetSet
from faceveil.methods.tip_im import (
    TargetChoice,
    TipImOptions,
    naturalness,
    options_for,
    relative_identity_loss,
    target_margins,
    targeted_attack,
)

MIM_MOMENTUM = 1.0  # mu of MI-FGSM as in the paper's MIM
DIM_DIVERSITY = 0.5  # probability of the DI transform (Xie et al. 2019)


class NearestTarget(TargetChoice):
    """MT-DIM's assignment: argmin over candidates of L_iden(x_t, x_p) at the current iterate."""

    def __init__(self, batch: FaceBatch, ensemble: Ensemble, original: Embeddings, targets: FaceTargets):
        super().__init__(targets)
        self.batch, self.ensemble, self.original = batch, ensemble, original

    def decide(self, step: int, delta: torch.Tensor) -> torch.Tensor:
        emb = perturbed_embeddings(self.batch, self.ensemble, delta)
        return target_margins(self.ensemble, emb, self.original, self.targets.embeddings).argmax(dim=1)


def mim_config(cfg: AttackConfig) -> AttackConfig:
    return dataclasses.replace(cfg, momentum=cfg.momentum or MIM_MOMENTUM)


def dim_config(cfg: AttackConfig) -> AttackConfig:
    return dataclasses.replace(mim_config(cfg), diversity=cfg.diversity or DIM_DIVERSITY)


Run = Callable[[int], Perturbation]  # candidate position -> result with that fixed target


def _fixed_target(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
                  options: TipImOptions, gamma: float, best_of: bool, progress: bool) -> Perturbation:
    original = clean_embeddings(batch, ensemble)
    targets = target_set.for_faces(original, options.max_targets)

    def run(position: int) -> Perturbation:
        chooser = TargetChoice(targets, torch.full((len(batch),), position, dtype=torch.long))
        term = naturalness(batch, dataclasses.replace(options, gamma=gamma), cfg)
        return targeted_attack(batch, ensemble, cfg, original, chooser, term, progress)

    return best_of_targets(run, batch, ensemble, original, targets) if best_of else run(0)


def best_of_targets(run: Run, batch: FaceBatch, ensemble: Ensemble, original: Embeddings,
                    targets: FaceTargets) -> Perturbation:
    """Run once per candidate target; per face keep the run whose final L_iden on the surrogates is lowest."""
    results, scores = [], []
    for position in range(targets.count):
        result = run(position)
        emb = perturbed_embeddings(batch, ensemble, result.delta)
        chosen = targets.chosen(torch.full((len(batch),), position, dtype=torch.long))
        results.append(result)
        scores.append(relative_identity_loss(ensemble, emb, original, chosen))
    best = torch.stack(scores, dim=1).argmin(dim=1)
    deltas, target_index, names, history = [], [], [], []
    for b in range(len(batch)):
        kept = results[int(best[b])]
        assert kept.target_index is not None and kept.targets is not None and kept.history is not None
        deltas.append(kept.delta[b])
        target_index.append(kept.target_index[b])
        names.append(kept.targets[b])
        history.append(kept.history[:, b])
    return Perturbation(delta=torch.stack(deltas), target_index=target_index, targets=names,
                        history=torch.stack(history, dim=1))


def single_target(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
                  options: TipImOptions | None = None, best_of: bool = False,
                  progress: bool = False) -> Perturbation:
    options = options or TipImOptions()
    return _fixed_target(batch, ensemble, cfg, target_set, options, options.gamma, best_of, progress)


def mim(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
        options: TipImOptions | None = None, best_of: bool = False, progress: bool = False) -> Perturbation:
    options = options or TipImOptions()
    return _fixed_target(batch, ensemble, mim_config(cfg), target_set, options, 0.0, best_of, progress)


def dim(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
        options: TipImOptions | None = None, best_of: bool = False, progress: bool = False) -> Perturbation:
    options = options or TipImOptions()
    return _fixed_target(batch, ensemble, dim_config(cfg), target_set, options, 0.0, best_of, progress)


def mt_dim(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
           options: TipImOptions | None = None, progress: bool = False) -> Perturbation:
    options = options or TipImOptions()
    original = clean_embeddings(batch, ensemble)
    targets = target_set.for_faces(original, options.max_targets)
    chooser = NearestTarget(batch, ensemble, original, targets)
    return targeted_attack(batch, ensemble, dim_config(cfg), original, chooser, None, progress)


def build(name: str, options: MethodOptions, target_set: TargetSet) -> ImageMethod:
    """The registry's builder of mim, dim, mt-dim and single-target."""
    tip_im_options = options_for(name, options)
    if name == "mt-dim":
        return lambda batch, ensemble, cfg: mt_dim(batch, ensemble, cfg, target_set, tip_im_options)
    single = {"mim": mim, "dim": dim, "single-target": single_target}[name]
    best_of = options.best_of_targets
    return lambda batch, ensemble, cfg: single(batch, ensemble, cfg, target_set, tip_im_options, best_of=best_of)
