"""iMAML-HF with Gauss-Newton curvature: the fused product Jᵀ∇²ℓJ v against autograd, and Newton-CG
on it against the same iterations written out with a dense matrix."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from imaml_cli.meta import tree
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import LINE_SEARCH_STEPS, GradientDescent, NewtonCG
from imaml_cli.meta.task import TaskModel
from test_meta_gradient import image_tasks, small_convnet

LAM = 0.5


def autograd_gauss_newton(net, params, x, y, v):
    """J v by forward mode, ∇²ℓ by autograd on the cross-entropy of the outputs, Jᵀ by reverse mode."""
    def outputs(p):
        return functional_call(net, p, (x,))

    out, jv = jvp(outputs, (params,), (v,))
    _, pullback = vjp(outputs, params)
    loss_hessian_jv = torch.autograd.functional.hvp(lambda o: nn.functional.cross_entropy(o, y), out, jv)[1]
    return pullback(loss_hessian_jv)[0]


def flattening(theta):
    """θ as one vector, and the map from such a vector back to θ's dict of tensors."""
    names = list(theta)

    def unflat(vector):
        out, start = {}, 0
        for k in names:
            out[k] = vector[start:start + theta[k].numel()].view(theta[k].shape)
            start += theta[k].numel()
        return out

    return torch.cat([theta[k].flatten() for k in names]), unflat


def dense_gauss_newton(net, w, x, y, unflat):
    """The Gauss-Newton matrix at the flat parameters ``w``, column by column."""
    return torch.stack([torch.cat([c.flatten() for c in autograd_gauss_newton(net, unflat(w), x, y, unflat(e)).values()])
                        for e in torch.eye(len(w), dtype=w.dtype)])


def test_the_fused_gauss_newton_product_is_jt_h_j():
    net = small_convnet()
    tasks = image_tasks(2, torch.Generator().manual_seed(11))
    fused = TaskModel(net, "classification").fused
    g = torch.Generator().manual_seed(12)
    params = {k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in net.named_parameters()}
    batched = {k: v.expand(2, *v.shape).clone() for k, v in params.items()}
    v = {k: torch.randn(2, *p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    support = fused.prepare(tasks.support_x, tasks.support_y, reuse=True)
    _, _, product = fused.outputs_gradient_and_hessian(fused.to_internal(batched), support, "gauss_newton")
    got = fused.from_internal(product(fused.to_internal(v)))
    _, _, hessian = fused.outputs_gradient_and_hessian(fused.to_internal(batched), support)
    exact = fused.from_internal(hessian(fused.to_internal(v)))
    for t in range(2):
        expected = autograd_gauss_newton(net, params, tasks.support_x[t], tasks.support_y[t],
                                         {k: x[t] for k, x in v.items()})
        for k in params:
            torch.testing.assert_close(got[k][t], expected[k], rtol=1e-9, atol=1e-11)
        # Not the Hessian: the network's second-order terms are what it leaves out.
        assert tree.norm(tree.add({k: x[t] for k, x in got.items()}, {k: x[t] for k, x in exact.items()}, -1.0)) > 1e-3


def test_newton_cg_on_gauss_newton_takes_the_steps_written_out_densely():
    """Each iteration: d solves (G + λI) d = −∇G(φ) (CG with as many steps as parameters: exact),
    then the first of the line-search steps with the lowest proximal objective."""
    net = small_convnet()
    tasks = image_tasks(2, torch.Generator().manual_seed(13))
    model = TaskModel(net, "classification")
    theta = {k: v.detach() for k, v in net.named_parameters()}
    size = sum(v.numel() for v in theta.values())
    inner = NewtonCG(steps=2, cg_steps=size + 5, curvature="gauss_newton")
    phi, _ = MetaLearner(model, "imaml", inner, lam=LAM).adapt(theta, tasks)

    flat_theta, unflat = flattening(theta)

    for t in range(2):
        x, y = tasks.support_x[t], tasks.support_y[t]

        def objective(vector):
            return (nn.functional.cross_entropy(functional_call(net, unflat(vector), (x,)), y)
                    + LAM / 2 * (vector - flat_theta).square().sum())

        w = flat_theta.clone()
        for _ in range(inner.steps):
            gauss_newton = dense_gauss_newton(net, w, x, y, unflat)
            gradient = torch.autograd.functional.jacobian(objective, w)
            d = torch.linalg.solve(gauss_newton + LAM * torch.eye(size, dtype=w.dtype), -gradient)
            values = torch.stack([objective(w + s * d) for s in LINE_SEARCH_STEPS])
            w = w + LINE_SEARCH_STEPS[int(values.argmin())] * d
        torch.testing.assert_close(flattening({k: v[t] for k, v in phi.items()})[0], w, rtol=1e-6, atol=1e-8)
        assert (w - flat_theta).norm() > 1e-2  # the iterations moved


def test_levenberg_marquardt_takes_the_steps_written_out_densely():
    """Each iteration: d solves (C + (λ + μ)I) d = −∇G(φ) exactly; φ + αd is taken where it lowers
    G, α in [0, 1] the minimiser of the parabola through G along d at 0 (value, slope) and 1;
    μ grows by 3/2 below a reduction ratio of 1/4 and shrinks by 2/3 above 3/4. On Gauss-Newton
    curvature, where that matrix is positive definite and CG (as many steps as parameters) is an
    exact solve; on the exact Hessian CG stops at negative curvature, which a dense solve does not."""
    net = small_convnet()
    tasks = image_tasks(2, torch.Generator().manual_seed(14))
    model = TaskModel(net, "classification")
    theta = {k: v.detach() for k, v in net.named_parameters()}
    size = sum(v.numel() for v in theta.values())
    inner = NewtonCG(steps=4, cg_steps=size + 5, curvature="gauss_newton", lm_damping=0.3)
    phi, metrics = MetaLearner(model, "imaml", inner, lam=LAM).adapt(theta, tasks)

    flat_theta, unflat = flattening(theta)

    for t in range(2):
        x, y = tasks.support_x[t], tasks.support_y[t]

        def loss(vector):
            return nn.functional.cross_entropy(functional_call(net, unflat(vector), (x,)), y)

        def objective(vector):
            return loss(vector) + LAM / 2 * (vector - flat_theta).square().sum()

        w, mu, taken, step_sum = flat_theta.clone(), 0.3, 0, 0.0
        for _ in range(inner.steps):
            matrix = dense_gauss_newton(net, w, x, y, unflat)
            eye = torch.eye(size, dtype=w.dtype)
            gradient = torch.autograd.functional.jacobian(objective, w)
            d = torch.linalg.solve(matrix + (LAM + mu) * eye, -gradient)
            predicted = gradient @ d + 0.5 * d @ (matrix + LAM * eye) @ d
            actual = objective(w + d) - objective(w)
            # The step to the minimum of the parabola through G(w), G'(w; d) and G(w + d), at most 1.
            a, b, c = torch.linalg.solve(torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=w.dtype),
                                         torch.stack([objective(w), gradient @ d, objective(w + d)]))
            candidates = [torch.zeros_like(a), torch.ones_like(a)] + ([-b / (2 * c)] if 0 < -b / (2 * c) < 1 else [])
            step = min(candidates, key=lambda s: (a + b * s + c * s * s).item())
            if objective(w + step * d) < objective(w):
                w, taken, step_sum = w + step * d, taken + 1, step_sum + step
            ratio = (actual / predicted).item()
            mu = mu * 1.5 if ratio < 0.25 else mu * 2 / 3 if ratio > 0.75 else mu
        torch.testing.assert_close(flattening({k: v[t] for k, v in phi.items()})[0], w, rtol=1e-6, atol=1e-8)
        assert taken >= 2  # the comparison is of iterations that moved
        assert metrics["inner_step"][t].item() == pytest.approx(float(step_sum) / inner.steps, rel=1e-6)


def test_gauss_newton_needs_the_fused_passes():
    for inner in (NewtonCG(2, 3, curvature="gauss_newton"), NewtonCG(2, 3, lm_damping=1.0)):
        with pytest.raises(ValueError, match="fused passes only"):
            MetaLearner(TaskModel(small_convnet(), "classification"), "imaml", inner, lam=LAM, fused=False)
    with pytest.raises(ValueError, match="unknown curvature"):
        NewtonCG(2, 3, curvature="fisher")
    assert GradientDescent(2, 0.1)  # the GD solver has no curvature to choose


def test_the_config_offers_gauss_newton_where_it_runs():
    from conftest import QUICK, compose
    from imaml_cli.config import validate
    from imaml_cli.engine import components
    from imaml_cli.errors import UserError

    config = validate(compose(["experiment=omniglot_5w1s", "inner_solver=hf", "inner_solver.curvature=gauss_newton"]))
    network = components.build_network(config, torch.device("cpu"))
    assert components.build_learner(config, network, torch.device("cpu")).inner.curvature == "gauss_newton"
    with pytest.raises(UserError, match="curvature=gauss_newton and inner_solver.lm_damping run on the fused passes"):
        validate(compose(["experiment=omniglot_5w1s", "inner_solver=hf", "inner_solver.curvature=gauss_newton",
                          "perf.fused=false"]))
    with pytest.raises(UserError, match="run on the fused passes only"):
        validate(compose(["experiment=omniglot_5w1s", "inner_solver=hf", "inner_solver.lm_damping=1", "perf.fused=false"]))
    config = validate(compose(["experiment=omniglot_5w1s", "inner_solver=hf", "inner_solver.lm_damping=0.5"]))
    assert components.build_learner(config, network, torch.device("cpu")).inner.lm_damping == 0.5
    with pytest.raises(UserError, match="run on the fused passes only"):
        validate(compose(QUICK + ["inner_solver=hf", "inner_solver.curvature=gauss_newton",
                                  "model=custom", "model._target_=torch.nn.Linear"]))
    config = validate(compose(["experiment=omniglot_5w5s", "cg.curvature=gauss_newton"]))
    assert components.build_learner(config, network, torch.device("cpu")).cg_curvature == "gauss_newton"
    for other in (["perf.fused=false"], ["model.activation=softplus"]):
        with pytest.raises(UserError, match="cg.curvature=gauss_newton runs on the fused passes only"):
            validate(compose(["experiment=omniglot_5w5s", "cg.curvature=gauss_newton", *other]))
    with pytest.raises(UserError, match="inner_solver.curvature=gauss_newton and inner_solver.lm_damping run on"):
        validate(compose(["experiment=omniglot_5w1s", "inner_solver=hf", "model.activation=softplus"]))


def test_the_outer_solve_on_gauss_newton_curvature_solves_the_gauss_newton_system():
    """cg_curvature="gauss_newton": the meta-gradient is (I + G/λ)⁻¹∇L_test(φ) with G = Jᵀ∇²ℓJ of the
    support loss at φ, checked against a dense solve (CG with as many steps as parameters: exact on
    this positive definite system), and not the Hessian's solve."""
    net = small_convnet()
    tasks = image_tasks(2, torch.Generator().manual_seed(14))
    model = TaskModel(net, "classification")
    theta = {k: v.detach() for k, v in net.named_parameters()}
    size = sum(v.numel() for v in theta.values())
    learner = MetaLearner(model, "imaml", GradientDescent(3, 0.3), lam=LAM, cg_steps=size + 5,
                          cg_curvature="gauss_newton")
    meta_grad, _ = learner.meta_gradient(theta, tasks)
    phi, _ = learner.adapt(theta, tasks)
    _, unflat = flattening(theta)
    gauss_newton, hessian = 0.0, 0.0
    for t in range(2):
        x, y, xq, yq = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        flat_phi, _ = flattening({k: v[t] for k, v in phi.items()})
        b = torch.cat([g.flatten() for g in torch.func.grad(
            lambda p: nn.functional.cross_entropy(functional_call(net, p, (xq,)), yq))(unflat(flat_phi)).values()])
        eye = torch.eye(size, dtype=b.dtype)
        dense = dense_gauss_newton(net, flat_phi, x, y, unflat)
        full = torch.func.hessian(lambda w: nn.functional.cross_entropy(functional_call(net, unflat(w), (x,)), y))(flat_phi)
        gauss_newton = gauss_newton + torch.linalg.solve(eye + dense / LAM, b) / 2
        hessian = hessian + torch.linalg.solve(eye + full / LAM, b) / 2
    got = torch.cat([meta_grad[k].flatten() for k in theta])
    torch.testing.assert_close(got, gauss_newton, rtol=1e-6, atol=1e-9)
    assert (got - hessian).norm() > 1e-3 * got.norm()
    with pytest.raises(ValueError, match=r"Gauss-Newton curvature \(inner solver or CG\) .* run on the fused passes only"):
        MetaLearner(model, "imaml", GradientDescent(3, 0.3), lam=LAM, cg_curvature="gauss_newton", fused=False)
