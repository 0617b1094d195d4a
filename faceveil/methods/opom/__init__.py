"""OPOM (Zhong & Deng, TPAMI 2022): person-specific universal privacy masks, and the paper's comparison methods.

One canonical-space mask Delta is shared by all n_k images X_i of one person and maximises, summed over the images,
the distance of the masked image's features f(X_i + Delta) from the person's feature subspace, modelled from the
clean features F = [f(X_1), ..., f(X_nk)] of the same images:

    opom-convex  Eq. 12-13  distance to the convex hull of F (alpha >= 0, sum 1; warm-started active-set solver)
    opom-affine  Eq. 2-8    distance to the affine hull of F (closed form, SVD basis)
    opom-center  Eq. 10-11  distance to the class centre mean(F)
    fi-uap       Eq. 17     ||f(X_i) - f(X_i + Delta)||: each image against its own clean feature
    fi-uap-plus  Eq. 18     sum_j ||f(X_j) - f(X_i + Delta)||: against every clean feature of the person (here the
                            mean over j, so its scale matches the others: the sign step does not see the factor)
    fi-uap-all   §3.3.2     FI-UAP over the training images of ALL identities: one universal mask for everybody
                            (pass the other identities' faces as options.universal_faces; without them it is
                            FI-UAP on the given faces)
    gd-uap       Eq. 16     data-prior GD-UAP: maximise sum_i sum_j log ||l_j(X_i + Delta)|| over the surrogates'
                            activation layers (after each non-linearity / residual block), no identity loss
    gap          §3.3.3     GAP: a small ResNet generator maps a fixed noise to the mask, trained with the FI-UAP
                            loss (Eq. 17) on the person's images (faceveil/methods/gap.py)

Distances are those of the paper: Euclidean between L2-normalised features (normalised features, §3.1); for dlib,
whose embeddings are not centred, the raw L2 distance divided by its 0.6 decision distance (core.L2_SCALE), so the
per-model terms are on one scale and are averaged with the ensemble's weights.

Optimisation is the attack core's loop with a shared perturbation (run_attack's `owner`): Delta_0 ~ U(-eps, eps),
signed steps, projection C_eps (Algorithms 1-2), optionally with momentum (Eq. 14: AttackConfig.momentum) and DFANet
feature dropout (Eq. 15: AttackConfig.dropout). Paper defaults (§4.2.1): L-inf eps 8 (of 255), 16 iterations; the
algorithms step by sign(g) on the 0..255 scale, i.e. alpha = 1/255.

Diverse masks (§4.3.4, Eq. 19): n_M masks learned together, each shared by all the images; besides each masked
image's distance from the subspace, masked copies of the same image under two different masks are pushed apart:

    J = sum_{m,i} [ D(f(X_i + Delta_m), H) + lambda * mean_{m' != m} ||f(X_i + Delta_m) - f(X_i + Delta_m')|| ]

Eq. 19 states the three distances as constraints against the same threshold t, weighing them equally: lambda = 1.

The method table `LEARNERS` maps a method name to its function; other modules add theirs with `register_method`
(e.g. AdvCloak), and `learn_person_masks` looks names up there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from faceveil.attacks.core import (
    L2_SCALE,
    AttackConfig,
    Embeddings,
    Ensemble,
    clean_embeddings,
    perturbed_embeddings,
    run_attack,
)
from faceveil.attacks.faces import FaceBatch
from faceveil.attacks.norms import random_init
from faceveil.attacks.subspace import affine_hull_distance, class_centre_distance, convex_hull_distance
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError

PERSON_MASK_METHODS = ("opom-convex", "opom-affine", "opom-center", "fi-uap", "fi-uap-plus", "fi-uap-all",
                       "gd-uap", "gap")
# Eq. 19 puts the subspace distances and the mask-to-mask distance against one threshold: equal weights.
DEFAULT_DIVERSITY_WEIGHT = 1.0
# §4.2.1: L-inf eps 8, 16 iterations; Algorithms 1-2: Delta_0 ~ U(-eps, eps), steps of sign(g) (1 on 0..255).
PAPER_CONFIG = AttackConfig(eps=8 / 255, alpha=1 / 255, steps=16, norm="linf", momentum=0.0, random_start=True)
# Modules built by the extension packages that register more methods (imported on first lookup of a missing name).
EXTENSION_MODULES = ("faceveil.methods.advcloak.person",)
# GAP (§3.3.3): the generator is trained for 10 epochs over the training images (paper); faces per update.
GAP_EPOCHS = 10
GAP_BATCH = 2
# Seed offsets of the methods' own random streams, apart from the core's (which uses cfg.seed itself).
DIVERSE_INIT_SEED_OFFSET = 7919


def paper_config(seed: int = 0) -> AttackConfig:
    """The OPOM paper's optimisation settings (L-inf eps 8/255, 16 iterations, alpha 1/255, random start)."""
    return dataclasses.replace(PAPER_CONFIG, seed=seed)


@dataclass
class PersonMaskOptions:
    method: str = "opom-convex"
    masks: int = 1  # n_M diverse masks (Eq. 19); 1 = a single mask
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT  # lambda of Eq. 19
    # fi-uap-all: the training faces of the other identities (the universal mask is learned on everybody's)
    universal_faces: FaceBatch | None = None
    gap_epochs: int = GAP_EPOCHS
    gap_batch: int = GAP_BATCH
    extra: dict = field(default_factory=dict)  # method-specific settings of registered extension methods


class MaskResult(NamedTuple):
    """What a learner returns: the masks [n_M,3,256,256] and figures about the run (timings, objective)."""

    masks: torch.Tensor
    info: dict


MaskLearner = Callable[[FaceBatch, Ensemble, AttackConfig, PersonMaskOptions, bool], "MaskResult | torch.Tensor"]
LEARNERS: dict[str, MaskLearner] = {}


def register_method(name: str, learner: MaskLearner) -> None:
    """Make `name` a person-mask method: learner(batch, ensemble, cfg, options, progress) -> masks or MaskResult."""
    LEARNERS[name] = learner


def method_names() -> list[str]:
    _import_extensions()
    return list(LEARNERS)


def learn_person_masks(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
                       progress: bool = False) -> torch.Tensor:
    """All faces in `batch` are ONE person (n_k images); returns [n_M, 3, 256, 256] canonical-space masks."""
    return learn_person_masks_with_info(batch, ensemble, cfg, options, progress).masks


def learn_person_masks_with_info(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig,
                                 options: PersonMaskOptions, progress: bool = False) -> MaskResult:
    """learn_person_masks, with the run's figures (seconds, convex-hull solver ms per step, objective)."""
    if len(batch) == 0:
        raise FaceveilError("a person mask needs at least one face")
    if options.masks < 1:
        raise FaceveilError(f"the number of masks must be at least 1, got {options.masks}")
    learner = _learner(options.method)
    start = time.perf_counter()
    result = learner(batch, ensemble, cfg, options, progress)
    result = result if isinstance(result, MaskResult) else MaskResult(result, {})
    masks = result.masks.detach().float()
    if masks.shape != (options.masks, 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE):
        raise RuntimeError(f"method {options.method} returned masks of shape {tuple(masks.shape)}")
    info = {"method": options.method, "faces": len(batch), "masks": options.masks,
            "seconds": time.perf_counter() - start, **result.info}
    return MaskResult(masks, info)


def _learner(name: str) -> MaskLearner:
    if name not in LEARNERS:
        _import_extensions()
    if name not in LEARNERS:
        raise FaceveilError(f"unknown person-mask method {name!r}; known: {', '.join(LEARNERS)}")
    return LEARNERS[name]


def _import_extensions() -> None:
    for module in EXTENSION_MODULES:
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(module)


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """n_M masks x n_k faces as one batch, mask-major: entry m * n_k + i is face i under mask m."""

    faces: int
    masks: int

    @property
    def face_index(self) -> torch.Tensor:
        return torch.arange(self.faces).repeat(self.masks)

    @property
    def owner(self) -> torch.Tensor:
        return torch.arange(self.masks).repeat_interleave(self.faces)

    def expand(self, batch: FaceBatch) -> FaceBatch:
        return batch if self.masks == 1 else batch.take(self.face_index)


# ----------------------------------------------------------------------------------------------- objectives

# The subspace models of §3.2.1 and the FI-UAP family of §3.3.2: (queries [E, D], clean members [n, D],
# face index of each query [E], normalise, warm start) -> distances [E] and the new warm start (convex hull only).
SUBSPACE_METHODS = ("opom-convex", "opom-affine", "opom-center", "fi-uap", "fi-uap-plus", "fi-uap-all")


def point_distance(a: torch.Tensor, b: torch.Tensor, normalise: bool) -> torch.Tensor:
    """||a - b|| over the last dim, after L2 normalisation when `normalise`; a 0 gradient (not NaN) at 0."""
    if normalise:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    square = (a - b).square().sum(-1)
    return square.clamp_min(torch.finfo(square.dtype).tiny).sqrt()


class PersonLoss:
    """J per batch entry (larger = further from the person), for one method; call it with the surrogates'
    embeddings of the masked faces. The convex hull's coefficients are kept between calls to warm-start the
    solver (Algorithm 2, line 3, re-solved at every step), and its time is counted."""

    def __init__(self, method: str, ensemble: Ensemble, clean: Embeddings, layout: Layout,
                 diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
                 activations: ActivationRecorder | None = None):
        if method not in (*SUBSPACE_METHODS, "gd-uap"):
            raise ValueError(f"no loss for method {method!r}")
        if method == "gd-uap" and activations is None:
            raise ValueError("gd-uap needs an ActivationRecorder")
        self.method, self.ensemble, self.clean, self.layout = method, ensemble, clean, layout
        self.diversity_weight = diversity_weight
        self.activations = activations
        self.alpha: dict[str, torch.Tensor] = {}
        self.hull_seconds = 0.0
        self.hull_calls = 0
        if method == "opom-convex":
            _warm_up_hull_solver()

    def __call__(self, emb: Embeddings, _step: int = 0) -> torch.Tensor:
        total = 0
        for name, weight in self.ensemble.weights.items():
            l2 = self.ensemble.metric(name) == "l2"
            term = self.identity_term(name, emb[name], l2) if self.method != "gd-uap" else self.activation_term(name)
            if self.layout.masks > 1 and self.diversity_weight > 0:
                term = term + self.diversity_weight * self.diversity_term(emb[name], l2)
            total = total + weight * term
        return total

    def objective(self, emb: Embeddings, step: int) -> torch.Tensor:
        """What the core minimises: -J per entry."""
        return -self(emb, step)

    def identity_term(self, name: str, queries: torch.Tensor, l2: bool) -> torch.Tensor:
        members = self.clean[name]
        face = self.layout.face_index
        if self.method == "opom-convex":
            start = time.perf_counter()
            hull = convex_hull_distance(queries, members, alpha_init=self.alpha.get(name), normalise=not l2)
            self.hull_seconds += time.perf_counter() - start
            self.hull_calls += 1
            self.alpha[name] = hull.alpha
            distance = hull.distance
        elif self.method == "opom-affine":
            distance = affine_hull_distance(queries, members, normalise=not l2)
        elif self.method == "opom-center":
            distance = class_centre_distance(queries, members, normalise=not l2)
        elif self.method == "fi-uap-plus":
            distance = point_distance(queries[:, None], members[None], not l2).mean(-1)
        else:  # fi-uap, fi-uap-all: each masked image against its own clean feature
            distance = point_distance(queries, members[face], not l2)
        return distance / L2_SCALE if l2 else distance

    def diversity_term(self, queries: torch.Tensor, l2: bool) -> torch.Tensor:
        """Per entry (m, i): mean over the other masks m' of ||f(X_i + Delta_m) - f(X_i + Delta_m')|| (Eq. 19)."""
        n_m, n_k = self.layout.masks, self.layout.faces
        per_mask = queries.reshape(n_m, n_k, -1)
        pairwise = point_distance(per_mask[:, None], per_mask[None], not l2)  # [n_M, n_M, n_k]
        spread = pairwise.sum(1) / (n_m - 1)  # the diagonal is 0
        spread = spread / L2_SCALE if l2 else spread
        return spread.reshape(-1)

    def activation_term(self, name: str) -> torch.Tensor:
        """GD-UAP (Eq. 16): sum over layers of log ||l_j(X_i + Delta)|| per entry, from the recorded forward pass."""
        assert self.activations is not None
        return self.activations.log_norms(name)

    @property
    def hull_ms_per_step(self) -> float | None:
        if not self.hull_calls:
            return None
        return 1e3 * self.hull_seconds / self.hull_calls * len(self.ensemble.names)


@functools.cache
def _warm_up_hull_solver() -> None:
    """The first linear solve of a process loads LAPACK (~1 s, once): do it before the solver is timed."""
    convex_hull_distance(torch.ones(1, 2), torch.eye(2))


# ----------------------------------------------------------------------------------------------- GD-UAP layers

# The activations GD-UAP maximises: after each non-linearity (ReLU / PReLU modules, including the TF.js loader's
# own PReLU module) and, for ResNets whose non-linearities are functional, after each residual block (dlib).
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.LeakyReLU)
_ACTIVATION_NAMES = ("_PRelu", "ResidualUnit")


def activation_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules()
              if isinstance(m, _ACTIVATION_MODULES) or type(m).__name__ in _ACTIVATION_NAMES]
    if not layers:
        from faceveil.attacks.core import is_conv

        layers = [m for m in model.modules() if is_conv(m)]  # no activation modules: the conv outputs
    return layers


class ActivationRecorder:
    """Forward hooks on each surrogate's activation layers, active inside `recording()`; `log_norms(name)` turns
    the last forward pass of that model into sum_j log ||l_j|| per sample and clears it."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in ensemble.names}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for name, model in self.ensemble.models.items():
            for layer in activation_layers(model):
                handles.append(layer.register_forward_hook(self._hook(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for outputs in self.outputs.values():
                outputs.clear()

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name].append(output)
        return hook

    def log_norms(self, name: str) -> torch.Tensor:
        outputs, self.outputs[name] = self.outputs[name], []
        if not outputs:
            raise RuntimeError(f"no activations recorded for {name}")
        norms = [o.flatten(1).norm(dim=1).clamp_min(1e-12).log() for o in outputs]
        return torch.stack(norms).sum(0)


# ----------------------------------------------------------------------------------------------- learners


def _initial_masks(layout: Layout, cfg: AttackConfig) -> torch.Tensor | None:
    """Delta_0 for the core. Diverse masks always start at different random points (from one common start
    every mask would get the same gradient and stay identical); otherwise the core's own start."""
    if layout.masks == 1 or cfg.random_start:
        return None
    gen = torch.Generator().manual_seed(cfg.seed + DIVERSE_INIT_SEED_OFFSET)
    shape = torch.Size((layout.masks, 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE))
    return random_init(shape, cfg.norm, cfg.eps, gen)


def _attack_masks(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
                  progress: bool, method: str) -> MaskResult:
    """The subspace / FI-UAP / GD-UAP methods: one shared-perturbation run of the attack core."""
    layout = Layout(len(batch), options.masks)
    expanded = layout.expand(batch)
    recorder = ActivationRecorder(ensemble) if method == "gd-uap" else None
    clean = clean_embeddings(batch, ensemble)
    loss = PersonLoss(method, ensemble, clean, layout, options.diversity_weight, recorder)
    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        masks = run_attack(expanded, ensemble, loss.objective, cfg, delta=_initial_masks(layout, cfg),
                           progress=progress, owner=layout.owner)
    info: dict = {"steps": cfg.steps}
    if loss.hull_ms_per_step is not None:
        info["hull_solver_ms_per_step"] = loss.hull_ms_per_step
        info["hull_solves_per_step"] = layout.masks * layout.faces * len(ensemble.names)
    return MaskResult(masks, info)


def concat_batches(first: FaceBatch, second: FaceBatch) -> FaceBatch:
    """One FaceBatch of both batches' faces (regions zero-padded to a common size, as from_photos does)."""
    if first.quantise != second.quantise or set(first.crop_to_region) != set(second.crop_to_region):
        raise FaceveilError("the universal faces must be prepared like the person's (same mode and surrogates)")
    h = max(first.regions.shape[-2], second.regions.shape[-2])
    w = max(first.regions.shape[-1], second.regions.shape[-1])

    def pad(regions: torch.Tensor) -> torch.Tensor:
        return F.pad(regions, (0, w - regions.shape[-1], 0, h - regions.shape[-2]))

    return FaceBatch(torch.cat([pad(first.regions), pad(second.regions)]),
                     torch.cat([first.canonical_to_region, second.canonical_to_region]),
                     {g: torch.cat([m, second.crop_to_region[g]]) for g, m in first.crop_to_region.items()},
                     first.quantise, first.mask)


def _fi_uap_all(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
                progress: bool) -> MaskResult:
    everyone = batch if options.universal_faces is None else concat_batches(batch, options.universal_faces)
    result = _attack_masks(everyone, ensemble, cfg, options, progress, "fi-uap-all")
    return MaskResult(result.masks, {**result.info, "universal_faces": len(everyone) - len(batch)})


def _gap(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
         progress: bool) -> MaskResult:
    from faceveil.methods.opom.gap import train_gap

    return train_gap(batch, ensemble, cfg, options, progress)


def _subspace_learner(method: str) -> MaskLearner:
    def learner(batch, ensemble, cfg, options, progress=False):
        return _attack_masks(batch, ensemble, cfg, options, progress, method)
    return learner


for _name in ("opom-convex", "opom-affine", "opom-center", "fi-uap", "fi-uap-plus", "gd-uap"):
    register_method(_name, _subspace_learner(_name))
register_method("fi-uap-all", _fi_uap_all)
register_method("gap", _gap)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def objective_value(batch: FaceBatch, ensemble: Ensemble, masks: torch.Tensor, method: str,
                    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT) -> float:
    """The method's J (summed over faces and masks; larger = better protected) for given masks: what each learner
    increases. gap is judged by its loss, Eq. 17 (fi-uap); fi-uap-all by FI-UAP on the faces given."""
    method = {"gap": "fi-uap", "fi-uap-all": "fi-uap"}.get(method, method)
    layout = Layout(len(batch), masks.shape[0])
    expanded = layout.expand(batch)
    recorder = ActivationRecorder(ensemble) if method == "gd-uap" else None
    loss = PersonLoss(method, ensemble, clean_embeddings(batch, ensemble), layout, diversity_weight, recorder)
    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        emb = perturbed_embeddings(expanded, ensemble, masks[layout.owner])
        return float(loss(emb).sum())
