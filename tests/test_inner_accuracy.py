"""The measurements of iMAML's assumptions against independent truths: ‖∇G(φ)‖ by autograd and 0 at
a closed-form minimiser, the top Hessian eigenvalue by a dense eigendecomposition, and the run's
logs and results.json carrying them."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.func import functional_call

from conftest import QUICK, compose
from imaml_cli.engine.loop import train
from imaml_cli.meta import tree
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import GradientDescent, NewtonCG
from imaml_cli.meta.task import TaskModel
from test_meta_gradient import image_tasks, linear_regression_tasks, small_convnet

LAM = 0.5  # not 1, where λ and 1/λ coincide


def proximal_gradient_norm(net, theta, phi, xs, ys):
    """‖∇(L̂ + λ/2‖φ − θ‖²)‖ at one task's φ, by torch.autograd on the network itself."""
    params = {k: v.detach().clone().requires_grad_() for k, v in phi.items()}
    loss = nn.functional.cross_entropy(functional_call(net, params, (xs,)), ys)
    loss = loss + LAM / 2 * sum(((params[k] - theta[k]) ** 2).sum() for k in params)
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.sqrt(sum((g ** 2).sum() for g in grads))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
@pytest.mark.parametrize("inner", [GradientDescent(4, 0.3, backtrack=True), NewtonCG(2, 3)], ids=["gd", "hf"])
def test_inner_grad_norm_is_the_proximal_gradient_norm_at_phi(fused, inner):
    net = small_convnet()
    tasks = image_tasks(3, torch.Generator().manual_seed(5))
    learner = MetaLearner(TaskModel(net, "classification"), "imaml", inner, lam=LAM, cg_steps=3, fused=fused)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    phi, metrics = learner.adapt(theta, tasks)
    expected = torch.stack([proximal_gradient_norm(net, theta, {k: v[t] for k, v in phi.items()},
                                                   tasks.support_x[t], tasks.support_y[t]) for t in range(3)])
    torch.testing.assert_close(metrics["inner_grad_norm"], expected, rtol=1e-9, atol=1e-12)
    # The meta-step reports the same (on the fused path from the linearisation CG uses).
    _, step_metrics = learner.meta_gradient(theta, tasks)
    torch.testing.assert_close(step_metrics["inner_grad_norm"], expected, rtol=1e-9, atol=1e-12)
    assert expected.min() > 1e-3  # a few steps do not reach the minimiser here


def test_inner_grad_norm_vanishes_at_the_closed_form_minimiser():
    """Linear regression: Newton-CG with enough CG steps lands on φ* = (A + λI)⁻¹(b + λθ)."""
    g = torch.Generator().manual_seed(6)
    dim = 6
    net = nn.Linear(dim, 1, bias=False).double()
    tasks = linear_regression_tasks(3, 20, 5, dim, g)
    theta = {"weight": torch.randn(1, dim, generator=g, dtype=torch.float64)}
    exact = MetaLearner(TaskModel(net, "regression"), "imaml", NewtonCG(steps=1, cg_steps=dim + 2), lam=LAM)
    _, metrics = exact.adapt(theta, tasks)
    assert metrics["inner_grad_norm"].max() < 1e-10
    rough = MetaLearner(TaskModel(net, "regression"), "imaml", GradientDescent(1, 0.01), lam=LAM)
    _, metrics = rough.adapt(theta, tasks)
    assert metrics["inner_grad_norm"].min() > 1e-2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
def test_top_hessian_eigenvalue_is_the_dense_hessians_largest_in_magnitude(fused):
    net = small_convnet()
    tasks = image_tasks(2, torch.Generator().manual_seed(7))
    learner = MetaLearner(TaskModel(net, "classification"), "imaml", GradientDescent(3, 0.3), lam=LAM, fused=fused)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    estimate = learner.top_hessian_eigenvalue(theta, tasks, iterations=400)
    phi, _ = learner.adapt(theta, tasks)
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    for t in range(2):
        flat = torch.cat([phi[k][t].flatten() for k in names])

        def loss(vector):
            params, start = {}, 0
            for name, shape in zip(names, shapes):
                params[name] = vector[start:start + shape.numel()].view(shape)
                start += shape.numel()
            return nn.functional.cross_entropy(functional_call(net, params, (tasks.support_x[t],)), tasks.support_y[t])

        eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
        largest = eigenvalues[eigenvalues.abs().argmax()]
        torch.testing.assert_close(estimate[t], largest, rtol=1e-4, atol=0)


def test_cg_flags_a_system_that_is_not_positive_definite():
    learner = MetaLearner(TaskModel(nn.Linear(2, 1), "regression"), "imaml", GradientDescent(1, 0.1), lam=LAM,
                          cg_steps=3)
    b = {"w": torch.tensor([[1.0, 2.0], [3.0, -1.0]])}
    # I + H/λ with H = −3I (λ = 0.5): −5I, negative definite; with H = +3I: 7I.
    _, negative = learner._solve(lambda v: tree.scale(v, -3.0), b, batch_dims=1)
    _, positive = learner._solve(lambda v: tree.scale(v, 3.0), b, batch_dims=1)
    assert negative["cg_negative_curvature"].tolist() == [1.0, 1.0]
    assert positive["cg_negative_curvature"].tolist() == [0.0, 0.0]


def test_cg_trust_radius_flags_a_system_below_the_damping():
    learner = MetaLearner(TaskModel(nn.Linear(2, 1), "regression"), "imaml", GradientDescent(1, 0.1), lam=LAM,
                          cg_steps=3, cg_damping=1.0, cg_trust_radius=True)
    b = {"w": torch.tensor([[1.0, 2.0], [3.0, -1.0]])}
    # (1 + δ)I + H/λ with δ = 1, λ = 0.5: H = −0.45I gives 1.1I ⪰ δI, solution b/1.1 inside ‖b‖/δ;
    # H = −0.75I gives 0.5I, solution 2b outside: the stop is where b's ray meets the sphere, b itself.
    inside, inside_metrics = learner._solve(lambda v: tree.scale(v, -0.45), b, batch_dims=1)
    outside, outside_metrics = learner._solve(lambda v: tree.scale(v, -0.75), b, batch_dims=1)
    torch.testing.assert_close(inside["w"], b["w"] / 1.1)
    torch.testing.assert_close(outside["w"], b["w"])
    assert inside_metrics["cg_radius_stop"].tolist() == [0.0, 0.0]
    assert outside_metrics["cg_radius_stop"].tolist() == [1.0, 1.0]
    assert outside_metrics["cg_negative_curvature"].tolist() == [0.0, 0.0]


def test_a_run_logs_the_measurements_and_reports_them(tmp_path):
    run = tmp_path / "run"
    train(compose(QUICK + ["train.log_every=1", "train.curvature_tasks=2", "train.power_iterations=5",
                           "cg.damping=1", "cg.trust_radius=true"]), run)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    mean = [e.value for e in events.Scalars("train/inner_grad_norm")]
    peak = [e.value for e in events.Scalars("train/inner_grad_norm_max")]
    assert len(mean) == len(peak) == 4 and all(p >= m > 0 for p, m in zip(peak, mean))
    assert [e.step for e in events.Scalars("val/top_hessian_eigenvalue")] == [2, 4]
    assert len(events.Scalars("train/cg_negative_curvature")) == len(events.Scalars("train/cg_radius_stop")) == 4
    assumptions = json.loads((run / "results.json").read_text())["assumptions"]
    assert assumptions["inner_grad_norm"] == pytest.approx(sum(mean) / 4, rel=1e-6)
    assert assumptions["inner_grad_norm_max"] == pytest.approx(sum(peak) / 4, rel=1e-6)
    assert assumptions["top_hessian_eigenvalue"] == pytest.approx(events.Scalars("val/top_hessian_eigenvalue")[-1].value)
    assert {"cg_residual", "cg_negative_curvature", "cg_radius_stop", "last_meta_steps"} <= set(assumptions)


def test_the_peak_meta_gradient_norm_covers_the_meta_steps_between_writes(tmp_path):
    # The same seed logged at every meta-step gives each step's norm; written every 2, the peak
    # must be the larger of the two steps since the last write, not of all steps before.
    def norms(log_every, tag):
        train(compose(QUICK + ["train.meta_steps=8", f"train.log_every={log_every}", "train.val_every=0"]),
              tmp_path / str(log_every))
        events = EventAccumulator(str(tmp_path / str(log_every) / "tb"))
        events.Reload()
        return {e.step: e.value for e in events.Scalars(tag)}

    every = norms(1, "train/meta_grad_norm")
    expected = {step: max(every[step - 1], every[step]) for step in (2, 4, 6, 8)}
    assert list(expected.values()) != sorted(expected.values()), "a later pair's peak must fall below an earlier's"
    assert norms(2, "train/meta_grad_norm_peak") == pytest.approx(expected, rel=1e-6)


def test_evaluation_reports_the_median_inner_grad_norm(tmp_path):
    from imaml_cli.engine.evaluation_run import evaluate_checkpoint

    run = tmp_path / "run"
    train(compose(QUICK), run)
    overrides = [f"checkpoint={run}", "eval.episodes=6", "eval.batch_size=4"]
    evaluate_checkpoint(compose(overrides, config_name="eval"), overrides, tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # The same episodes adapted again through the learner: the median of the per-task norms.
    from imaml_cli.data import fixed_episodes
    from imaml_cli.engine import components
    from imaml_cli.engine.checkpoint import load_checkpoint, load_params
    from imaml_cli.config import validate

    state = load_checkpoint(run / "checkpoints" / "best.pt")
    config = validate(compose(QUICK))
    network = components.build_network(config, torch.device("cpu"))
    load_params(network, state, "best.pt")
    learner = components.build_learner(config, network, torch.device("cpu"))
    source = components.build_source(config, "test", torch.device("cpu"), evaluation=True)
    norms = torch.cat([learner.adapt(dict(network.named_parameters()), batch)[1]["inner_grad_norm"]
                       for batch in fixed_episodes(source, 6, 0, 4)])
    assert report["inner_grad_norm_median"] == pytest.approx(norms.median().item(), rel=1e-6)


# The inner solver to a tolerance: quadratic tasks, whose minimiser is known.

def quadratic_batch(generator, lam):
    from test_meta_gradient import quadratic_tasks

    a, b, theta = quadratic_tasks(generator)
    expected = torch.linalg.solve(a + lam * torch.eye(6, dtype=torch.float64), b + lam * theta["w"])
    return a, b, theta, expected


def solve_both_ways(solver, a, b, theta, lam):
    """φ by the per-task (vmap) and the batched form of ``solver`` on quadratic tasks, and what each
    reported per task."""
    from torch.func import vmap

    from test_meta_gradient import quadratic_loss

    def one(a, b):
        report = {}
        return solver(quadratic_loss(a, b), theta, lam, report=report)["w"], report

    def gradient(p):
        return {"w": (a @ p["w"].unsqueeze(-1)).squeeze(-1) - b}

    def losses(p):
        return vmap(lambda a, b, w: quadratic_loss(a, b)({"w": w}))(a, b, p["w"])

    per_task, per_task_report = vmap(one)(a, b)
    batched_report = {}
    if isinstance(solver, NewtonCG):
        batched = solver.batched(lambda p: (gradient(p), losses(p),
                                            lambda v: {"w": (a @ v["w"].unsqueeze(-1)).squeeze(-1)}),
                                 losses, theta, lam, len(a), report=batched_report)
    else:
        batched = solver.batched(lambda p: (gradient(p), losses(p)), theta, lam, len(a), report=batched_report)
    return per_task, batched["w"], (per_task_report, batched_report)


def proximal_norms(a, b, theta, lam, phi):
    return ((a @ phi.unsqueeze(-1)).squeeze(-1) - b + lam * (phi - theta["w"])).norm(dim=-1)


def test_gd_to_a_tolerance_stops_each_task_once_its_proximal_gradient_is_below_it():
    lam, tol = 2.0, 1e-3
    a, b, theta, expected = quadratic_batch(torch.Generator().manual_seed(4), lam)
    # lr 1.0 overshoots (A + λI reaches 12): backtracking halves it to a stable step.
    solver = GradientDescent(400, 1.0, backtrack=True, tol=tol)
    per_task, batched, _ = solve_both_ways(solver, a, b, theta, lam)
    torch.testing.assert_close(per_task, batched, rtol=1e-12, atol=1e-12)
    assert (proximal_norms(a, b, theta, lam, batched) <= tol).all()
    # Every task stopped there, and the batched solve ended once all had: far fewer than 400
    # gradient evaluations, where the exact minimiser is further on.
    calls = []

    def gradient(p):
        calls.append(1)
        return ({"w": (a @ p["w"].unsqueeze(-1)).squeeze(-1) - b},
                0.5 * (p["w"].unsqueeze(1) @ a @ p["w"].unsqueeze(-1)).flatten() - (b * p["w"]).sum(-1))

    solver.batched(gradient, theta, lam, len(a))
    assert len(calls) < 100
    assert ((batched - expected).norm(dim=-1) > 1e-7).all()


def test_defaults_leave_the_backtracking_solver_as_it_was():
    """tol = 0 takes the same steps as the solver before it existed: halve on every undone step,
    run every step (written out here by hand)."""
    lam, lr, steps = 2.0, 1.0, 12
    a, b, theta, _ = quadratic_batch(torch.Generator().manual_seed(8), lam)
    _, batched, _ = solve_both_ways(GradientDescent(steps, lr, backtrack=True), a, b, theta, lam)
    for t in range(len(a)):
        def objective(w):
            return 0.5 * w @ a[t] @ w - b[t] @ w + lam / 2 * (w - theta["w"]).square().sum()

        w, step = theta["w"].clone(), lr
        for _ in range(steps - 1):
            candidate = w - step * (a[t] @ w - b[t] + lam * (w - theta["w"]))
            if objective(candidate) <= objective(w):
                w = candidate
            else:
                step /= 2
        torch.testing.assert_close(batched[t], w, rtol=1e-12, atol=1e-12)


def test_a_tolerance_needs_backtracking():
    with pytest.raises(ValueError, match="tol needs backtrack"):
        GradientDescent(3, 0.1, tol=0.01)


def test_imaml_eval_adapts_an_old_checkpoint_to_a_tolerance(tmp_path):
    from imaml_cli.engine.evaluation_run import evaluate_checkpoint

    # A smooth activation: a ReLU net's proximal gradient need not vanish at the inner minimiser,
    # which sits on a kink (docs/results.md, "How far the inner solve gets").
    run = tmp_path / "run"
    train(compose(QUICK + ["model.activation=softplus"]), run)
    base = [f"checkpoint={run}", "eval.episodes=6", "eval.batch_size=3", "inner_solver.lr=0.1"]
    medians = {}
    for name, extra in (("preset", []), ("tol", ["inner_solver.tol=0.01", "inner_solver.steps=500"])):
        evaluate_checkpoint(compose(base + extra, config_name="eval"), base + extra, tmp_path / name)
        medians[name] = json.loads((tmp_path / name / "eval.json").read_text())["inner_grad_norm_median"]
    assert medians["tol"] <= 0.01 < medians["preset"]


def test_a_tolerance_is_refused_where_nothing_would_use_it():
    from imaml_cli.config import validate
    from imaml_cli.errors import UserError

    with pytest.raises(UserError, match="inner_solver.tol steers iMAML's backtracking gradient descent"):
        validate(compose(QUICK + ["algorithm=maml", "inner_solver.tol=0.1"]))
    validate(compose(QUICK + ["inner_solver.tol=0.1"]))


def test_adams_epsilon_comes_from_the_config():
    from imaml_cli.config import validate
    from imaml_cli.engine import components
    from imaml_cli.errors import UserError

    config = validate(compose(QUICK + ["outer_optimizer.eps=0.001"]))
    optimizer = components.build_optimizer(config, [torch.zeros(2, requires_grad=True)])
    assert optimizer.param_groups[0]["eps"] == 0.001
    with pytest.raises(UserError, match="outer_optimizer.eps=0 is invalid"):
        validate(compose(QUICK + ["outer_optimizer.eps=0"]))


# What the solvers report per task: step-size halvings (backtracking GD) and the share of the Newton
# step taken (HF).

def test_backtracking_reports_the_halvings_that_make_its_step_stable():
    """G's Hessian is c·I, so a step of lr undoes itself exactly where lr·c > 2: from lr 0.75,
    c = 1 keeps it, c = 4 halves it once (to lr·c = 1.5) and c = 16 three times."""
    lam, c = 1.0, torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    a = (c - lam)[:, None, None] * torch.eye(6, dtype=torch.float64)
    b = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theta = {"w": torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))}
    _, _, (per_task, batched) = solve_both_ways(GradientDescent(12, 0.75, backtrack=True), a, b, theta, lam)
    assert per_task["inner_halvings"].tolist() == [0.0, 1.0, 3.0]
    assert batched["inner_halvings"].tolist() == [0.0, 1.0, 3.0]


def test_newton_on_a_quadratic_reports_whole_steps():
    """On a quadratic with CG run to exactness, the line search's best step is the whole one (one
    iteration: after it the minimum is reached and every step ties to rounding)."""
    lam = 2.0
    a, b, theta, _ = quadratic_batch(torch.Generator().manual_seed(6), lam)
    _, _, (per_task, batched) = solve_both_ways(NewtonCG(1, 6), a, b, theta, lam)
    torch.testing.assert_close(per_task["inner_step"], torch.ones(len(a), dtype=torch.float64))
    torch.testing.assert_close(batched["inner_step"], torch.ones(len(a), dtype=torch.float64))


def test_newton_reports_the_line_search_step_it_took():
    """L(w) = −Σ cos(w − t): where the curvature falls along the Newton direction the whole step
    overshoots. The step is the first of the line search's sizes with the lowest G (brute force)."""
    from torch.func import vmap

    from imaml_cli.meta.inner import LINE_SEARCH_STEPS

    lam = 0.1
    offsets = torch.empty(5, 6, dtype=torch.float64).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(2))
    theta = {"w": torch.zeros(6, dtype=torch.float64)}
    targets = theta["w"] - offsets

    def objective(w, t):
        return -torch.cos(w - t).sum(-1) + lam / 2 * (w - theta["w"]).square().sum(-1)

    x = theta["w"] - targets
    direction = -torch.sin(x) / (torch.cos(x) + lam)  # the exact Newton step: the Hessian is diagonal
    sizes = torch.tensor(LINE_SEARCH_STEPS, dtype=torch.float64)
    values = torch.stack([objective(theta["w"] + s * direction, targets) for s in sizes])
    expected = sizes[values.argmin(0)]
    assert (expected < 1).any() and (expected > 0).all()

    solver = NewtonCG(1, 6)

    def one(t):
        report = {}
        solver(lambda p: -torch.cos(p["w"] - t).sum(), theta, lam, report=report)
        return report["inner_step"]

    batched = {}
    solver.batched(lambda p: ({"w": torch.sin(p["w"] - targets)}, -torch.cos(p["w"] - targets).sum(-1),
                              lambda v: {"w": torch.cos(p["w"] - targets) * v["w"]}),
                   lambda p: -torch.cos(p["w"] - targets).sum(-1), theta, lam, len(targets), report=batched)
    torch.testing.assert_close(vmap(one)(targets), expected)
    torch.testing.assert_close(batched["inner_step"], expected)
