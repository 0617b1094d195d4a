"""Perturbation norms: projections onto the L-inf / L2 ball, and the matching normalised step directions."""

from __future__ import annotations

import torch


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, norm: str, eps: float, in_place: bool = False) -> torch.Tensor:
    """Project each sample's perturbation onto the `norm` ball of radius eps (`in_place`: overwriting delta)."""
    if norm == "linf":
        return delta.clamp_(-eps, eps) if in_place else delta.clamp(-eps, eps)
    if norm == "l2":
        scale = (eps / _per_sample_norm(delta)).clamp(max=1.0)
        return delta.mul_(scale) if in_place else delta * scale
    raise ValueError(f"unknown norm {norm!r} (linf or l2)")


def normalise_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction for the norm: sign under L-inf, unit L2 under L2 (paper Eq. 5 'Normalize')."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _per_sample_norm(grad)
    raise ValueError(f"unknown norm {norm!r} (linf or l2)")


def descend(delta: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str, eps: float) -> torch.Tensor:
    """project(delta - alpha * normalise_step(grad)): the same values, in two fewer passes over the batch (the
    step direction is a new tensor, updated in place; -alpha * s + delta is delta - alpha * s exactly)."""
    stepped = normalise_step(grad, norm).mul_(-alpha).add_(delta)
    return project(stepped, norm, eps, in_place=True)


def momentum_update(velocity: torch.Tensor | None, grad: torch.Tensor, mu: float) -> torch.Tensor:
    """MI-FGSM: g_{t+1} = mu * g_t + grad / ||grad||_1 (per sample, mean-abs normalised)."""
    scaled = grad / grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return scaled if velocity is None else mu * velocity + scaled


def random_init(shape: torch.Size, norm: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Delta_0 ~ U(-eps, eps) under L-inf (OPOM), or a random direction of radius U(0, eps) under L2."""
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    d = torch.randn(shape, generator=generator)
    r = torch.rand(shape[0], generator=generator).view(-1, *([1] * (len(shape) - 1)))
    return d / _per_sample_norm(d) * r * eps
