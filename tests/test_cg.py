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
    x, residual, taken = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=12)
    # Not rounding-level: n steps are exact only in exact arithmetic; in float64 CG's directions
    # lose conjugacy, leaving an error of about cond · 1e-16 per step, far below 1e-6.
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    assert residual < 1e-5 * b.norm()
    assert taken == 12


def test_cg_after_convergence_stays_finite():
    # A = I converges in one step; the 49 further steps divide 0 by 0 unless guarded.
    b = {"x": torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
    x, residual, _ = conjugate_gradient(lambda v: v, b, steps=50)
    assert torch.isfinite(x["x"]).all() and torch.isfinite(residual)
    torch.testing.assert_close(x["x"], b["x"])
    # b = 0: every step is 0/0.
    x, residual, _ = conjugate_gradient(lambda v: v, {"x": torch.zeros(5)}, steps=3)
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
    x, _, taken = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=3,
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
    x, _, taken = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, steps=4, stop_at_negative_curvature=True)
    torch.testing.assert_close(x["x"], b["x"])
    assert taken == 0
