"""TIP-IM (Yang et al., ICCV 2021 / arXiv 2003.06814): targeted identity-protection iterative method.

Per face, minimise the relative identity loss towards one of several target identities plus a naturalness term,

    L = D_f(x_p, x_t) - D_f(x_p, x_r) + gamma * MMD(X_p, X_r)                       (Eq. 2 and 4)

with normalised, projected, momentum steps (Eq. 5, the attack core), choosing x_t afresh at every iteration by
greedy insertion (Algorithm 1): for every candidate target take one plain normalised step of L_iden (no momentum,
no MMD: Algorithm 1 line 5), score the candidate image with the gain G, keep the target of the best candidate.

    G  (x) = log(1 + max_t exp(D_f(x, x_r) - D_f(x, x_t)))     paper Eq. 7 (arXiv Eq. 9): the nearest target
    G1 (x) = log(1 + sum_t exp(...))                           Center-Opt / TIP-IM-G1: towards the targets' centre
    G2 (x) = log(1 + min_t exp(...))                           TIP-IM-G2 (arXiv §5.1): the farthest target
    rand                                                        TIP-IM-Rand: a uniformly random target each step

The max/min/sum run over the face's whole candidate set (not only the candidate's own target), as the paper writes.

D_f over an ensemble is the weighted mean of each surrogate's distance (1 - cos; dlib's L2 over its 0.6 decision
distance), as in pgd.py. A target identity with several faces is compared through its centre embedding.

MMD batch: the paper makes a batch of ~50 images; for one image it suggests self-augmentation. Here every face gets
its own batch: N random projective views (rotation, scale, shift, perspective, brightness) of its face area,
the same N transforms for the protected and the original face, drawn once per run from the seed. So X_p = {T_n(x_p)},
X_r = {T_n(x_r)}, and the Gaussian-kernel MMD (losses.gaussian_mmd) compares the two view sets; faces in one photo
never influence each other. The MMD is divided by the MMD that full-budget random sign noise would give, so gamma
is scale-free (the raw value is ~1e-3 of L_iden's scale and would never change a sign step at the paper's gamma
0..3). Measured on a sample face (20 steps, eps 8): PSNR of the face area 31.2 / 33.0 / 34.4 dB at gamma 0 / 1 / 3,
with the white-box similarity to the original rising 0.42 / 0.52 / 0.67 (the paper's trade-off, Table 5).

The authors' public code differs from the paper in places (momentum inside the candidate step, and the chosen
candidate adopted as the next iterate); this follows the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faceveil.attacks.core import (
    AttackConfig,
    Embeddings,
    Ensemble,
    ImageTerm,
    Objective,
    candidate_step,
    clean_embeddings,
    ensemble_distance,
    loss_gradients,
    perturbed_embeddings,
    run_attack,
)
from faceveil.attacks.diversity import projective_views, random_homographies
from faceveil.attacks.faces import FaceBatch, Regions
from faceveil.attacks.losses import gaussian_mmd
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.methods.base import ImageMethod, MethodOptions, Perturbation
from faceveil.methods.targets import DEFAULT_MAX_TARGETS, FaceTargets, TargetSet

GAINS = ("g", "g1", "g2", "rand")
# Naturalness off by default, as in the authors' code: protection first; users trade it with --gamma.
DEFAULT_GAMMA = 0.0
MMD_VIEWS = 32  # views per face; the paper's batch study (Appendix B) settles from ~50 images, views cost no network
MMD_VIEW_SIZE = 112
# Seeds of the method's own random streams, apart from the core's (which uses cfg.seed itself).
MMD_SEED_OFFSET = 1009
RANDOM_TARGET_SEED_OFFSET = 2003
CANDIDATE_CHUNK = 16  # candidate images per forward pass in greedy insertion

@dataclass
class TipImOptions:
    gamma: float = DEFAULT_GAMMA
    gain: str = "g"  # g | g1 | g2 | rand
    max_targets: int = DEFAULT_MAX_TARGETS
    mmd_views: int = MMD_VIEWS


def relative_identity_loss(ensemble: Ensemble, emb: Embeddings, original: Embeddings,
                           target: Embeddings) -> torch.Tensor:
    """L_iden = D_f(x_p, x_t) - D_f(x_p, x_r) per face (Eq. 2)."""
    return ensemble_distance(ensemble, emb, target) - ensemble_distance(ensemble, emb, original)


def gain(margins: torch.Tensor, kind: str) -> torch.Tensor:
    """G over the last axis of margins D_f(x, x_r) - D_f(x, x_t) (one per target); log(1 + exp(.)) = softplus."""
    if kind == "g":
        return F.softplus(margins.max(dim=-1).values)
    if kind == "g1":
        return F.softplus(torch.logsumexp(margins, dim=-1))
    if kind == "g2":
        return F.softplus(margins.min(dim=-1).values)
    raise ValueError(f"unknown gain {kind!r} ({', '.join(GAINS)})")


def target_margins(ensemble: Ensemble, emb: Embeddings, original: Embeddings,
                   candidates: Embeddings) -> torch.Tensor:
    """[B, K]: D_f(x, x_r) - D_f(x, x_t) for every candidate target; candidates model -> [B, K, D]."""
    k = next(iter(candidates.values())).shape[1]
    spread = {name: e.unsqueeze(1).expand(-1, k, -1) for name, e in emb.items()}
    return ensemble_distance(ensemble, emb, original).unsqueeze(1) - ensemble_distance(ensemble, spread, candidates)


class TargetChoice:
    """Which candidate (0..K-1) each face aims at this iteration, and the history of choices (identity indices)."""

    def __init__(self, targets: FaceTargets, first: torch.Tensor | None = None):
        self.targets = targets
        self.choice = torch.zeros(targets.index.shape[0], dtype=torch.long) if first is None else first
        self.history: list[torch.Tensor] = []

    def decide(self, step: int, delta: torch.Tensor) -> torch.Tensor:
        return self.choice  # fixed target

    def __call__(self, step: int, delta: torch.Tensor) -> None:
        self.choice = self.decide(step, delta)
        self.history.append(self.targets.identity_index(self.choice))


class GreedyInsertion(TargetChoice):
    """Algorithm 1: the candidate target whose one-step candidate image has the largest gain G."""

    def __init__(self, batch: FaceBatch, ensemble: Ensemble, original: Embeddings, targets: FaceTargets,
                 cfg: AttackConfig, kind: str):
        super().__init__(targets)
        if kind not in ("g", "g1", "g2"):
            raise ValueError(f"greedy insertion needs a gain g, g1 or g2, got {kind!r}")
        self.batch, self.ensemble, self.original, self.cfg, self.kind = batch, ensemble, original, cfg, kind
        b, k = targets.index.shape
        self.face = torch.arange(b).repeat(k)  # candidate i*B + f is face f stepping towards its candidate i
        self.pairs = batch.take(self.face)

    def gains(self, step: int, delta: torch.Tensor) -> torch.Tensor:
        """[B, K]: G of the candidate image x_hat = Proj(x_p - alpha * Normalize(grad L_iden(x_t_k, x_p)))."""
        b, k = self.targets.index.shape
        objectives = [self._toward(i) for i in range(k)]
        grads = loss_gradients(self.batch, self.ensemble, objectives, delta, step, self.cfg.smoothing)
        # all K*B candidates through the surrogates in a few batched passes
        candidates = torch.cat([candidate_step(delta, grad, self.cfg) for grad in grads])
        emb = perturbed_embeddings(self.pairs, self.ensemble, candidates, CANDIDATE_CHUNK)
        original = {name: e[self.face] for name, e in self.original.items()}
        every_target = {name: e[self.face] for name, e in self.targets.embeddings.items()}
        gains = gain(target_margins(self.ensemble, emb, original, every_target), self.kind)
        return gains.view(k, b).T

    def _toward(self, k: int) -> Objective:
        target = self.targets.chosen(torch.full((self.targets.index.shape[0],), k, dtype=torch.long))
        return lambda emb, _step: relative_identity_loss(self.ensemble, emb, self.original, target)

    def decide(self, step: int, delta: torch.Tensor) -> torch.Tensor:
        return self.gains(step, delta).argmax(dim=1)  # first of equal gains, as Algorithm 1's strict '>'


class RandomTarget(TargetChoice):
    """TIP-IM-Rand: a uniformly random candidate per face and iteration (seeded)."""

    def __init__(self, targets: FaceTargets, seed: int):
        super().__init__(targets)
        self.generator = torch.Generator().manual_seed(seed + RANDOM_TARGET_SEED_OFFSET)

    def decide(self, step: int, delta: torch.Tensor) -> torch.Tensor:
        return torch.randint(self.targets.count, (self.targets.index.shape[0],), generator=self.generator)


class MMDNaturalness:
    """gamma * MMD(X_p, X_r) / MMD_noise per face over N self-augmented views of its face area (see the module
    docstring). MMD_noise is the MMD that full-budget random sign noise would give that face: it makes gamma
    scale-free (gamma = 1: such noise costs as much as one unit of relative identity loss). Unnormalised, the
    kernel MMD between a face and its perturbed copy is ~1e-3 of L_iden's scale and its gradient would not
    change a single sign step at any gamma the paper uses (0..3)."""

    def __init__(self, batch: FaceBatch, gamma: float, views: int, seed: int, eps: float):
        gen = torch.Generator().manual_seed(seed + MMD_SEED_OFFSET)
        self.batch, self.gamma = batch, gamma
        self.homographies = random_homographies(views, gen)
        self.brightness = 1 + (torch.rand(views, generator=gen) * 2 - 1) * 0.2
        self.real = self.views(batch.regions).detach()
        signs = torch.randint(0, 2, (len(batch), 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE), generator=gen) * 2 - 1
        noise = eps * signs.float()
        with torch.no_grad():
            self.noise_mmd = self.mmd(batch.perturbed(noise)).clamp_min(1e-12)

    def mmd(self, regions: Regions) -> torch.Tensor:
        fake = self.views(regions)
        return torch.stack([gaussian_mmd(fake[b], self.real[b]) for b in range(len(fake))])

    def views(self, regions: Regions) -> torch.Tensor:
        # the face area (the perturbation mask's square) fills each view before the random warp
        extent = C.MASK_HALF_SIDE / (C.CANONICAL_SIZE / 2)
        return projective_views(self.batch.canonical(regions), self.homographies, MMD_VIEW_SIZE, extent,
                                self.brightness)

    def __call__(self, regions: Regions, step: int) -> torch.Tensor:
        return self.gamma * self.mmd(regions) / self.noise_mmd


def naturalness(batch: FaceBatch, options: TipImOptions, cfg: AttackConfig) -> MMDNaturalness | None:
    """The MMD image term, or None at gamma = 0 (then it costs nothing)."""
    return MMDNaturalness(batch, options.gamma, options.mmd_views, cfg.seed, cfg.eps) if options.gamma > 0 else None


def targeted_attack(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, original: Embeddings,
                    chooser: TargetChoice, image_term: ImageTerm | None = None,
                    progress: bool = False) -> Perturbation:
    """The core loop on L_iden towards the chooser's current target of each face (+ an image term)."""
    def objective(emb: Embeddings, _step: int) -> torch.Tensor:
        return relative_identity_loss(ensemble, emb, original, chooser.targets.chosen(chooser.choice))

    delta = run_attack(batch, ensemble, objective, cfg, progress=progress, before_step=chooser,
                       image_term=image_term)
    final = chooser.targets.identity_index(chooser.choice).tolist()
    return Perturbation(delta, final, [chooser.targets.names[i] for i in final], torch.stack(chooser.history))


def chooser_for(kind: str, batch: FaceBatch, ensemble: Ensemble, original: Embeddings, targets: FaceTargets,
                cfg: AttackConfig) -> TargetChoice:
    if kind == "rand":
        return RandomTarget(targets, cfg.seed)
    return GreedyInsertion(batch, ensemble, original, targets, cfg, kind)


def protect(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, target_set: TargetSet,
            options: TipImOptions | None = None, progress: bool = False) -> Perturbation:
    """TIP-IM on every face of the batch; the perturbation and each face's chosen target."""
    options = options or TipImOptions()
    original = clean_embeddings(batch, ensemble)
    targets = target_set.for_faces(original, options.max_targets)
    chooser = chooser_for(options.gain, batch, ensemble, original, targets, cfg)
    return targeted_attack(batch, ensemble, cfg, original, chooser, naturalness(batch, options, cfg), progress)


def options_for(name: str, options: MethodOptions) -> TipImOptions:
    """TIP-IM's options from a method's build options; Center-Opt is TIP-IM with the gain G1."""
    if options.gain not in GAINS:
        raise FaceveilError(f"gain takes {', '.join(GAINS)}, got {options.gain!r}")
    return TipImOptions(gamma=options.gamma, gain="g1" if name == "center-opt" else options.gain,
                        max_targets=options.max_targets)


def build(name: str, options: MethodOptions, target_set: TargetSet) -> ImageMethod:
    """The registry's builder of tip-im and center-opt."""
    tip_im_options = options_for(name, options)
    return lambda batch, ensemble, cfg: protect(batch, ensemble, cfg, target_set, tip_im_options)
