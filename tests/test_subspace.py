"""faceveil.attacks.subspace: class centre, affine hull and convex hull distances against independent
references (exhaustive support enumeration, scipy SLSQP, cvxpy, numpy lstsq), their gradients and ordering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from faceveil.attacks.subspace import (
    affine_hull_distance,
    class_centre_distance,
    convex_hull_distance,
    project_onto_simplex,
    solve_simplex_least_squares,
)

# ----------------------------------------------------------------------------------------------- problems


def _unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _queries(members: np.ndarray, rng: np.random.Generator, outside: int = 4) -> np.ndarray:
    """Random queries outside, convex combinations inside, a member itself and a point on an edge."""
    n, dim = members.shape
    inside = rng.dirichlet(np.ones(n), size=2) @ members
    on_edge = 0.3 * members[0] + 0.7 * members[-1]
    return np.vstack([_unit(outside, dim, rng), inside, members[:1], on_edge[None]])


def _affinely_independent(members: np.ndarray) -> bool:
    centred = members - members.mean(0)
    return len(members) == 1 or np.linalg.matrix_rank(centred) == len(members) - 1


def _degenerate_members(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = _unit(4, 16, rng)
    if kind == "duplicates":
        return np.vstack([base, base[:2], base[1:2]])
    if kind == "collinear":
        return np.vstack([base[:2], 0.25 * base[0] + 0.75 * base[1], base[2:]])
    if kind == "identical":
        return np.repeat(base[:1], 5, axis=0)
    if kind == "many_in_low_dim":
        return _unit(10, 3, rng)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------- references


def _enumerated_optimum(query: np.ndarray, members: np.ndarray) -> float:
    """Exact min over the simplex of ||q - M^T a||^2: the best feasible affine projection of all supports."""
    best = float(np.min(np.sum((members - query) ** 2, axis=1)))
    for size in range(2, len(members) + 1):
        for support in itertools.combinations(range(len(members)), size):
            chosen = members[list(support)]
            steps = (chosen[1:] - chosen[0]).T
            rest = np.linalg.lstsq(steps, query - chosen[0], rcond=None)[0]
            weights = np.concatenate([[1 - rest.sum()], rest])
            if weights.min() >= -1e-12:
                best = min(best, float(np.sum((query - weights @ chosen) ** 2)))
    return best


def _slsqp(query: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, float]:
    gram, linear = members @ members.T, members @ query
    n = len(members)
    result = minimize(
        lambda a: a @ gram @ a - 2 * linear @ a + query @ query, np.full(n, 1 / n),
        jac=lambda a: 2 * gram @ a - 2 * linear, method="SLSQP", bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(n)}],
        options={"ftol": 1e-16, "maxiter": 2000})
    return result.x, float(np.sum((query - result.x @ members) ** 2))


def _cvxpy(query: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, float]:
    cp = pytest.importorskip("cvxpy")
    weights = cp.Variable(len(members))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(members.T @ weights - query)),
                         [weights >= 0, cp.sum(weights) == 1])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return weights.value, float(np.sum((query - weights.value @ members) ** 2))


def _affine_reference(query: np.ndarray, members: np.ndarray) -> float:
    centre = members.mean(0)
    coords = np.linalg.lstsq((members - centre).T, query - centre, rcond=None)[0]
    return float(np.linalg.norm(query - centre - (members - centre).T @ coords))


def _solve(queries: np.ndarray, members: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
    """Squared convex-hull distances and weights, on the raw (un-normalised) features."""
    distance, alpha = convex_hull_distance(torch.from_numpy(queries), torch.from_numpy(members), squared=True,
                                           normalise=False, **options)
    return distance.numpy(), alpha.numpy()


def _assert_feasible(alpha: np.ndarray) -> None:
    assert alpha.min() >= 0
    np.testing.assert_allclose(alpha.sum(-1), 1, atol=1e-12)


# ----------------------------------------------------------------------------------- convex hull: accuracy


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dim", [2, 3, 16, 128])
def test_convex_hull_is_exact_against_enumeration(n: int, dim: int) -> None:
    rng = np.random.default_rng(100 * n + dim)
    members = _unit(n, dim, rng)
    queries = _queries(members, rng)
    squared, alpha = _solve(queries, members)
    _assert_feasible(alpha)
    # The returned distance is the residual of the returned weights, so it is achievable.
    np.testing.assert_allclose(squared, np.sum((queries - alpha @ members) ** 2, axis=1), atol=1e-12)
    expected = np.array([_enumerated_optimum(q, members) for q in queries])
    np.testing.assert_allclose(squared, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("n", "dim"), [(3, 128), (5, 512), (10, 512), (10, 1024), (10, 128)])
def test_convex_hull_matches_slsqp(n: int, dim: int) -> None:
    rng = np.random.default_rng(n * dim)
    members = _unit(n, dim, rng)
    queries = _queries(members, rng, outside=8)
    squared, alpha = _solve(queries, members)
    for query, got_alpha, got in zip(queries, alpha, squared, strict=True):
        ref_alpha, ref = _slsqp(query, members)
        assert got <= ref + 1e-12  # never worse than the reference
        assert abs(got - ref) <= 1e-6
        np.testing.assert_allclose(got_alpha, ref_alpha, atol=1e-6)


@pytest.mark.parametrize(("n", "dim"), [(3, 128), (10, 512), (10, 8)])
def test_convex_hull_matches_cvxpy(n: int, dim: int) -> None:
    rng = np.random.default_rng(7 * n + dim)
    members = _unit(n, dim, rng)
    queries = _queries(members, rng, outside=6)
    squared, alpha = _solve(queries, members)
    unique = _affinely_independent(members)
    for query, got_alpha, got in zip(queries, alpha, squared, strict=True):
        ref_alpha, ref = _cvxpy(query, members)
        assert got <= ref + 1e-12
        assert abs(got - ref) <= 1e-6
        # The nearest point is always unique; the weights only when the members are affinely independent.
        np.testing.assert_allclose(got_alpha @ members, ref_alpha @ members, atol=1e-6)
        if unique:
            np.testing.assert_allclose(got_alpha, ref_alpha, atol=1e-6)


@pytest.mark.parametrize("kind", ["duplicates", "collinear", "identical", "many_in_low_dim"])
def test_convex_hull_degenerate_members(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    members = _degenerate_members(kind, rng)
    queries = _queries(members, rng)
    squared, alpha = _solve(queries, members)
    _assert_feasible(alpha)
    expected = np.array([_enumerated_optimum(q, members) for q in queries])
    np.testing.assert_allclose(squared, expected, rtol=0, atol=1e-10)


def test_convex_hull_near_duplicate_members() -> None:
    """Members 1e-9 apart make the Gram matrix singular to float64; the distance is then only exact to about
    the separation times the residual, far below float32 feature noise."""
    rng = np.random.default_rng(19)
    members = _unit(6, 64, rng)
    members[-1] = members[0] + 1e-9 * rng.standard_normal(64)
    queries = _queries(members, rng, outside=8)
    squared, alpha = _solve(queries, members)
    _assert_feasible(alpha)
    expected = np.array([_enumerated_optimum(q, members) for q in queries])
    np.testing.assert_allclose(squared, expected, rtol=0, atol=1e-7)


def test_queries_inside_the_hull_are_at_distance_zero() -> None:
    rng = np.random.default_rng(3)
    members = _unit(6, 64, rng)
    weights = rng.dirichlet(np.ones(6), size=10)
    squared, alpha = _solve(weights @ members, members)
    assert squared.max() < 1e-20
    np.testing.assert_allclose(alpha, weights, atol=1e-9)


def test_float32_features_give_float32_results_close_to_float64() -> None:
    rng = np.random.default_rng(4)
    members, queries = _unit(10, 512, rng), _unit(16, 512, rng)
    exact = convex_hull_distance(torch.from_numpy(queries), torch.from_numpy(members)).distance
    single = convex_hull_distance(torch.from_numpy(queries).float(), torch.from_numpy(members).float())
    assert single.distance.dtype == torch.float32 and single.alpha.dtype == torch.float32
    torch.testing.assert_close(single.distance.double(), exact, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- convex hull: batching, warm starts


def test_batched_member_sets_equal_one_set_at_a_time() -> None:
    generator = torch.Generator().manual_seed(5)
    members = torch.randn(3, 7, 32, generator=generator, dtype=torch.float64)
    queries = torch.randn(3, 5, 32, generator=generator, dtype=torch.float64)
    batched = convex_hull_distance(queries, members)
    for index in range(3):
        single = convex_hull_distance(queries[index], members[index])
        torch.testing.assert_close(batched.distance[index], single.distance, atol=1e-12, rtol=0)
        torch.testing.assert_close(batched.alpha[index], single.alpha, atol=1e-9, rtol=0)
    # One member set broadcast against several query batches.
    shared = convex_hull_distance(queries, members[0])
    torch.testing.assert_close(shared.distance[1], convex_hull_distance(queries[1], members[0]).distance)


@pytest.mark.parametrize("options", [{"fista_iters": 0}, {"fista_iters": 200}, {"max_iters": 500}])
def test_solver_settings_do_not_change_the_optimum(options: dict) -> None:
    rng = np.random.default_rng(6)
    members = _unit(10, 128, rng)
    queries = _queries(members, rng, outside=10)
    squared, alpha = _solve(queries, members)
    other_squared, other_alpha = _solve(queries, members, **options)
    np.testing.assert_allclose(other_squared, squared, atol=1e-12)
    np.testing.assert_allclose(other_alpha, alpha, atol=1e-9)


def test_warm_start_from_a_previous_solution() -> None:
    rng = np.random.default_rng(8)
    members = _unit(10, 256, rng)
    queries = _unit(16, 256, rng)
    moved = queries + 0.02 * rng.standard_normal(queries.shape)
    _, alpha = _solve(queries, members)
    cold_squared, cold_alpha = _solve(moved, members)
    warm_squared, warm_alpha = _solve(moved, members, alpha_init=torch.from_numpy(alpha))
    np.testing.assert_allclose(warm_squared, cold_squared, atol=1e-12)
    np.testing.assert_allclose(warm_alpha, cold_alpha, atol=1e-9)
    # Any starting weights will do, even ones off the simplex.
    junk = torch.from_numpy(rng.standard_normal(alpha.shape))
    junk_squared, _ = _solve(moved, members, alpha_init=junk)
    np.testing.assert_allclose(junk_squared, cold_squared, atol=1e-12)


def test_iteration_limit_warns_and_stays_feasible() -> None:
    rng = np.random.default_rng(9)
    members, queries = _unit(10, 64, rng), _unit(8, 64, rng)
    with pytest.warns(RuntimeWarning, match="iteration limit"):
        alpha = solve_simplex_least_squares(torch.from_numpy(queries), torch.from_numpy(members),
                                            fista_iters=0, max_iters=1)
    _assert_feasible(alpha.numpy())


def test_simplex_projection_satisfies_its_optimality_conditions() -> None:
    values = torch.randn(200, 7, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 3
    projected = project_onto_simplex(values)
    _assert_feasible(projected.numpy())
    shift = values - projected  # equals one threshold on the support and bounds the rest from above
    on = projected > 0
    threshold = (shift * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
    assert torch.allclose(torch.where(on, shift, threshold), threshold.expand_as(shift), atol=1e-12)
    assert (torch.where(on, threshold, values) <= threshold + 1e-12).all()


# ------------------------------------------------------------------------------- affine hull, class centre


@pytest.mark.parametrize(("n", "dim"), [(1, 8), (3, 128), (10, 512), (10, 4), (6, 5)])
def test_affine_hull_matches_lstsq(n: int, dim: int) -> None:
    rng = np.random.default_rng(n + dim)
    members = _unit(n, dim, rng)
    queries = _queries(members, rng)
    got = affine_hull_distance(torch.from_numpy(queries), torch.from_numpy(members), normalise=False).numpy()
    expected = np.array([_affine_reference(q, members) for q in queries])
    np.testing.assert_allclose(got, expected, atol=1e-10)
    if n - 1 >= dim:  # the hull of points in general position fills the space
        assert got.max() < 1e-10


@pytest.mark.parametrize("kind", ["duplicates", "collinear", "identical", "many_in_low_dim"])
def test_affine_hull_rank_deficient_members(kind: str) -> None:
    rng = np.random.default_rng(20 + len(kind))
    members = _degenerate_members(kind, rng)
    queries = _queries(members, rng)
    got = affine_hull_distance(torch.from_numpy(queries), torch.from_numpy(members), normalise=False).numpy()
    expected = np.array([_affine_reference(q, members) for q in queries])
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_affine_hull_energy_keeps_fewer_directions() -> None:
    rng = np.random.default_rng(11)
    members, queries = torch.from_numpy(_unit(8, 64, rng)), torch.from_numpy(_unit(5, 64, rng))
    full = affine_hull_distance(queries, members)
    torch.testing.assert_close(affine_hull_distance(queries, members, energy=1.0), full)
    looser = affine_hull_distance(queries, members, energy=0.3)
    assert (looser >= full - 1e-12).all() and (looser > full + 1e-6).any()
    # Keeping no direction leaves only the centre.
    centre_only = affine_hull_distance(queries, members, rtol=2.0)
    torch.testing.assert_close(centre_only, class_centre_distance(queries, members))


def test_class_centre_distance() -> None:
    rng = np.random.default_rng(12)
    members, queries = rng.standard_normal((4, 16)) * 3, rng.standard_normal((6, 16))
    raw = class_centre_distance(torch.from_numpy(queries), torch.from_numpy(members), normalise=False).numpy()
    np.testing.assert_allclose(raw, np.linalg.norm(queries - members.mean(0), axis=1), atol=1e-12)
    unit_members = members / np.linalg.norm(members, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    normalised = class_centre_distance(torch.from_numpy(queries), torch.from_numpy(members), squared=True)
    expected = np.sum((unit_queries - unit_members.mean(0)) ** 2, axis=1)
    np.testing.assert_allclose(normalised.numpy(), expected, atol=1e-12)


def test_normalise_option_is_applied_to_both_inputs() -> None:
    rng = np.random.default_rng(13)
    members, queries = rng.standard_normal((5, 32)) * 4, rng.standard_normal((3, 32)) * 0.1
    q, m = torch.from_numpy(queries), torch.from_numpy(members)
    q_unit, m_unit = F.normalize(q, dim=-1), F.normalize(m, dim=-1)
    for distance in (class_centre_distance, affine_hull_distance):
        torch.testing.assert_close(distance(q, m), distance(q_unit, m_unit, normalise=False))
    torch.testing.assert_close(convex_hull_distance(q, m).distance,
                               convex_hull_distance(q_unit, m_unit, normalise=False).distance)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="feature sizes differ"):
        convex_hull_distance(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="2\\+ dims"):
        affine_hull_distance(torch.zeros(3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="empty"):
        class_centre_distance(torch.zeros(2, 3), torch.zeros(0, 3))


# ----------------------------------------------------------------------------------------------- ordering


def test_distances_are_ordered() -> None:
    """affine hull <= convex hull <= min(class centre, nearest member): the members and their mean lie in the
    convex hull, which lies in the affine hull."""
    rng = np.random.default_rng(14)
    for trial in range(20):
        n, dim = int(rng.integers(1, 11)), int(rng.choice([3, 8, 128]))
        members = torch.from_numpy(_unit(n, dim, rng))
        queries = torch.from_numpy(_queries(members.numpy(), rng))
        convex = convex_hull_distance(queries, members).distance
        affine = affine_hull_distance(queries, members)
        centre = class_centre_distance(queries, members)
        nearest = torch.cdist(queries, members).amin(-1)
        assert (convex >= affine - 1e-9).all(), trial
        assert (convex <= centre + 1e-12).all(), trial
        assert (convex <= nearest + 1e-12).all(), trial


# ----------------------------------------------------------------------------------------------- gradients


def _problem(seed: int, n: int = 5, dim: int = 12, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    members = torch.randn(n, dim, generator=generator, dtype=torch.float64).requires_grad_()
    queries = torch.randn(batch, dim, generator=generator, dtype=torch.float64).requires_grad_()
    return queries, members


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_gradients_match_finite_differences(normalise: bool, squared: bool) -> None:
    queries, members = _problem(15, n=4, dim=6, batch=3)
    options = {"normalise": normalise, "squared": squared}
    checks = {
        "convex": lambda q, m: convex_hull_distance(q, m, **options).distance,
        "affine": lambda q, m: affine_hull_distance(q, m, **options),
        "centre": lambda q, m: class_centre_distance(q, m, **options),
    }
    for name, function in checks.items():
        assert torch.autograd.gradcheck(function, (queries, members), eps=1e-6, atol=1e-6), name


def test_affine_gradients_with_more_members_than_dimensions() -> None:
    queries, members = _problem(16, n=4, dim=2)  # the hull is the plane: distance 0, gradient 0
    affine_hull_distance(queries, members, normalise=False).sum().backward()
    assert torch.isfinite(queries.grad).all() and queries.grad.abs().max() < 1e-6


def test_convex_gradient_is_the_envelope_gradient() -> None:
    queries, members = _problem(17, n=6, dim=32, batch=8)
    distance, alpha = convex_hull_distance(queries, members, normalise=False)
    distance.sum().backward()
    residual = (queries - alpha @ members).detach()
    torch.testing.assert_close(queries.grad, residual / distance.detach().unsqueeze(-1))
    torch.testing.assert_close(members.grad, -(alpha.T @ (residual / distance.detach().unsqueeze(-1))))


def test_gradient_is_finite_on_the_hull() -> None:
    _, members = _problem(18)
    queries = torch.stack([members[0].detach(), members[:3].detach().mean(0)]).requires_grad_()
    for function in (lambda: convex_hull_distance(queries, members, normalise=False).distance,
                     lambda: affine_hull_distance(queries, members, normalise=False)):
        queries.grad = None
        function().sum().backward()
        assert torch.isfinite(queries.grad).all()
