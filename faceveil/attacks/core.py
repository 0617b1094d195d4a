"""The shared optimisation core: an ensemble of surrogate recognisers, each seeing its own crop of the same
canonical-space perturbation, and one iterative loop (I-FGSM / PGD with optional momentum, input diversity,
DFANet feature dropout, L-inf or L2 budget) that every method composes with its own objective."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from faceveil.attacks.diversity import input_diversity, translation_invariant
from faceveil.attacks.faces import FaceBatch, Regions
from faceveil.attacks.losses import feature_distance
from faceveil.attacks.norms import descend, descend_map, momentum_descend, momentum_update, random_init
from faceveil.attacks.perceptual import SsimBudget, texture_budget
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.models import zoo

Embeddings = dict[str, torch.Tensor]  # model name -> [B, D]


class Ensemble:
    """Surrogate recognisers with weights; `embed` crops each model's view of the perturbed regions."""

    def __init__(self, names: list[str], weights: list[float] | None = None):
        if not names:
            raise ValueError("an ensemble needs at least one surrogate")
        self.names = list(names)
        self.models = {n: zoo.load(n) for n in names}
        w = weights or [1.0] * len(names)
        self.weights = {n: float(x) / sum(w) for n, x in zip(names, w, strict=True)}

    @property
    def geometries(self) -> list[str]:
        return sorted({m.spec.geometry for m in self.models.values()})

    def embed(self, batch: FaceBatch, regions: Regions, diversity: float = 0.0,
              generator: torch.Generator | None = None, jitter: float = 0.0,
              transforms: tuple[str, ...] = ("resize",), only: list[str] | None = None,
              zoom: float = 0.0) -> Embeddings:
        """Each surrogate's embedding [B, D] of its crop (`only`: these surrogates, e.g. a stochastic ensemble's
        draw); with a generator, through alignment jitter (`jitter` crop pixels, `zoom` extra relative scale) and
        input diversity."""
        out = {}
        chosen = {n: m for n, m in self.models.items() if only is None or n in only}
        for geometry in sorted({m.spec.geometry for m in chosen.values()}):
            crops = batch.crops(regions, geometry, jitter, generator, zoom)
            for name, model in chosen.items():
                if model.spec.geometry != geometry:
                    continue
                view = (input_diversity(crops, diversity, generator, transforms=transforms)
                        if generator is not None else crops)
                out[name] = model(view.contiguous())
        return out

    def metric(self, name: str) -> str:
        return self.models[name].spec.metric

    def draw(self, count: int, generator: torch.Generator) -> list[str]:
        """`count` surrogates drawn without replacement (a stochastic ensemble's members for one iteration); all of
        them when count is 0 or at least the ensemble's size."""
        if count <= 0 or count >= len(self.names):
            return list(self.names)
        order = torch.randperm(len(self.names), generator=generator)[:count].tolist()
        return [self.names[i] for i in sorted(order)]



# measured on branch person (64 LFW faces, docs/research/person-masks.md)
FACENET_VGG_DROPOUT = 0.05
FACENET_CASIA_DROPOUT = 0.1

# dlib's L2 distances are on another scale than cosine distances: divide by its decision distance (0.6).
L2_SCALE = 0.6


def on_cosine_scale(distance: torch.Tensor, metric: str) -> torch.Tensor:
    """A model's distance on the scale of a cosine distance (1 - cos): an L2 model's (dlib's) over L2_SCALE."""
    return distance / L2_SCALE if metric == "l2" else distance


def part_weights(weights: dict[str, float], names: Iterable[str] | None = None) -> dict[str, float]:
    """The weights of the surrogates `names` (None: all), renormalised to sum 1 when they are a part of the ensemble
    (a stochastic ensemble's draw)."""
    if names is None:
        return weights
    chosen = set(names)
    if chosen >= set(weights):
        return weights
    total = sum(w for n, w in weights.items() if n in chosen)
    return {n: w / total for n, w in weights.items() if n in chosen}


def weighted_sum(ensemble: Ensemble, term: Callable[[str], torch.Tensor],
                 names: Iterable[str] | None = None) -> torch.Tensor:
    """Sum over the ensemble's models of weight x term(model name): how every ensemble loss is combined; with
    `names` (a stochastic ensemble's draw: the embeddings at hand), over those, their weights renormalised."""
    total: torch.Tensor | float = 0
    for name, weight in part_weights(ensemble.weights, names).items():
        total = total + weight * term(name)
    assert isinstance(total, torch.Tensor)  # an ensemble has at least one model
    return total


def weighted_distance(ensemble: Ensemble, distance: Callable[[str, str], torch.Tensor],
                      names: Iterable[str] | None = None) -> torch.Tensor:
    """The ensemble's weighted distance: sum of weight x distance(model name, its metric), each model's distance put
    on the cosine scale (`on_cosine_scale`), so that models of both metrics are comparable."""
    return weighted_sum(ensemble, lambda name: on_cosine_scale(distance(name, ensemble.metric(name)),
                                                               ensemble.metric(name)), names)


def ensemble_distance(ensemble: Ensemble, emb: Embeddings, reference: Embeddings) -> torch.Tensor:
    """Weighted feature distance D_f [B] between two sets of ensemble embeddings, comparable across metrics."""
    return weighted_distance(ensemble, lambda name, metric: feature_distance(
        emb[name], reference[name], "l2" if metric == "l2" else "cosine"), list(emb))


def pairwise_ensemble_distance(ensemble: Ensemble, emb: Embeddings, reference: Embeddings) -> torch.Tensor:
    """All-pairs weighted feature distance [B, R] between two sets of ensemble embeddings, on the scale of
    `ensemble_distance` (1 - cos; dlib's L2 over L2_SCALE)."""

    def distance(name: str, metric: str) -> torch.Tensor:
        score = zoo.score_matrix(metric, emb[name], reference[name])  # L2 models score -distance
        return -score if metric == "l2" else 1 - score

    return weighted_distance(ensemble, distance, list(emb))


@contextlib.contextmanager
def feature_dropout(models: list[nn.Module], p: float, generator: torch.Generator) -> Iterator[None]:
    """DFANet (Zhong & Deng 2020): dropout on the surrogates' intermediate conv features during the attack,
    an implicit ensemble of many thinned models. Seeded, and removed when the context ends."""
    if p <= 0:
        yield
        return

    def hook(_module, _inputs, output):
        keep = (torch.rand(output.shape, generator=generator) >= p).to(output.dtype)
        return output * keep / (1 - p)

    handles = [m.register_forward_hook(hook) for model in models for m in model.modules() if is_conv(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# DFANet dropout rates at which each recogniser still recognises: the largest rate tried (0.005, 0.01, 0.02, 0.05,
# 0.1, 0.15, 0.2, 0.3) at which the embedding of a clean face with dropout still matches the same face without it, at
# the model's LFW threshold, for >= 95 % of 64 LFW faces (docs/research/person-masks.md; the first six measured on
# branch protection). One rate for all is wrong: OPOM's 0.1 leaves faceres, faceres-deep, mfn512 and mfn192
# recognising almost nobody (the attack would then optimise against noise), while dlib shrugs off 0.15.
CALIBRATED_DROPOUT: dict[str, float] = {"mobileface": 0.05, "faceres": 0.01, "faceres-deep": 0.005, "dlib": 0.15,
                                        "mfn512": 0.02, "mfn192": 0.02, "facenet-vgg": FACENET_VGG_DROPOUT,
                                        "facenet-casia": FACENET_CASIA_DROPOUT}


def calibrated_dropout() -> tuple[tuple[str, float], ...]:
    """AttackConfig.model_dropout with every zoo model at its calibrated rate."""
    return tuple(sorted(CALIBRATED_DROPOUT.items()))


def dropout_setting(dropout: float | str) -> tuple[float, tuple[tuple[str, float], ...]]:
    """A user's dropout (a rate, or "calibrated") -> (AttackConfig.dropout, AttackConfig.model_dropout)."""
    if str(dropout).strip().lower() == "calibrated":
        return 0.0, calibrated_dropout()
    try:
        rate = float(dropout)
    except ValueError:
        raise FaceveilError(f"dropout takes a rate in [0, 1) or 'calibrated', got {dropout!r}") from None
    if not 0 <= rate < 1:
        raise FaceveilError(f"dropout must be in [0, 1) (or 'calibrated'), got {dropout}")
    return rate, ()


@contextlib.contextmanager
def surrogate_dropout(ensemble: Ensemble, cfg: AttackConfig, generator: torch.Generator) -> Iterator[None]:
    """DFANet dropout on every surrogate at its own rate (cfg.model_dropout; cfg.dropout for the others). With one
    rate for all, the same hooks and random stream as feature_dropout over all the models."""
    rates = dict(cfg.model_dropout)
    with contextlib.ExitStack() as stack:
        for name, model in ensemble.models.items():
            stack.enter_context(feature_dropout([model], rates.get(name, cfg.dropout), generator))
        yield


def is_conv(module: nn.Module) -> bool:
    """A convolution layer: torch's Conv2d, or a converted graph's own conv module (e.g. the TF.js loader's), which
    holds a 4-D kernel as its `weight` parameter."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Conv2d) or (isinstance(weight, torch.Tensor) and weight.dim() == 4)


@dataclass
class AttackConfig:
    eps: float = 8 / 255
    alpha: float = 1.5 / 255
    steps: int = 50
    norm: str = "linf"
    momentum: float = 0.0  # mu of MI-FGSM; 0 = plain I-FGSM
    diversity: float = 0.0  # probability of the DI transform
    diversity_transforms: tuple[str, ...] = ("resize",)  # DI transforms (attacks.diversity.DI_TRANSFORMS)
    dropout: float = 0.0  # DFANet feature dropout rate
    model_dropout: tuple[tuple[str, float], ...] = ()  # per-surrogate rates overriding `dropout` (calibrated_dropout)
    jitter: float = 0.0  # alignment jitter (crop pixels) averaged over, so masks survive re-detection
    smoothing: int = 0  # TI: odd Gaussian kernel size (canonical pixels) the gradient is smoothed with; 0 = off
    random_start: bool = False
    seed: int = 0
    # the perceptual budget (attacks.perceptual): "texture" shapes the L-inf budget per pixel by the clean face's
    # texture (eps and alpha are its face-area means); ssim_target / psnr_floor > 0 project every perturbation onto
    # face-area SSIM >= target / PSNR >= floor after each step
    budget: str = "linf"  # linf | texture
    ssim_target: float = 0.0
    psnr_floor: float = 0.0
    # transfer levers (docs/research/protection.md measures each on and off)
    ssim_penalty: bool = False  # also the adaptive SSIM hinge in the step (SsimBudget.hinge; needs ssim_target)
    sample_surrogates: int = 0  # > 0: a stochastic ensemble, this many surrogates drawn per iteration
    zoom: float = 0.0  # alignment variation: extra relative crop-scale range (other aligners' margins)


Objective = Callable[[Embeddings, int], torch.Tensor]  # (embeddings, step) -> per-face loss [B], minimised
# (perturbed regions [B,3,h,w], step) -> per-face loss [B], minimised: terms on the image itself (naturalness)
ImageTerm = Callable[[Regions, int], torch.Tensor]
StepHook = Callable[[int, torch.Tensor], None]  # (step, current delta)
StepListener = Callable[[int, int], None]  # (steps done, steps in all) of the attack running now

# Who hears each optimisation step (a job's progress bar): set by `listening`, per thread/context, so that a method
# reports its steps without a progress argument threaded through every method.
_STEP_LISTENER: contextvars.ContextVar[StepListener | None] = contextvars.ContextVar("step_listener", default=None)


@contextlib.contextmanager
def listening(listener: StepListener) -> Iterator[None]:
    """Every `run_attack` step inside the block calls listener(steps done, steps in all)."""
    token = _STEP_LISTENER.set(listener)
    try:
        yield
    finally:
        _STEP_LISTENER.reset(token)


def run_attack(batch: FaceBatch, ensemble: Ensemble, objective: Objective, cfg: AttackConfig,
               delta: torch.Tensor | None = None, progress: bool = False,
               on_step: StepHook | None = None, before_step: StepHook | None = None,
               image_term: ImageTerm | None = None, owner: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise `objective` (+ `image_term`) over a canonical perturbation within the budget; returns delta
    [B,3,256,256]. `before_step` sees the iterate before each gradient, so a method can re-decide what the
    objective aims at (e.g. TIP-IM's per-iteration target choice); `on_step` sees it after each update.

    Shared (universal) perturbations: with `owner` [B] (long, values 0..M-1), delta is [M,3,256,256] and face i
    sees delta[owner[i]]; each mask's gradient is the sum over its faces, and momentum, the step and the
    projection act per mask (OPOM's person masks: one mask shared by all of a person's images)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    count = len(batch) if owner is None else shared_count(owner)
    shape = (count, 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE)
    budget_map = budget_map_of(batch, cfg, owner)
    if delta is None:
        delta = random_init(torch.Size(shape), cfg.norm, cfg.eps, gen) if cfg.random_start else torch.zeros(shape)
        if budget_map is not None:
            delta = delta * budget_map
    visibility = visibility_budget(batch, cfg, owner)
    velocity = None
    with surrogate_dropout(ensemble, cfg, gen):
        for step in tqdm(range(cfg.steps), desc="optimise", disable=not progress, leave=False):
            if before_step is not None:
                before_step(step, delta)
            grad = loss_gradient(batch, ensemble, objective, delta, step, cfg, gen, image_term, owner, visibility)
            delta, velocity = momentum_step(delta, velocity, grad, cfg, budget_map)
            if visibility is not None:  # one measurement a step; the last iterate gets the full projection
                delta = visibility(delta, rounds=None if step == cfg.steps - 1 else 1)
            if on_step is not None:
                on_step(step, delta)
            if (listener := _STEP_LISTENER.get()) is not None:
                listener(step + 1, cfg.steps)
    return delta.detach()


def budget_map_of(batch: FaceBatch, cfg: AttackConfig, owner: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-pixel budget map of cfg.budget ([B or M,3,256,256], face-area mean 1), or None for a uniform one."""
    if cfg.budget == "linf":
        return None
    if cfg.budget != "texture":
        raise ValueError(f"unknown budget {cfg.budget!r} (linf or texture)")
    if cfg.norm != "linf":
        raise ValueError("the texture budget map shapes an L-inf budget")
    return texture_budget(batch.canonical(batch.regions), owner)


def visibility_budget(batch: FaceBatch, cfg: AttackConfig, owner: torch.Tensor | None = None) -> SsimBudget | None:
    """The SSIM / PSNR projection of cfg (None when neither is asked for)."""
    if cfg.ssim_target <= 0 and cfg.psnr_floor <= 0:
        return None
    return SsimBudget(batch, cfg.ssim_target, cfg.psnr_floor, owner)


def momentum_step(delta: torch.Tensor, velocity: torch.Tensor | None, grad: torch.Tensor, cfg: AttackConfig,
                  budget_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(delta, velocity) after one step on `grad`, with MI-FGSM momentum when cfg.momentum > 0 (`grad` is the
    caller's to give away: it may become the velocity). With a budget map, the step and the budget are per pixel
    (alpha and eps times the map)."""
    if budget_map is not None:
        velocity = momentum_update(velocity, grad, cfg.momentum) if cfg.momentum > 0 else grad
        return descend_map(delta, velocity, cfg.alpha * budget_map, cfg.eps * budget_map), velocity
    if cfg.momentum > 0:
        return momentum_descend(delta, velocity, grad, cfg.momentum, cfg.alpha, cfg.norm, cfg.eps)
    return candidate_step(delta, grad, cfg), velocity


def candidate_step(delta: torch.Tensor, grad: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """One normalised descent step, projected onto the budget (Eq. 5 of TIP-IM without momentum)."""
    return descend(delta, grad, cfg.alpha, cfg.norm, cfg.eps)


def shared_count(owner: torch.Tensor) -> int:
    """How many shared perturbations an `owner` index [B] refers to (every one must own at least one face)."""
    if owner.dtype != torch.long or owner.dim() != 1 or owner.numel() == 0 or int(owner.min()) < 0:
        raise ValueError("owner must be a non-empty 1-D long index of values 0..M-1")
    count = int(owner.max()) + 1
    if len(owner.unique()) != count:
        raise ValueError("owner must give every one of its M perturbations at least one face")
    return count


def loss_gradient(batch: FaceBatch, ensemble: Ensemble, objective: Objective, delta: torch.Tensor, step: int,
                  cfg: AttackConfig, gen: torch.Generator, image_term: ImageTerm | None = None,
                  owner: torch.Tensor | None = None, visibility: SsimBudget | None = None) -> torch.Tensor:
    """d(objective)/d(delta); with `owner`, delta is [M,...] and each mask's gradient sums over its faces. With
    cfg.ssim_penalty and a visibility budget, the SSIM hinge's gradient joins, each part normalised per face."""
    d = delta.detach().requires_grad_(True)
    regions = batch.pasted(d if owner is None else d[owner])
    varied = cfg.diversity > 0 or cfg.jitter > 0 or cfg.zoom > 0
    only = ensemble.draw(cfg.sample_surrogates, gen) if cfg.sample_surrogates > 0 else None
    emb = ensemble.embed(batch, regions, cfg.diversity, gen if varied else None, cfg.jitter,
                         cfg.diversity_transforms, only, cfg.zoom)
    loss = objective(emb, step)
    if image_term is not None:
        loss = loss + image_term(regions, step)
    hinge_grad = None
    if cfg.ssim_penalty and visibility is not None and visibility.target > 0 and owner is None:
        hinge = visibility.hinge(regions)
        if bool((hinge > 0).any()):
            (hinge_grad,) = torch.autograd.grad(hinge.sum(), d, retain_graph=True)
    (grad,) = torch.autograd.grad(loss.sum(), d)
    if hinge_grad is not None:
        weight = visibility.weight.view(-1, *([1] * (grad.dim() - 1)))
        grad = per_face_unit(grad) + weight * per_face_unit(hinge_grad)
    return translation_invariant(grad, cfg.smoothing)


def per_face_unit(g: torch.Tensor) -> torch.Tensor:
    """g over each face's mean |g| (faces whose gradient is all zero stay zero)."""
    return g / g.abs().flatten(1).mean(dim=1).clamp_min(1e-20).view(-1, *([1] * (g.dim() - 1)))


def loss_gradients(batch: FaceBatch, ensemble: Ensemble, objectives: list[Objective], delta: torch.Tensor,
                   step: int, smoothing: int = 0) -> list[torch.Tensor]:
    """Gradients of several objectives at the same iterate, from one forward pass (no diversity): the
    activations are shared, only the backward passes differ (e.g. one per candidate target). `smoothing`: TI's
    kernel size, as AttackConfig.smoothing."""
    d = delta.detach().requires_grad_(True)
    emb = ensemble.embed(batch, batch.pasted(d))
    grads = []
    for i, objective in enumerate(objectives):
        (grad,) = torch.autograd.grad(objective(emb, step).sum(), d, retain_graph=i < len(objectives) - 1)
        grads.append(translation_invariant(grad, smoothing))
    return grads


@torch.no_grad()
def perturbed_embeddings(batch: FaceBatch, ensemble: Ensemble, delta: torch.Tensor,
                         chunk: int | None = None) -> Embeddings:
    """What the surrogates see of the faces with `delta` pasted in (no diversity, no gradient), at most `chunk`
    faces per forward pass (many candidates at once run faster batched, but photo regions can be large)."""
    chunk = chunk or len(batch)
    parts = []
    for start in range(0, len(batch), chunk):
        index = torch.arange(start, min(start + chunk, len(batch)))
        part = batch if len(index) == len(batch) else batch.take(index)
        parts.append(ensemble.embed(part, part.pasted(delta[index])))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@torch.no_grad()
def clean_embeddings(batch: FaceBatch, ensemble: Ensemble) -> Embeddings:
    return ensemble.embed(batch, batch.regions)
