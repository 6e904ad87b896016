import pytest
import torch
from torch.func import vmap

from imaml_cli.meta.cg import conjugate_gradient


def spd(n, cond, generator):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q.T


def test_cg_solves_spd_system_in_n_steps():
    g = torch.Generator().manual_seed(0)
    a = spd(12, 100.0, g)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, residual, taken, _ = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=12)
    # Not rounding-level: n steps are exact only in exact arithmetic; in float64 CG's directions
    # lose conjugacy, leaving an error of about cond · 1e-16 per step, far below 1e-6.
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    assert residual < 1e-5 * b.norm()
    assert taken == 12


def test_cg_after_convergence_stays_finite():
    # A = I converges in one step; the 49 further steps divide 0 by 0 unless guarded.
    b = {"x": torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
    x, residual, _, _ = conjugate_gradient(lambda v: v, b, steps=50)
    assert torch.isfinite(x["x"]).all() and torch.isfinite(residual)
    torch.testing.assert_close(x["x"], b["x"])
    # b = 0: every step is 0/0.
    x, residual, _, _ = conjugate_gradient(lambda v: v, {"x": torch.zeros(5)}, steps=3)
    assert torch.equal(x["x"], torch.zeros(5)) and residual == 0


def test_cg_batched_over_systems_with_vmap_matches_each_solve():
    g = torch.Generator().manual_seed(1)
    mats = torch.stack([spd(6, 10.0 ** (i + 1), g) for i in range(4)])
    bs = torch.randn(4, 6, generator=g, dtype=torch.float64)
    xs = vmap(lambda a, b: conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=6))(mats, bs).solution
    torch.testing.assert_close(xs["x"], torch.linalg.solve(mats, bs.unsqueeze(-1)).squeeze(-1))


def test_truncated_cg_stops_at_negative_curvature_with_a_descent_direction():
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x, _, taken, _ = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=3,
                                     stop_at_negative_curvature=True)
    plain = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=3).solution
    # bᵀAb = 2 > 0: the first step is taken; the 2-D Krylov space already holds the -1 direction.
    assert taken == 1
    # The direction of b (the negative gradient of the Newton model) must stay a descent direction.
    assert torch.dot(x["x"], b) > 0
    assert torch.isfinite(x["x"]).all()
    assert not torch.allclose(x["x"], plain["x"])


def test_truncated_cg_negative_curvature_on_first_step_returns_b():
    a = -torch.eye(3, dtype=torch.float64)
    b = {"x": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    x, _, taken, _ = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, steps=4, stop_at_negative_curvature=True)
    torch.testing.assert_close(x["x"], b["x"])
    assert taken == 0


def galerkin_iterate(a, b, k):
    """CG's k-th iterate by dense algebra: the solution of A x = b on span{b, Ab, …, A^{k-1}b}."""
    basis = torch.linalg.qr(torch.stack([torch.linalg.matrix_power(a, i) @ b for i in range(k)], 1)).Q
    return basis @ torch.linalg.solve(basis.T @ a @ basis, basis.T @ b)


def test_trust_radius_never_acts_where_the_solution_is_inside():
    # A ⪰ δI, radius ‖b‖/δ ≥ ‖A⁻¹b‖: the radius is the one iMAML's damped system gets.
    g = torch.Generator().manual_seed(4)
    delta = 0.5
    a = delta * torch.eye(8, dtype=torch.float64) + spd(8, 50.0, g)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    bounded = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=8, radius=b.norm() / delta)
    torch.testing.assert_close(bounded.solution["x"], torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    assert not bounded.on_boundary and bounded.steps_taken == 8


@pytest.mark.parametrize("stop_at_negative_curvature", [True, False])
def test_trust_radius_stops_on_the_sphere_between_two_cg_iterates(stop_at_negative_curvature):
    """Nearly singular and positive definite, so ‖A⁻¹b‖ is far outside the radius: the stop is the
    point of norm radius on the segment from CG's k-th to its (k+1)-th iterate (found here by
    bisection on dense Galerkin iterates), and no step after it moves x."""
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1e-4, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    radius = 3 * b.norm()
    iterates = [torch.zeros(6, dtype=torch.float64)] + [galerkin_iterate(a, b, k) for k in range(1, 7)]
    norms = torch.stack([x.norm() for x in iterates])
    assert norms[-1] > 100 * radius and (norms.diff() > 0).all()
    k = int((norms <= radius).nonzero().max())
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if (iterates[k] + mid * (iterates[k + 1] - iterates[k])).norm() < radius else (low, mid)
    expected = iterates[k] + low * (iterates[k + 1] - iterates[k])

    bounded = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=6,
                                 stop_at_negative_curvature=stop_at_negative_curvature, radius=radius)
    torch.testing.assert_close(bounded.solution["x"], expected, rtol=1e-7, atol=1e-9)
    assert bounded.on_boundary and bounded.steps_taken == k + 1
    torch.testing.assert_close(bounded.residual_norm, (b - a @ expected).norm(), rtol=1e-6, atol=1e-9)


def test_trust_radius_batched_stops_only_the_systems_that_leave():
    g = torch.Generator().manual_seed(6)
    inside = torch.eye(5, dtype=torch.float64) + spd(5, 10.0, g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    outside = q @ torch.diag(torch.tensor([1e-3, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.T
    mats, bs = torch.stack([inside, outside]), torch.randn(2, 5, generator=g, dtype=torch.float64)
    radii = bs.norm(dim=1)
    batched = vmap(lambda a, b, r: conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=5, radius=r))(
        mats, bs, radii)
    assert batched.on_boundary.tolist() == [False, True]
    together = conjugate_gradient(lambda v: {"x": (mats @ v["x"].unsqueeze(-1)).squeeze(-1)}, {"x": bs}, steps=5,
                                  radius=radii, batch_dims=1)
    torch.testing.assert_close(together.solution["x"], batched.solution["x"])
    assert together.on_boundary.tolist() == [False, True]
    torch.testing.assert_close(batched.solution["x"][0], torch.linalg.solve(inside, bs[0]), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(batched.solution["x"][1].norm(), radii[1])
