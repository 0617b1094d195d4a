"""AdvCloak's loss terms (Liu et al. 2023, §3.2.3), each a function of tensors.

Sign convention: G minimises L = L_GAN + lambda_norm L_norm + lambda_adv L_adv (Eq. 8-9) and D maximises L_GAN.
The paper's adversarial terms (Eq. 14-19) are feature distances that the generator must make LARGE, so
`generator_loss` enters them negated (AdvFaces, which the paper follows, minimises the cosine similarity: the
same thing up to a constant).

The distance l_d is that of the attack core (faceveil.attacks.core.ensemble_distance): per surrogate, the cosine
distance 1 - cos (dlib: L2 / 0.6), averaged with the ensemble weights. Towards a feature subspace (Eq. 16-19) the
distance of the normalised feature to the subspace comes from faceveil.attacks.subspace, as 1/2 ||q - h||^2, which
is 1 - cos again when the subspace is a single unit feature: the plain and the subspace losses share one scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faceveil.attacks import subspace as S
from faceveil.attacks.core import Embeddings, Ensemble, ensemble_distance, weighted_distance

SUBSPACES = ("none", *S.SUBSPACES)


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-(E log D(X) + E log(1 - D(X_adv))) (Eq. 10; Eq. 11 when the batch is n faces of each of P persons and
    the means are taken per person first, which for equal n is the same number): D minimises this."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G's part of Eq. 10 / 11: E log(1 - D(X_adv)) = -E softplus(logit), minimised by G."""
    return -F.softplus(fake_logits).mean()


def l2_norms(perturbations: torch.Tensor) -> torch.Tensor:
    """||delta||_2 of each perturbation [B, ...] -> [B]."""
    return perturbations.flatten(1).norm(dim=1)


def norm_loss(perturbations: torch.Tensor, eps: float) -> torch.Tensor:
    """E max(eps, ||delta||_2): Eq. 12 on image-wise perturbations G(X), Eq. 13 on person masks Delta^k. A hinge:
    no pull below eps, a unit pull on the norm above it."""
    return l2_norms(perturbations).clamp_min(eps).mean()


def image_adversarial_distance(ensemble: Ensemble, adversarial: Embeddings, clean: Embeddings) -> torch.Tensor:
    """l_d(f(X + G(X)), f(X)) per face [B] (Eq. 14 before the mean)."""
    return ensemble_distance(ensemble, adversarial, clean)


def class_adversarial_distance(ensemble: Ensemble, adversarial: Embeddings, clean: Embeddings, persons: int,
                               subspace: str = "none") -> torch.Tensor:
    """Distances [P, n] of each adversarial face X_i^k + Delta^k to its person's features: to its own clean
    feature (Eq. 15, subspace 'none'), or to the person's class centre (Eq. 18), affine hull (Eq. 17) or convex
    hull (Eq. 19) of the clean features of the n faces. Embeddings hold P*n faces, person-major."""
    if subspace == "none":
        return image_adversarial_distance(ensemble, adversarial, clean).view(persons, -1)

    def distance(name: str, metric: str) -> torch.Tensor:
        queries = adversarial[name].view(persons, -1, adversarial[name].shape[-1])
        members = clean[name].detach().view(persons, -1, clean[name].shape[-1])
        square = S.subspace_distance(queries, members, subspace, squared=True, normalise=metric != "l2").distance
        # dlib: raw features and the L2 distance (the core puts it on the decision scale); else 1/2 ||q - h||^2
        return square.clamp_min(1e-12).sqrt() if metric == "l2" else 0.5 * square

    return weighted_distance(ensemble, distance)


def generator_loss(gan: torch.Tensor, norm: torch.Tensor, adversarial_distance: torch.Tensor,
                   lambda_norm: float, lambda_adv: float) -> torch.Tensor:
    """Eq. 8 for G: L_GAN + lambda_norm L_norm - lambda_adv E l_d (the distance is to be maximised)."""
    return gan + lambda_norm * norm - lambda_adv * adversarial_distance.mean()
