"""Distances from query features to the feature subspace of an identity, as OPOM (Zhong & Deng, TPAMI 2022,
§3.2.1, Eq. 2-13) and AdvCloak (Eq. 17-19) maximise them: the class centre (mean of the members), the affine
hull (all affine combinations of the members) and the convex hull (all convex combinations).

Shapes: queries [..., B, D] and members [..., n, D]; the leading dimensions broadcast, so one member set
([n, D]) against a batch of queries ([B, D]) and P member sets ([P, n, D]) against P query batches ([P, B, D])
both work. Distances come back as [..., B], in the query dtype, differentiable with respect to the queries
(and the members). Internally the small n-dimensional problems are solved in float64 so that the convex-hull
optimum is exact to linear-algebra precision whatever the feature dtype: for unit features the squared
distance is within 1e-10 of the true minimum by construction of the tolerances below (measured: within
~1e-12), including duplicate, collinear and n > D + 1 members. Only members
closer together than ~1e-7 (below float32 resolution) lose accuracy, to about that separation times the
distance, because the solver works on the Gram matrix.

Padding a member set by repeating one of its members changes neither hull, so sets of different sizes can be
batched that way (the class centre does change).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Tolerances of the active-set solver, in units of the largest member norm (the problem is rescaled so that
# this norm is 1). They sit well above float64 rounding of an n <= ~50 KKT solve, so rounding cannot make the
# solver add and drop the same member forever, and well below anything that matters for a feature distance:
# the objective is within ~1e-10 of the true minimum.
PRIMAL_TOL = 1e-11
DUAL_TOL = 1e-10
# A support whose KKT solution has coefficients this large is treated as (numerically) affinely dependent.
MAX_COEFFICIENT = 1e8


class HullDistance(NamedTuple):
    """Result of `convex_hull_distance`: distances [..., B] and the optimal convex weights alpha [..., B, n]
    (detached; feed them back as `alpha_init` to warm-start the next call on slightly moved queries)."""

    distance: torch.Tensor
    alpha: torch.Tensor


# ----------------------------------------------------------------------------------------------- helpers


def _prepare(queries: torch.Tensor, members: torch.Tensor,
             normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if queries.dim() < 2 or members.dim() < 2:
        raise ValueError(f"queries [..., B, D] and members [..., n, D] need 2+ dims, got "
                         f"{tuple(queries.shape)} and {tuple(members.shape)}")
    if queries.shape[-1] != members.shape[-1]:
        raise ValueError(f"feature sizes differ: queries D={queries.shape[-1]}, "
                         f"members D={members.shape[-1]}")
    if members.shape[-2] < 1:
        raise ValueError("the member set is empty")
    if normalise:
        queries, members = F.normalize(queries, dim=-1), F.normalize(members, dim=-1)
    return queries, members


def _length(residual: torch.Tensor, squared: bool) -> torch.Tensor:
    """||residual|| over the last dim. The clamp makes the gradient 0 (not NaN) for a query on the hull."""
    square = residual.square().sum(-1)
    return square if squared else square.clamp_min(torch.finfo(square.dtype).tiny).sqrt()


def project_onto_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `values` [..., n] onto the probability simplex (sort-based,
    Held et al. 1974 / Duchi et al. 2008): the largest rho entries stay, all shifted by one threshold."""
    ordered = values.sort(dim=-1, descending=True).values
    excess = ordered.cumsum(-1) - 1
    ranks = torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device)
    # The test below holds for a prefix of the sorted entries, so counting it gives the support size rho.
    support_size = (ordered - excess / ranks > 0).sum(-1, keepdim=True).clamp_min(1)
    threshold = excess.gather(-1, support_size - 1) / support_size
    return (values - threshold).clamp_min(0)


# ----------------------------------------------------------------------------------------------- one point


def point_distance(a: torch.Tensor, b: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """||a - b|| over the last dim (the distance to a single member: FI-UAP's objective, OPOM Eq. 17-18), after L2
    normalisation when `normalise`; shapes broadcast. A 0 gradient (not NaN) where a == b."""
    if normalise:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return _length(a - b, squared=False)


# ----------------------------------------------------------------------------------------------- class centre


def class_centre_distance(queries: torch.Tensor, members: torch.Tensor, *, squared: bool = False,
                          normalise: bool = True) -> torch.Tensor:
    """Distance of each query to the mean of the members (OPOM Eq. 10-11, AdvCloak Eq. 18).

    With `normalise` both queries and members are L2-normalised first (the papers use normalised deep
    features); the mean itself is not renormalised, as in Eq. 10."""
    queries, members = _prepare(queries, members, normalise)
    centre = members.mean(-2, keepdim=True)
    return _length(queries - centre, squared)


# ----------------------------------------------------------------------------------------------- affine hull


def _kept_directions(singular: torch.Tensor, n_members: int, dim: int, dtype: torch.dtype,
                     rtol: float | None, energy: float | None) -> torch.Tensor:
    """Which singular directions of the centred members span the hull: those above a relative tolerance
    (default as numpy's matrix_rank, for the precision the features came in) and, if `energy` is given, only
    the leading ones that carry that fraction of the squared singular values (Cevikalp & Triggs 2010)."""
    if rtol is None:
        rtol = max(n_members, dim) * torch.finfo(dtype).eps
    keep = singular > rtol * singular[..., :1]
    if energy is not None:
        power = singular.square()
        before = power.cumsum(-1) - power
        keep &= before < energy * power.sum(-1, keepdim=True)
    return keep


def _affine_weights(coords: torch.Tensor, left: torch.Tensor, singular: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
    """Minimum-norm affine weights alpha (sum 1) with M^T alpha = the projection of the query.
    The left singular vectors of a centred matrix are orthogonal to the all-ones vector, so the correction
    beta sums to 0 and alpha = 1/n + beta stays affine."""
    safe = torch.where(keep, singular, torch.ones_like(singular)).unsqueeze(-2)
    beta = (coords / safe) @ left.mT
    return beta + 1.0 / left.shape[-2]


def affine_hull_distance(queries: torch.Tensor, members: torch.Tensor, *, rtol: float | None = None,
                         energy: float | None = None, squared: bool = False,
                         normalise: bool = True) -> torch.Tensor:
    """Distance of each query to the affine hull {M^T alpha : sum(alpha) = 1} of the members (OPOM Eq. 2-8,
    AdvCloak Eq. 17), in closed form: centre mu, orthonormal basis U of the centred members from an SVD, and
    the residual (q - mu) - U U^T (q - mu).

    rtol: singular values below rtol * the largest are dropped (rank deficiency: duplicate or collinear
    members); default max(n, D) * eps of the feature dtype. energy: if set (0 < energy <= 1), keep only the
    leading directions holding that share of the energy, which shrinks a hull that is too loose."""
    queries, members = _prepare(queries, members, normalise)
    with torch.no_grad():
        fixed = members.detach().double()
        centre = fixed.mean(-2, keepdim=True)
        left, singular, basis = torch.linalg.svd(fixed - centre, full_matrices=False)
        keep = _kept_directions(singular, members.shape[-2], members.shape[-1], members.dtype, rtol, energy)
    offset = queries.double() - centre
    coords = (offset @ basis.mT) * keep.unsqueeze(-2)
    residual = offset - coords @ basis
    if members.requires_grad:
        # The basis is built without autograd (SVD gradients blow up on repeated singular values). By the
        # envelope theorem the member gradient of min_alpha ||q - M^T alpha|| is that of ||q - M^T alpha*||
        # with alpha* held fixed, so subtract a term that is zero in value and carries exactly that gradient.
        weights = _affine_weights(coords.detach(), left, singular, keep)
        moved = members.double() - members.detach().double()
        residual = residual - weights @ moved
    return _length(residual, squared).to(queries.dtype)


# ----------------------------------------------------------------------------------------------- convex hull


def _solve_on_support(gram: torch.Tensor, linear: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Minimiser of 1/2 a^T G a - c^T a subject to sum(a) = 1 and a = 0 off `support`, one row at a time
    ([N, n, n], [N, n], [N, n] bool -> [N, n]). Off-support rows of the KKT system become identity rows, so
    one batched LU solve serves every support pattern; supports that are (numerically) affinely dependent go
    through a pseudo-inverse, which returns the minimum-norm minimiser."""
    rows, n = linear.shape
    on = support.to(gram.dtype)
    kkt = gram.new_zeros(rows, n + 1, n + 1)
    kkt[:, :n, :n] = gram * on.unsqueeze(-1) * on.unsqueeze(-2) + torch.diag_embed(1 - on)
    kkt[:, :n, n] = on
    kkt[:, n, :n] = on
    rhs = torch.cat([linear * on, on.new_ones(rows, 1)], dim=-1).unsqueeze(-1)
    solution, info = torch.linalg.solve_ex(kkt, rhs)
    mismatch = (kkt @ solution - rhs).abs().amax((-2, -1))
    size = solution.abs().amax((-2, -1))
    bad = (info != 0) | ~torch.isfinite(size) | (size > MAX_COEFFICIENT) | ~(mismatch < 1e-9 * (1 + size))
    if bad.any():
        solution[bad] = torch.linalg.pinv(kkt[bad], rtol=1e-12) @ rhs[bad]
    return solution[:, :n, 0] * on


def _renormalise(weights: torch.Tensor) -> torch.Tensor:
    weights = weights.clamp_min(0)
    return weights / weights.sum(-1, keepdim=True)


def _active_set_step(gram: torch.Tensor, linear: torch.Tensor, alpha: torch.Tensor, support: torch.Tensor,
                     barred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lawson-Hanson step adapted to the simplex. From a feasible alpha with support S: solve the
    equality-constrained problem on S. If that point is feasible, it is optimal when no member off S has a
    negative bound multiplier; otherwise the most negative one joins S. If it is infeasible, walk from alpha
    towards it until the first weight hits 0 and drop that member.

    In exact arithmetic a member that joins gets a positive weight. When rounding says otherwise (members a
    hair apart: the KKT system is nearly singular), it leaves again at once with a zero step; it is then
    `barred` from joining again, which is what stops an add-drop cycle. What is lost is below DUAL_TOL-sized
    multipliers times a weight of at most 1. Returns (alpha, support, barred, optimal)."""
    target = _solve_on_support(gram, linear, support)
    feasible = (target >= -PRIMAL_TOL).all(-1)
    gradient = (gram @ target.unsqueeze(-1)).squeeze(-1) - linear
    level = (gradient * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    multipliers = torch.where(support | barred, torch.inf, gradient - level)
    # amin + argmin, not min(dim): the latter goes through the thread pool even for tiny tensors, which costs
    # milliseconds per call on a busy machine.
    worst, entering = multipliers.amin(-1), multipliers.argmin(-1)
    optimal = feasible & (worst >= -DUAL_TOL)

    accepted = _renormalise(target)
    joins = F.one_hot(entering, linear.shape[-1]).bool() & ~optimal.unsqueeze(-1)
    accepted_support = (accepted > PRIMAL_TOL) | joins
    accepted = accepted * accepted_support

    direction = target - alpha
    shrinking = support & (direction < 0)
    ratio = torch.where(shrinking, alpha / (-direction).clamp_min(torch.finfo(alpha.dtype).tiny), torch.inf)
    step, blocking = ratio.amin(-1), ratio.argmin(-1)
    leaving = F.one_hot(blocking, linear.shape[-1]).bool()
    stepped = alpha + step.clamp(0, 1).unsqueeze(-1) * direction
    stepped = _renormalise(stepped * ~leaving * (stepped > PRIMAL_TOL))
    stalled = leaving & (~feasible & (step <= 0)).unsqueeze(-1)

    keep = feasible.unsqueeze(-1)
    return (torch.where(keep, accepted, stepped), torch.where(keep, accepted_support, stepped > 0),
            barred | stalled, optimal)


def _fista(gram: torch.Tensor, linear: torch.Tensor, alpha: torch.Tensor, iterations: int) -> torch.Tensor:
    """Accelerated projected gradient on the simplex; only a guess of the support for the active-set solver.
    The Frobenius norm bounds the largest eigenvalue of the Gram matrix, so 1/||G||_F is a safe step."""
    step = 1 / torch.linalg.matrix_norm(gram).clamp_min(1e-30).unsqueeze(-1)
    momentum_point, momentum = alpha, 1.0
    for _ in range(iterations):
        gradient = (gram @ momentum_point.unsqueeze(-1)).squeeze(-1) - linear
        updated = project_onto_simplex(momentum_point - step * gradient)
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        momentum_point = updated + ((momentum - 1) / next_momentum) * (updated - alpha)
        alpha, momentum = updated, next_momentum
    return alpha


def _solve_rows(gram: torch.Tensor, linear: torch.Tensor, alpha: torch.Tensor,
                max_iters: int) -> tuple[torch.Tensor, int]:
    """Runs active-set steps on the rows not yet optimal. Returns alpha and the count of unconverged rows."""
    support = alpha > 0
    barred = torch.zeros_like(support)
    pending = torch.arange(linear.shape[0], device=linear.device)
    for iteration in range(max_iters):
        if iteration == 0:  # every row is pending: skip the gather and scatter
            alpha, support, barred, optimal = _active_set_step(gram, linear, alpha, support, barred)
        else:
            rows = (gram[pending], linear[pending], alpha[pending], support[pending], barred[pending])
            alpha[pending], support[pending], barred[pending], optimal = _active_set_step(*rows)
        pending = pending[~optimal]
        if pending.numel() == 0:
            break
    return alpha, int(pending.numel())


def solve_simplex_least_squares(queries: torch.Tensor, members: torch.Tensor, *,
                                alpha_init: torch.Tensor | None = None, fista_iters: int | None = None,
                                max_iters: int | None = None) -> torch.Tensor:
    """argmin over the simplex (alpha >= 0, sum 1) of ||q - M^T alpha||^2 for every query, exactly (float64,
    no autograd). queries [..., B, D], members [..., n, D] -> alpha [..., B, n] (float64).

    The problem only needs the Gram matrix G = M M^T and c = M q, so after one matrix product it is an
    n-dimensional QP, solved with an active-set method from the nearest member (or `alpha_init`, projected
    onto the simplex), after `fista_iters` accelerated projected-gradient steps that guess the support
    (default 20 from a cold start, which usually leaves one active-set step; 0 with `alpha_init`, which is
    usually right already). When members are affinely dependent (duplicates, n > D + 1) the optimal point is
    still exact but alpha is one of several optimal weightings."""
    with torch.no_grad():
        members64 = members.detach().double()
        # Rescale so the largest member norm is 1: the tolerances above are then absolute.
        scale = members64.norm(dim=-1).amax(-1).clamp_min(1e-30)[..., None, None]
        members64 = members64 / scale
        queries64 = queries.detach().double() / scale
        gram = members64 @ members64.mT
        linear = queries64 @ members64.mT
        lead = torch.broadcast_shapes(gram.shape[:-2], linear.shape[:-2])
        n, batch = gram.shape[-1], linear.shape[-2]
        gram_rows = gram.expand(*lead, n, n).unsqueeze(-3).expand(*lead, batch, n, n).reshape(-1, n, n)
        linear_rows = linear.expand(*lead, batch, n).reshape(-1, n)
        if alpha_init is not None:
            start = project_onto_simplex(alpha_init.detach().double().expand(*lead, batch, n).reshape(-1, n))
        else:
            nearest = (gram_rows.diagonal(dim1=-2, dim2=-1) - 2 * linear_rows).argmin(-1)
            start = F.one_hot(nearest, n).double()
        if fista_iters is None:
            fista_iters = 0 if alpha_init is not None else 20
        if fista_iters > 0:
            start = _fista(gram_rows, linear_rows, start, fista_iters)
        alpha, unconverged = _solve_rows(gram_rows, linear_rows, start.clone(), max_iters or max(50, 5 * n))
    if unconverged:
        warnings.warn(f"convex hull solver: {unconverged} queries stopped at the iteration limit "
                      "(result feasible, within rounding of optimal)", RuntimeWarning, stacklevel=2)
    return alpha.reshape(*lead, batch, n)


def convex_hull_distance(queries: torch.Tensor, members: torch.Tensor, *,
                         alpha_init: torch.Tensor | None = None, fista_iters: int | None = None,
                         max_iters: int | None = None, squared: bool = False,
                         normalise: bool = True) -> HullDistance:
    """Distance of each query to the convex hull of the members (OPOM Eq. 12-13, AdvCloak Eq. 19):
    min over alpha >= 0, sum(alpha) = 1 of ||q - M^T alpha||, with alpha* solved exactly by
    `solve_simplex_least_squares`.

    alpha* is found without autograd and then held fixed: by the envelope theorem the gradient of the minimum
    is the gradient of ||q - M^T alpha*|| at fixed alpha*, i.e. (q - M^T alpha*) / distance for the queries
    (and -alpha* times that for the members), so autograd through the last line is exact."""
    queries, members = _prepare(queries, members, normalise)
    alpha = solve_simplex_least_squares(queries, members, alpha_init=alpha_init, fista_iters=fista_iters,
                                        max_iters=max_iters)
    residual = queries.double() - alpha @ members.double()
    return HullDistance(_length(residual, squared).to(queries.dtype), alpha.to(queries.dtype))


# ----------------------------------------------------------------------------------------------- by name

# The subspaces of an identity that OPOM (§3.2.1) and AdvCloak (Eq. 17-19) push features away from.
SUBSPACES = ("affine", "center", "convex")


class SubspaceDistance(NamedTuple):
    """Result of `subspace_distance`: distances [..., B], and for the convex hull its optimal weights [..., B, n]
    (the warm start of the next call; None for the other subspaces)."""

    distance: torch.Tensor
    alpha: torch.Tensor | None = None


def subspace_distance(queries: torch.Tensor, members: torch.Tensor, subspace: str, *, squared: bool = False,
                      normalise: bool = True, alpha_init: torch.Tensor | None = None) -> SubspaceDistance:
    """Distance of each query to the named subspace of the members: 'center' (`class_centre_distance`), 'affine'
    (`affine_hull_distance`) or 'convex' (`convex_hull_distance`, warm-started from `alpha_init`)."""
    if subspace == "center":
        return SubspaceDistance(class_centre_distance(queries, members, squared=squared, normalise=normalise))
    if subspace == "affine":
        return SubspaceDistance(affine_hull_distance(queries, members, squared=squared, normalise=normalise))
    if subspace == "convex":
        hull = convex_hull_distance(queries, members, alpha_init=alpha_init, squared=squared, normalise=normalise)
        return SubspaceDistance(hull.distance, hull.alpha)
    raise ValueError(f"unknown subspace {subspace!r}; known: {', '.join(SUBSPACES)}")
