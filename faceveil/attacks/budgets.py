"""Perturbation budgets measured and met exactly: scaling a pattern onto the boundary of its budget (a generator's
output, a mask compared at one norm), and the L2 norm of what a canonical mask actually pastes onto a face.
Projection INTO a budget during optimisation is faceveil.attacks.norms."""

from __future__ import annotations

import torch

from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError


def budget_size(masks: torch.Tensor, norm: str) -> torch.Tensor:
    """[B] each mask's size under the norm: L2 (||m||_2) or L-inf (max |m|)."""
    flat = masks.flatten(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    raise FaceveilError(f"unknown norm {norm!r} (l2 or linf)")


def rescale(masks: torch.Tensor, size: torch.Tensor, target: float) -> torch.Tensor:
    """Each mask times target / its size; a mask of size 0 stays zero."""
    factor = torch.where(size > 0, target / size.clamp_min(1e-12), torch.zeros_like(size))
    return masks * factor.view(-1, *([1] * (masks.dim() - 1)))


def scale_to_budget(masks: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Scale each mask [B, ...] so that its norm equals the budget: L2 -> ||m||_2 = eps, L-inf -> max |m| = eps."""
    return rescale(masks, budget_size(masks, norm), eps)


def pasted_l2(masks: torch.Tensor) -> torch.Tensor:
    """[n] L2 norm of what each canonical mask [n,3,256,256] pastes onto a face (the mask times the face mask), in
    canonical units: an L2 person mask's budget is measured on this, not on the whole canonical square."""
    return (masks * C.face_mask()).flatten(1).norm(dim=1)


def onto_pasted_l2(masks: torch.Tensor, eps: float) -> torch.Tensor:
    """Masks scaled so that `pasted_l2` equals eps (a zero mask stays zero). An L2 person mask is used at its
    budget: an optimiser's projection only bounds the norm of the whole square (part of which, its random start
    outside the face, is never pasted), and a generator's mean mask has whatever norm its faces give it."""
    return rescale(masks, pasted_l2(masks), eps)


def paste_l2(masks: torch.Tensor) -> torch.Tensor:
    """`pasted_l2` in [0, 1] units of the 112x112x3 face (canonical pixels are 1/CANONICAL_ZOOM of a 112-crop pixel
    per side): AdvCloak's measure (§4.3.1)."""
    return pasted_l2(masks) / C.CANONICAL_ZOOM


def scale_paste_l2(masks: torch.Tensor, l2_255: float) -> torch.Tensor:
    """Masks scaled so that `paste_l2` equals l2_255 / 255 (AdvCloak's normalisation of every method, §4.3.1)."""
    return onto_pasted_l2(masks, l2_255 / 255 * C.CANONICAL_ZOOM)
