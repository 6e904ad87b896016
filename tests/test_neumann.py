"""The truncated Neumann series against closed forms, and against CG where both converge."""

from unittest.mock import patch

import pytest
import torch
from torch import nn
from torch.func import vmap

from conftest import QUICK, compose
from imaml_cli.config import validate
from imaml_cli.data import TaskBatch
from imaml_cli.engine import components, loop
from imaml_cli.engine.loop import train
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.cg import neumann_series
from imaml_cli.meta.inner import GradientDescent, NewtonCG
from imaml_cli.meta.task import TaskModel
from imaml_cli.models import ConvNet


def spd(n, low, high, generator):
    """A symmetric matrix with eigenvalues spread over [low, high], and its eigenbasis."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T, q, eigenvalues


def test_partial_sums_match_the_closed_form_and_converge_to_the_solution():
    g = torch.Generator().manual_seed(0)
    a, q, eigenvalues = spd(10, 1.0, 4.0, g)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    alpha = 0.3  # eigenvalues of I - αA in [-0.2, 0.7]: the series converges
    for steps in (1, 4, 9):
        x, residual, taken, _ = neumann_series(lambda v: {"x": a @ v["x"]}, {"x": b}, steps, alpha)
        # α Σ_{k<K} (I − αA)^k = A⁻¹ (I − (I − αA)^K), applied in A's eigenbasis.
        decay = (1 - alpha * eigenvalues) ** steps
        expected = q @ (((1 - decay) / eigenvalues) * (q.T @ b))
        torch.testing.assert_close(x["x"], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(residual, (b - a @ x["x"]).norm(), rtol=1e-8, atol=1e-12)
        assert taken == steps
    x, residual, _, _ = neumann_series(lambda v: {"x": a @ v["x"]}, {"x": b}, 80, alpha)
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b), rtol=1e-9, atol=1e-11)
    assert residual < 1e-9 * b.norm()


def test_a_step_size_beyond_two_over_the_largest_eigenvalue_diverges():
    g = torch.Generator().manual_seed(1)
    a, _, _ = spd(6, 1.0, 4.0, g)
    b = {"x": torch.randn(6, generator=g, dtype=torch.float64)}
    _, small, _, _ = neumann_series(lambda v: {"x": a @ v["x"]}, b, 30, 0.45)
    _, large, _, _ = neumann_series(lambda v: {"x": a @ v["x"]}, b, 30, 0.55)  # 0.55 * 4 > 2
    assert small < 1e-3 * b["x"].norm() < large


def test_batched_over_systems_matches_each_solve():
    g = torch.Generator().manual_seed(2)
    systems = [spd(5, 1.0, 2.0 + i, g)[0] for i in range(3)]
    mats = torch.stack(systems)
    bs = torch.randn(3, 5, generator=g, dtype=torch.float64)
    one_by_one = torch.stack([neumann_series(lambda v: {"x": m @ v["x"]}, {"x": b}, 6, 0.3).solution["x"]
                              for m, b in zip(mats, bs)])
    mapped = vmap(lambda m, b: neumann_series(lambda v: {"x": m @ v["x"]}, {"x": b}, 6, 0.3).solution)(mats, bs)
    # batch_dims=1: one matvec for all systems, as the fused path calls it.
    batched, residual, _, _ = neumann_series(lambda v: {"x": (mats @ v["x"].unsqueeze(-1)).squeeze(-1)},
                                          {"x": bs}, 6, 0.3, batch_dims=1)
    torch.testing.assert_close(mapped["x"], one_by_one)
    torch.testing.assert_close(batched["x"], one_by_one)
    assert residual.shape == (3,)


def test_imaml_meta_gradient_matches_the_closed_form_on_linear_regression():
    """Inner problem ½‖Xφ−y‖²·2/n + λ/2‖φ−θ‖²: dφ*/dθ = λ(A+λI)⁻¹, so the meta-gradient is
    λ(A+λI)⁻¹∇L_test(φ*) with A = 2XᵀX/n, the Hessian of the support loss."""
    g = torch.Generator().manual_seed(3)
    dim, lam, tasks = 6, 2.0, 3
    xs = torch.randn(tasks, 20, dim, generator=g, dtype=torch.float64)
    xq = torch.randn(tasks, 10, dim, generator=g, dtype=torch.float64)
    w = torch.randn(tasks, dim, 1, generator=g, dtype=torch.float64)
    batch = TaskBatch(xs, xs @ w, xq, xq @ w + 0.1)
    theta = {"weight": torch.randn(1, dim, generator=g, dtype=torch.float64)}
    model = TaskModel(nn.Linear(dim, 1, bias=False).double(), "regression")
    hessians = 2.0 / 20 * xs.transpose(1, 2) @ xs
    largest = torch.linalg.eigvalsh(torch.eye(dim) + hessians / lam).max()
    learner = MetaLearner(model, "imaml", NewtonCG(steps=2, cg_steps=dim + 2), lam=lam, cg_steps=200,
                          cg_solver="neumann", neumann_step_size=1.0 / largest.item())

    meta_grad, metrics = learner.meta_gradient(theta, batch)

    expected = torch.zeros(dim, dtype=torch.float64)
    for a, x_s, y_s, x_q, y_q in zip(hessians, *batch):
        m = a + lam * torch.eye(dim, dtype=torch.float64)
        phi = torch.linalg.solve(m, 2.0 / 20 * x_s.T @ y_s[:, 0] + lam * theta["weight"][0])
        test_grad = 2.0 / 10 * x_q.T @ (x_q @ phi - y_q[:, 0])
        expected += lam * torch.linalg.solve(m, test_grad) / tasks
    torch.testing.assert_close(meta_grad["weight"][0], expected, rtol=1e-7, atol=1e-10)
    assert metrics["cg_residual"].max() < 1e-8
    assert (metrics["cg_steps"] == 200).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
def test_neumann_and_cg_agree_on_a_conv_net_when_both_converge(fused):
    # A large λ makes I + H/λ close to I, positive definite and well conditioned whatever the net's
    # Hessian, so both solvers reach the same exact meta-gradient.
    torch.manual_seed(0)
    net = ConvNet(1, 8, 4, 3, blocks=2, stride=2).double()
    model = TaskModel(net, "classification")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, -1)
    batch = TaskBatch(x, y, x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64), y)
    theta = model.parameters()
    common = dict(inner=GradientDescent(3, 0.1), lam=200.0, cg_steps=40, fused=fused,
                  hvp_mode="forward_over_reverse")
    cg, cg_metrics = MetaLearner(model, "imaml", **common).meta_gradient(theta, batch)
    neumann, metrics = MetaLearner(model, "imaml", cg_solver="neumann", neumann_step_size=0.9,
                                   **common).meta_gradient(theta, batch)
    assert cg_metrics["cg_residual"].max() < 1e-10 and metrics["cg_residual"].max() < 1e-10
    for name in cg:
        torch.testing.assert_close(neumann[name], cg[name], rtol=1e-8, atol=1e-12)


def test_the_config_chooses_the_solver_and_a_run_reports_its_residual(tmp_path):
    config = validate(compose(QUICK + ["cg.solver=neumann", "cg.step_size=0.03", "cg.steps=3"]))
    network = components.build_network(config, torch.device("cpu"))
    learner = components.build_learner(config, network, torch.device("cpu"))
    assert (learner.cg_solver, learner.neumann_step_size, learner.cg_steps) == ("neumann", 0.03, 3)
    with patch.object(loop.TensorBoard, "scalars", autospec=True, side_effect=loop.TensorBoard.scalars) as logged:
        train(compose(QUICK + ["cg.solver=neumann", "cg.step_size=0.03", "train.log_every=1"]), tmp_path)
    train_logs = [call.args[2] for call in logged.call_args_list if call.args[1] == "train"]
    steps, residuals = [v["cg_steps"] for v in train_logs], [v["cg_residual"] for v in train_logs]
    # QUICK takes 2 steps; a residual below 1 means the series shrank b - Ag from b.
    assert steps == [2.0] * 4 and all(0 < r < 1 for r in residuals)
