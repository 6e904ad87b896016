"""The meta-gradients against independent truths: closed forms, finite differences, autograd."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from conftest import QUICK, compose
from imaml_cli.config import validate
from imaml_cli.data import TaskBatch
from imaml_cli.engine import components
from imaml_cli.meta import tree
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import GradientDescent, NewtonCG, proximal
from imaml_cli.meta.task import TaskModel
from imaml_cli.models import ConvNet, MLP


def linear_regression_tasks(tasks, n_support, n_query, dim, generator):
    def draw(n):
        return torch.randn(tasks, n, dim, generator=generator, dtype=torch.float64)
    xs, xq = draw(n_support), draw(n_query)
    w = torch.randn(tasks, dim, 1, generator=generator, dtype=torch.float64)
    return TaskBatch(xs, xs @ w + 0.1 * torch.randn(tasks, n_support, 1, generator=generator, dtype=torch.float64),
                 xq, xq @ w)


def linear_regression_meta_gradient(tasks, theta, lam, damping=0.0):
    """The mean over tasks of ((1+δ)I + A/λ)⁻¹∇L_test(φ*), with φ* = (A+λI)⁻¹(b+λθ) in closed form.
    At δ = 0 it is dφ*/dθᵀ∇L_test = λ(A+λI)⁻¹∇L_test."""
    dim = theta["weight"].shape[1]
    eye = torch.eye(dim, dtype=torch.float64)
    expected = torch.zeros(dim, dtype=torch.float64)
    for xs, ys, xq, yq in zip(*tasks):
        a = 2.0 / len(xs) * xs.T @ xs
        phi = torch.linalg.solve(a + lam * eye, 2.0 / len(xs) * xs.T @ ys[:, 0] + lam * theta["weight"][0])
        test_grad = 2.0 / len(xq) * xq.T @ (xq @ phi - yq[:, 0])
        expected += torch.linalg.solve((1 + damping) * eye + a / lam, test_grad) / len(tasks.support_x)
    return expected


@pytest.mark.parametrize("stop_at_negative_curvature", [True, False], ids=["truncated_cg", "plain_cg"])
@pytest.mark.parametrize("n_support", [20, 3], ids=["full_rank", "rank_deficient"])
def test_imaml_matches_closed_form_on_linear_regression(n_support, stop_at_negative_curvature):
    """Inner problem min ½‖Xφ−y‖²·2/n + λ/2‖φ−θ‖²: φ* = (A+λI)⁻¹(b+λθ), dφ*/dθ = λ(A+λI)⁻¹."""
    g = torch.Generator().manual_seed(0)
    dim, lam = 8, 0.7
    net = nn.Linear(dim, 1, bias=False).double()
    model = TaskModel(net, "regression")
    tasks = linear_regression_tasks(3, n_support, 10, dim, g)
    theta = {"weight": torch.randn(1, dim, generator=g, dtype=torch.float64)}
    learner = MetaLearner(model, "imaml", NewtonCG(steps=2, cg_steps=dim + 2), lam=lam, cg_steps=dim,
                          cg_stop_at_negative_curvature=stop_at_negative_curvature)

    meta_grad, metrics = learner.meta_gradient(theta, tasks)

    expected = linear_regression_meta_gradient(tasks, theta, lam)
    if n_support < dim:
        xs = tasks.support_x[-1]
        assert torch.linalg.matrix_rank(2.0 / len(xs) * xs.T @ xs) < dim
    # Not rounding-level: CG stops at a relative residual of about 1e-6 (asserted below) in these
    # ill-conditioned systems, so the solution is good to about that much relative to its size.
    torch.testing.assert_close(meta_grad["weight"][0], expected, rtol=1e-5, atol=1e-10)
    assert metrics["cg_residual"].max() < 1e-6


def smooth_classifier():
    torch.manual_seed(0)
    return MLP((3, 6, 3), activation="tanh").double()


def classification_tasks(tasks, n, dim, classes, generator):
    def draw():
        return (torch.randn(tasks, n, dim, generator=generator, dtype=torch.float64),
                torch.randint(classes, (tasks, n), generator=generator))
    return TaskBatch(*draw(), *draw())


def test_imaml_matches_finite_differences_of_the_meta_objective():
    g = torch.Generator().manual_seed(1)
    model = TaskModel(smooth_classifier(), "classification")
    theta = model.parameters()
    size = sum(v.numel() for v in theta.values())
    tasks = classification_tasks(2, 6, 3, 3, g)
    inner = NewtonCG(steps=12, cg_steps=size)
    learner = MetaLearner(model, "imaml", inner, lam=2.0, cg_steps=size)

    def meta_objective(theta):
        phi, _ = learner.adapt(theta, tasks)
        return torch.stack([model.loss({k: v[t] for k, v in phi.items()}, tasks.query_x[t], tasks.query_y[t])
                            for t in range(len(tasks.query_x))]).mean()

    # The inner problem must be solved tightly for the implicit gradient to be the true gradient.
    phi, _ = learner.adapt(theta, tasks)
    for t in range(2):
        objective = proximal(lambda p: model.loss(p, tasks.support_x[t], tasks.support_y[t]), theta, 2.0)
        stationarity = torch.func.grad(objective)({k: v[t] for k, v in phi.items()})
        assert tree.norm(stationarity) < 1e-10

    meta_grad, _ = learner.meta_gradient(theta, tasks)
    eps = 1e-5
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
        direction = tree.scale(direction, 1.0 / tree.norm(direction))
        numeric = (meta_objective(tree.add(theta, direction, eps))
                   - meta_objective(tree.add(theta, direction, -eps))) / (2 * eps)
        analytic = tree.dot(meta_grad, direction)
        # Central differences at eps 1e-5 err by about eps² · f''' ≈ 1e-10 plus rounding 1e-16 / eps ≈ 1e-11,
        # and φ is solved to a stationarity of 1e-10; 1e-5 relative is far above those and far
        # below a wrong meta-gradient (off at order 1e-2 or more).
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def flatten(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(flat, like):
    sizes = [v.numel() for v in like.values()]
    return {k: part.reshape(v.shape) for (k, v), part in zip(like.items(), flat.split(sizes))}


def one_gd_step_from_theta():
    """One task one GD step from θ with a small λ, far from the inner minimum: the model, θ, the
    task, the inner solver, λ, and at φ the query gradient and the support loss's dense Hessian."""
    g = torch.Generator().manual_seed(3)
    model = TaskModel(smooth_classifier(), "classification")
    theta = model.parameters()
    tasks = TaskBatch(*(t[:1] for t in classification_tasks(1, 6, 3, 3, g)))
    inner, lam = GradientDescent(steps=1, lr=0.5), 0.1
    phi, _ = MetaLearner(model, "imaml", inner, lam=lam).adapt(theta, tasks)
    phi = {k: v[0] for k, v in phi.items()}
    b = flatten(torch.func.grad(model.loss)(phi, tasks.query_x[0], tasks.query_y[0]))
    hessian = torch.func.hessian(lambda flat: model.loss(unflatten(flat, phi), tasks.support_x[0],
                                                         tasks.support_y[0]))(flatten(phi))
    return model, theta, tasks, inner, lam, b, hessian


def test_truncated_cg_is_the_galerkin_solution_on_the_krylov_space_before_negative_curvature():
    """Away from the inner minimum (one GD step, a small λ) I + H/λ is indefinite. CG stopped at
    the first direction with pᵀAp ≤ 0 returns the solution of A x = b restricted to the largest
    Krylov space span{b, Ab, …} on which A is still positive definite: computed here densely from
    the full Hessian and an orthonormal Krylov basis."""
    model, theta, tasks, inner, lam, b, hessian = one_gd_step_from_theta()
    matrix = torch.eye(len(b), dtype=b.dtype) + hessian / lam
    assert torch.linalg.eigvalsh(matrix)[0] < 0

    krylov = [b]
    while True:
        basis = torch.linalg.qr(torch.stack(krylov, 1)).Q
        if torch.linalg.eigvalsh(basis.T @ matrix @ basis)[0] <= 0:
            break
        krylov.append(matrix @ krylov[-1])
    assert len(krylov) >= 3, "the test should stop CG after a few steps, not at the first"
    basis = torch.linalg.qr(torch.stack(krylov[:-1], 1)).Q
    expected = basis @ torch.linalg.solve(basis.T @ matrix @ basis, basis.T @ b)

    learner = MetaLearner(model, "imaml", inner, lam=lam, cg_steps=len(b), cg_stop_at_negative_curvature=True)
    meta_grad, metrics = learner.meta_gradient(theta, tasks)
    # Not rounding-level: CG's recurrences lose orthogonality against the dense Krylov basis in
    # an indefinite system; 1e-6 still separates it from plain CG (checked below at 1e-3).
    torch.testing.assert_close(flatten(meta_grad), expected, rtol=1e-6, atol=1e-9)
    assert metrics["cg_steps"].item() == len(krylov) - 1
    plain = MetaLearner(model, "imaml", inner, lam=lam, cg_steps=len(b), cg_stop_at_negative_curvature=False)
    assert not torch.allclose(flatten(plain.meta_gradient(theta, tasks)[0]), expected, rtol=1e-3)


def test_trust_radius_bounds_the_meta_gradient_only_where_the_inner_problem_is_not_minimised():
    """At a minimiser of the inner problem (1+δ)I + H/λ ⪰ δI, so ‖meta-gradient‖ ≤ ‖∇L_test‖/δ and the
    stop never acts: on linear regression (convex) the trust radius leaves the closed form
    ((1+δ)I + A/λ)⁻¹∇L_test. One GD step from θ with a small λ leaves φ where the damped matrix,
    positive definite but with an eigenvalue near 0, sends plain CG far outside that sphere; the
    trust radius ends on it."""
    g = torch.Generator().manual_seed(0)
    dim, lam, damping = 6, 0.7, 0.5
    model = TaskModel(nn.Linear(dim, 1, bias=False).double(), "regression")
    tasks = linear_regression_tasks(2, 4, 10, dim, g)
    theta = {"weight": torch.randn(1, dim, generator=g, dtype=torch.float64)}
    learner = MetaLearner(model, "imaml", NewtonCG(steps=2, cg_steps=dim + 2), lam=lam, cg_steps=dim,
                          cg_damping=damping, cg_trust_radius=True)
    meta_grad, metrics = learner.meta_gradient(theta, tasks)
    expected = linear_regression_meta_gradient(tasks, theta, lam, damping)
    torch.testing.assert_close(meta_grad["weight"][0], expected, rtol=1e-6, atol=1e-10)
    assert metrics["cg_radius_stop"].tolist() == [0.0, 0.0]

    model, theta, tasks, inner, lam, b, hessian = one_gd_step_from_theta()
    # δ puts the damped matrix's smallest eigenvalue at 1e-3: positive definite, far below δ.
    damping = 1e-3 - 1 - torch.linalg.eigvalsh(hessian / lam)[0].item()
    matrix = (1 + damping) * torch.eye(len(b), dtype=b.dtype) + hessian / lam
    radius = b.norm() / damping
    assert damping > 0 and torch.linalg.solve(matrix, b).norm() > 10 * radius

    def solve(trust_radius):
        learner = MetaLearner(model, "imaml", inner, lam=lam, cg_steps=len(b), cg_damping=damping,
                              cg_trust_radius=trust_radius)
        meta_grad, metrics = learner.meta_gradient(theta, tasks)
        return flatten(meta_grad), metrics

    bounded, metrics = solve(True)
    torch.testing.assert_close(bounded.norm(), radius)
    assert metrics["cg_radius_stop"].item() == 1 and metrics["cg_negative_curvature"].item() == 0
    assert solve(False)[0].norm() > 2 * radius


@pytest.mark.parametrize("solver", [["cg.solver=cg", "cg.steps=60"],
                                    ["cg.solver=neumann", "cg.steps=200", "cg.step_size=0.3"]], ids=["cg", "neumann"])
def test_cg_damping_from_the_config_solves_the_damped_system(solver):
    """cg.damping=δ makes the meta-gradient (I + H/λ + δI)⁻¹∇L_test(φ), H the support loss's Hessian
    at φ: checked against a dense solve with the full Hessian, on the sinusoid MLP built from the
    config (in float64, so that both solves are exact to rounding)."""
    lam, damping = 10.0, 1.0
    config = validate(compose(QUICK + [f"algorithm.lam={lam}", f"cg.damping={damping}", *solver]))
    network = components.build_network(config, torch.device("cpu")).double()
    learner = components.build_learner(config, network, torch.device("cpu"))
    tasks = components.build_source(config, "train", torch.device("cpu")).sample(2, torch.Generator().manual_seed(0))
    tasks = TaskBatch(*(t.double() for t in tasks))
    theta = {k: v.detach() for k, v in network.named_parameters()}
    model = learner.model

    meta_grad, _ = learner.meta_gradient(theta, tasks)

    phi, _ = learner.adapt(theta, tasks)
    damped, undamped = 0.0, 0.0
    for t in range(2):
        phi_t = {k: v[t] for k, v in phi.items()}
        hessian = torch.func.hessian(lambda flat: model.loss(unflatten(flat, theta), tasks.support_x[t],
                                                             tasks.support_y[t]))(flatten(phi_t))
        b = flatten(torch.func.grad(model.loss)(phi_t, tasks.query_x[t], tasks.query_y[t]))
        eye = torch.eye(len(b), dtype=b.dtype)
        matrix = (1 + damping) * eye + hessian / lam
        # Positive definite with eigenvalues in about [0.4, 4.9], so CG's 60 steps and the series'
        # 200 at α = 0.3 < 2/4.9 converge.
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert 0.1 < eigenvalues[0] and eigenvalues[-1] < 2 / 0.3
        damped = damped + torch.linalg.solve(matrix, b) / 2
        undamped = undamped + torch.linalg.solve(eye + hessian / lam, b) / 2
    # Converged solves of the same system (residuals below 1e-11 relative), far from the undamped one.
    torch.testing.assert_close(flatten(meta_grad), damped, rtol=1e-8, atol=1e-10)
    assert (undamped - damped).norm() > 0.5 * damped.norm()


def small_convnet():
    torch.manual_seed(0)
    return ConvNet(1, 8, 4, 3, blocks=2, stride=2).double()


def image_tasks(tasks, generator):
    return TaskBatch(torch.randn(tasks, 6, 1, 8, 8, generator=generator, dtype=torch.float64),
                 torch.arange(3).repeat(tasks, 2),
                 torch.randn(tasks, 6, 1, 8, 8, generator=generator, dtype=torch.float64),
                 torch.arange(3).repeat(tasks, 2))


def test_maml_matches_autograd_through_an_unrolled_loop():
    g = torch.Generator().manual_seed(2)
    net = small_convnet()
    tasks = image_tasks(3, g)
    steps, lr = 3, 0.3
    learner = MetaLearner(TaskModel(net, "classification"), "maml", GradientDescent(steps, lr))
    meta_grad, _ = learner.meta_gradient(dict(net.named_parameters()), tasks)

    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    total = 0.0
    for xs, ys, xq, yq in zip(*tasks):
        phi = dict(theta)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(functional_call(net, phi, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: v - lr * gk for (k, v), gk in zip(phi.items(), grads)}
        total = total + nn.functional.cross_entropy(functional_call(net, phi, (xq,)), yq) / len(tasks.query_x)
    expected = dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))
    for k in expected:
        torch.testing.assert_close(meta_grad[k], expected[k], rtol=1e-8, atol=1e-12)


def relative_error(a, b):
    return (tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)).item()


@pytest.mark.parametrize("algorithm, inner, damping", [
    ("imaml", GradientDescent(4, 0.1), 0.0), ("imaml", GradientDescent(4, 0.1), 0.3), ("imaml", NewtonCG(2, 3), 0.0),
    ("maml", GradientDescent(3, 0.1), 0.0), ("fomaml", GradientDescent(3, 0.1), 0.0),
    ("reptile", GradientDescent(3, 0.1), 0.0)])
def test_batched_equals_per_task_loop(algorithm, inner, damping):
    # Seeded and in float64: the two paths sum in different orders, and truncated CG's stop at the
    # first non-positive curvature is discontinuous, so in float32 a draw near a tie could stop
    # one path a step earlier than the other. In float64 they agree to rounding (1e-9 leaves three
    # orders of magnitude above it, far below any real difference).
    g = torch.Generator().manual_seed(3)
    net = small_convnet()
    tasks = image_tasks(4, g)
    model = TaskModel(net, "classification")
    # λ ≠ 1: at λ = 1, a path that used 1/λ for λ would agree with the other.
    kwargs = dict(algorithm=algorithm, inner=inner, lam=0.5, cg_steps=3, cg_damping=damping)
    batched, batched_metrics = MetaLearner(model, **kwargs).meta_gradient(model.parameters(), tasks)
    looped, looped_metrics = MetaLearner(model, vectorize=False, **kwargs).meta_gradient(model.parameters(), tasks)
    assert relative_error(batched, looped) < 1e-9
    assert batched_metrics.keys() == looped_metrics.keys()
    for k in looped_metrics:
        torch.testing.assert_close(batched_metrics[k], looped_metrics[k], rtol=1e-9, atol=1e-12)


def plain_steps(model, theta, batches, steps, lr):
    """Gradient steps by hand, step i on batches[i % len(batches)]."""
    phi = theta
    for i in range(steps):
        x, y = batches[i % len(batches)]
        phi = tree.add(phi, torch.func.grad(model.loss)(phi, x, y), -lr)
    return phi


@pytest.mark.parametrize("alternate_query", [True, False])
def test_reptile_and_fomaml_are_what_they_claim(alternate_query):
    g = torch.Generator().manual_seed(4)
    model = TaskModel(smooth_classifier(), "classification")
    tasks = classification_tasks(2, 6, 3, 3, g)
    theta = model.parameters()
    inner = GradientDescent(5, 0.2)
    reptile, _ = MetaLearner(model, "reptile", inner, alternate_query=alternate_query).meta_gradient(theta, tasks)
    fomaml, _ = MetaLearner(model, "fomaml", inner, alternate_query=alternate_query).meta_gradient(theta, tasks)
    phi, _ = MetaLearner(model, "fomaml", inner).adapt(theta, tasks)
    for k in theta:
        expected = sum(theta[k] - plain_steps(model, theta, [(xs, ys), (xq, yq)][:2 if alternate_query else 1],
                                              5, 0.2)[k] for xs, ys, xq, yq in zip(*tasks)) / 2
        torch.testing.assert_close(reptile[k], expected)
    # Adaptation alone (evaluation) takes every step on the support set.
    adapted, _ = MetaLearner(model, "reptile", inner, alternate_query=alternate_query).adapt(theta, tasks)
    on_support = plain_steps(model, theta, [(tasks.support_x[1], tasks.support_y[1])], 5, 0.2)
    for k in theta:
        torch.testing.assert_close(adapted[k][1], on_support[k])
    query_grads = [torch.func.grad(model.loss)({k: v[t] for k, v in phi.items()}, tasks.query_x[t], tasks.query_y[t])
                   for t in range(2)]
    for k in theta:
        torch.testing.assert_close(fomaml[k], (query_grads[0][k] + query_grads[1][k]) / 2)


def quadratic_tasks(generator, tasks=3, dim=6, top=10.0):
    """Losses ½φᵀAφ − bᵀφ with A's eigenvalues spread over [0.5, top], and θ."""
    q = torch.linalg.qr(torch.randn(tasks, dim, dim, generator=generator, dtype=torch.float64)).Q
    a = q @ torch.diag_embed(torch.linspace(0.5, top, dim, dtype=torch.float64).expand(tasks, dim)) @ q.transpose(1, 2)
    b = torch.randn(tasks, dim, generator=generator, dtype=torch.float64)
    theta = {"w": torch.randn(dim, generator=generator, dtype=torch.float64)}
    return a, b, theta


def quadratic_loss(a, b):
    return lambda p: 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]


def test_backtracking_gradient_descent_reaches_the_minimum_where_plain_gd_diverges():
    a, b, theta = quadratic_tasks(torch.Generator().manual_seed(4))
    lam, lr = 2.0, 1.0  # lr·(10 + λ) = 12 > 2: plain GD diverges along the top eigenvector
    expected = torch.linalg.solve(a + lam * torch.eye(6, dtype=torch.float64), b + lam * theta["w"])

    def solve(solver):
        per_task = vmap(lambda a, b: solver(quadratic_loss(a, b), theta, lam)["w"])(a, b)
        batched = solver.batched(lambda p: ({"w": (a @ p["w"].unsqueeze(-1)).squeeze(-1) - b},
                                            vmap(lambda a, b, w: quadratic_loss(a, b)({"w": w}))(a, b, p["w"])),
                                 theta, lam, 3)
        return per_task, batched["w"]

    per_task, batched = solve(GradientDescent(60, lr, backtrack=True))
    # Not rounding-level: an iterative solve. Once lr is halved below 2/12 (A + λI has eigenvalues
    # 2.5 to 12) each step shrinks the error by a constant factor; 60 steps end far below 1e-8.
    torch.testing.assert_close(per_task, expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(batched, expected, rtol=1e-8, atol=1e-8)
    diverged, _ = solve(GradientDescent(60, lr))
    assert (diverged - expected).norm() > 1e3


def test_backtracking_gradient_descent_at_a_safe_step_is_plain_gd_one_step_shorter():
    """Where every step lowers the objective, ``steps`` evaluations give ``steps - 1`` plain steps."""
    a, b, theta = quadratic_tasks(torch.Generator().manual_seed(5))
    lam, lr = 0.5, 0.05
    backtracking = vmap(lambda a, b: GradientDescent(7, lr, backtrack=True)(quadratic_loss(a, b), theta, lam))(a, b)
    plain = vmap(lambda a, b: GradientDescent(6, lr)(quadratic_loss(a, b), theta, lam))(a, b)
    torch.testing.assert_close(backtracking["w"], plain["w"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(backtracking["w"], theta["w"])


def test_newton_cg_beats_gradient_descent_on_an_ill_conditioned_problem_at_equal_compute():
    g = torch.Generator().manual_seed(5)
    dim, n, lam = 20, 40, 1e-3
    scales = torch.logspace(0, 2, dim, dtype=torch.float64)  # Hessian condition number about 1e4
    xs = torch.randn(1, n, dim, generator=g, dtype=torch.float64) * scales
    ys = torch.randn(1, n, 1, generator=g, dtype=torch.float64)
    model = TaskModel(nn.Linear(dim, 1, bias=False).double(), "regression")
    theta = {"weight": torch.zeros(1, dim, dtype=torch.float64)}
    tasks = TaskBatch(xs, ys, xs, ys)

    a = 2.0 / n * xs[0].T @ xs[0]
    curvature = torch.linalg.eigvalsh(a).max().item() + lam
    newton = NewtonCG(steps=2, cg_steps=dim)
    # Count a Hessian-vector product as three gradients and each line-search trial as one.
    from imaml_cli.meta.inner import LINE_SEARCH_STEPS
    budget = newton.steps * (1 + 3 * newton.cg_steps + len(LINE_SEARCH_STEPS))
    gd = GradientDescent(budget, 1.0 / curvature)

    def final_objective(inner):
        phi, _ = MetaLearner(model, "imaml", inner, lam=lam).adapt(theta, tasks)
        return proximal(lambda p: model.loss(p, xs[0], ys[0]), theta, lam)({"weight": phi["weight"][0]})

    optimum = torch.linalg.solve(a + lam * torch.eye(dim, dtype=torch.float64), 2.0 / n * xs[0].T @ ys[0, :, 0])
    best = proximal(lambda p: model.loss(p, xs[0], ys[0]), theta, lam)({"weight": optimum[None]})
    gap_newton = (final_objective(newton) - best).item()
    gap_gd = (final_objective(gd) - best).item()
    assert gap_newton < 0.1 * gap_gd, (gap_newton, gap_gd)
