"""Every fast path against the plain one it replaces, on tiny shapes.

The fast paths compute the same functions by other routes (channels-last patch products, a
hand-written backward pass, hand-written Hessian-vector products, a reused linearisation), so in
float64 they must agree with the plain paths to rounding: 1e-9 relative leaves three orders of
magnitude above float64's accumulated rounding here and is far below any real discrepancy (a wrong
term changes the result at order 1e-2 or more). The bfloat16 products are checked against a
bound derived from bfloat16's precision instead.
"""

import threading
from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp, vmap

from imaml_cli.data import TaskBatch
from imaml_cli.meta import tree
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.cg import conjugate_gradient
from imaml_cli.meta.hvp import hessian_operator
from imaml_cli.meta.inner import LINE_SEARCH_STEPS, GradientDescent, NewtonCG
from imaml_cli.meta.precision import matmul_precision
from imaml_cli.meta.task_groups import group_count, run_groups
from imaml_cli.meta.task import TaskModel
from imaml_cli.models import ConvNet, build_model
from imaml_cli.models.fused import FusedConvNet
from imaml_cli.models.im2col import im2col

TIGHT = dict(rtol=1e-9, atol=1e-12)

# name -> (network factory, input shape): the stride (Omniglot) and max-pool (Mini-ImageNet)
# variants, small.
NETS = {
    "stride": (lambda conv_impl="im2col": ConvNet(1, 9, 4, 3, blocks=3, stride=2, conv_impl=conv_impl), (1, 9, 9)),
    "pool": (lambda conv_impl="im2col": ConvNet(3, 10, 3, 3, blocks=2, pool=True, conv_impl=conv_impl), (3, 10, 10)),
}


def relative_error(a, b):
    return (tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)).item()


def make_net(name, conv_impl="im2col"):
    torch.manual_seed(0)
    return NETS[name][0](conv_impl).double()


def tasks_for(name, kind="classification", tasks=3, images=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = NETS[name][1]

    def draw():
        x = torch.randn(tasks, images, *shape, generator=g, dtype=torch.float64)
        if kind == "classification":
            return x, torch.randint(3, (tasks, images), generator=g)
        return x, torch.randn(tasks, images, 3, generator=g, dtype=torch.float64)
    return TaskBatch(*draw(), *draw())


def perturbed(params, tasks, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(tasks, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("geometry", [(9, 9, 3, 2, 1), (4, 4, 3, 2, 1), (6, 5, 3, 1, 1), (5, 5, 2, 2, 0), (8, 7, 2, 3, 0)])
def test_im2col_is_unfold_and_its_derivatives_are_exact(geometry):
    h, w, k, s, p = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, h, w, 4, generator=g, dtype=torch.float64)
    cols = im2col(x, k, s, p)
    ho, wo = cols.shape[2:4]
    ref = F.unfold(x.reshape(6, h, w, 4).permute(0, 3, 1, 2), k, padding=p, stride=s)
    ref = ref.view(6, 4, k, k, ho, wo).permute(0, 4, 5, 2, 3, 1).reshape(2, 3, ho, wo, -1)
    assert torch.equal(cols, ref)

    def f(x):
        return (im2col(x, k, s, p) ** 3).sum()
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    reference_grad = torch.autograd.grad(f(x.requires_grad_()), x)[0]
    reference_hvp = torch.autograd.functional.hvp(f, x.detach(), v)[1]
    x = x.detach()
    torch.testing.assert_close(vmap(grad(f))(x), reference_grad, **TIGHT)
    torch.testing.assert_close(vmap(lambda x, v: jvp(grad(f), (x,), (v,))[1])(x, v), reference_hvp, **TIGHT)
    torch.testing.assert_close(vmap(lambda x, v: vjp(grad(f), x)[1](v)[0])(x, v), reference_hvp, **TIGHT)


@pytest.mark.parametrize("name", NETS)
def test_im2col_network_equals_native_with_gradients_and_hvps(name):
    native, fast = make_net(name, "native"), make_net(name, "im2col")
    zeros = {k: torch.zeros_like(v) for k, v in native.named_parameters()}
    params = perturbed(dict(native.named_parameters()), 3, 0.3, 1)
    vector = perturbed(zeros, 3, 1.0, 2)
    x, y = tasks_for(name)[:2]

    def loss(net):
        return lambda p, x, y: F.cross_entropy(functional_call(net, p, (x,)), y)
    for fn in (lambda net: vmap(lambda p, x: functional_call(net, p, (x,)))(params, x),
               lambda net: vmap(grad(loss(net)))(params, x, y),
               lambda net: vmap(lambda p, v, x, y: jvp(lambda q: grad(loss(net))(q, x, y), (p,), (v,))[1])(
                   params, vector, x, y)):
        torch.testing.assert_close(fn(fast), fn(native), **TIGHT)


def test_full_size_models_agree_across_conv_impls():
    for name, shape in (("omniglot_conv", (1, 28, 28)), ("miniimagenet_conv", (3, 84, 84))):
        torch.manual_seed(0)
        native = build_model(name, 5, conv_impl="native").double()
        fast = build_model(name, 5, conv_impl="im2col").double()
        fast.load_state_dict(native.state_dict())
        x = torch.randn(2, *shape, dtype=torch.float64)
        torch.testing.assert_close(fast(x), native(x), **TIGHT)


@pytest.mark.parametrize("name, kind", [("stride", "classification"), ("pool", "classification"),
                                        ("stride", "regression")])
def test_fused_gradient_and_hvp_equal_autograd(name, kind):
    net = make_net(name)
    model = TaskModel(net, kind)
    params = perturbed(model.parameters(), 3, 0.3, 1)
    vector = perturbed({k: torch.zeros_like(v) for k, v in model.parameters().items()}, 3, 1.0, 2)
    x, y = tasks_for(name, kind)[:2]
    fused = FusedConvNet(net, kind)
    batch = fused.prepare(x, y, reuse=True)

    outputs, grads = fused.outputs_and_gradient(fused.to_internal(params), batch)
    torch.testing.assert_close(outputs, vmap(model.outputs)(params, x), **TIGHT)
    assert relative_error(fused.from_internal(grads), vmap(grad(model.loss))(params, x, y)) < 1e-9
    # Scratch memory is reused between calls: another call in between must not leak into results.
    fused.outputs_and_gradient(fused.to_internal(perturbed(model.parameters(), 3, 0.3, 5)), batch)
    again = fused.outputs_and_gradient(fused.to_internal(params), batch)
    torch.testing.assert_close(again[0], outputs, rtol=0, atol=0)
    for k in grads:
        torch.testing.assert_close(again[1][k], grads[k], rtol=0, atol=0)

    outputs, hessian = fused.outputs_and_hessian(fused.to_internal(params), batch)
    torch.testing.assert_close(outputs, vmap(model.outputs)(params, x), **TIGHT)
    expected = vmap(lambda p, v, x, y: jvp(lambda q: grad(model.loss)(q, x, y), (p,), (v,))[1])(params, vector, x, y)
    for _ in range(2):  # the cached linearisation must serve any number of products
        assert relative_error(fused.from_internal(hessian(fused.to_internal(vector))), expected) < 1e-9
        # Newton-CG's line search runs forward passes in the batch's scratch memory between products.
        other = fused.to_internal(perturbed(model.parameters(), 3, 0.3, 6))
        torch.testing.assert_close(fused.outputs(other, batch), fused.outputs(other, fused.prepare(x)),
                                   rtol=0, atol=0)
    torch.testing.assert_close(fused.outputs(fused.to_internal(params), fused.prepare(x)),
                               vmap(model.outputs)(params, x), **TIGHT)


def test_fused_is_only_used_where_it_applies():
    assert FusedConvNet.supports(make_net("stride"), "classification")
    assert not FusedConvNet.supports(ConvNet(1, 8, 4, 3, blocks=2, stride=2, activation="tanh"), "classification")
    assert TaskModel(build_model("sinusoid_mlp", 1), "regression").fused is None


def backtracking_decisions(learner, theta, tasks) -> list[set[bool]]:
    """Per task, whether the per-task backtracking loop kept (True) or undid (False) its steps."""
    with mock.patch.object(tree, "where", wraps=tree.where) as spy:
        learner.adapt(theta, tasks)
    # The per-task loop (vectorize=False) runs the tasks one after another, each with the same
    # number of steps; outside vmap each condition is a plain boolean.
    decisions = [bool(call.args[0]) for call in spy.call_args_list]
    per_task = len(decisions) // len(tasks.support_x)
    assert per_task > 0 and len(decisions) == per_task * len(tasks.support_x)
    return [set(decisions[t * per_task:(t + 1) * per_task]) for t in range(len(tasks.support_x))]


# Backtracking at lr 0.5 on these nets and tasks both keeps and undoes steps in every task (the
# test checks it): the state the default Omniglot training runs in. At lr 3 every step would be
# undone and φ = θ, which says nothing about the kept steps.
@pytest.mark.parametrize("algorithm, inner", [("imaml", GradientDescent(3, 0.2)), ("fomaml", GradientDescent(3, 0.2)),
                                              ("reptile", GradientDescent(3, 0.2)), ("imaml", NewtonCG(2, 3)),
                                              ("imaml", GradientDescent(5, 0.5, backtrack=True))])
@pytest.mark.parametrize("name", NETS)
def test_meta_gradient_fast_paths_equal_the_per_task_loop(algorithm, inner, name):
    model = TaskModel(make_net(name), "classification")
    theta = perturbed(model.parameters(), 1, 0.3, 1)
    theta = {k: v[0] for k, v in theta.items()}
    tasks = tasks_for(name)
    kwargs = dict(algorithm=algorithm, inner=inner, lam=2.0, cg_steps=4)
    if getattr(inner, "backtrack", False):
        decisions = backtracking_decisions(MetaLearner(model, vectorize=False, **kwargs), theta, tasks)
        assert decisions == [{True, False}] * len(tasks.support_x), decisions
    reference, reference_metrics = MetaLearner(model, vectorize=False, hvp_mode="forward_over_reverse",
                                               **kwargs).meta_gradient(theta, tasks)
    for options in (dict(fused=True), dict(fused=False, hvp_mode="reverse_over_reverse"),
                    dict(fused=False, hvp_mode="forward_over_reverse")):
        grads, metrics = MetaLearner(model, **options, **kwargs).meta_gradient(theta, tasks)
        assert relative_error(grads, reference) < 1e-9, options
        assert metrics.keys() == reference_metrics.keys()
        for k in reference_metrics:
            torch.testing.assert_close(metrics[k], reference_metrics[k], **TIGHT)
    phi, _ = MetaLearner(model, fused=True, **kwargs).adapt(theta, tasks)
    reference_phi, _ = MetaLearner(model, vectorize=False, **kwargs).adapt(theta, tasks)
    assert relative_error(phi, reference_phi) < 1e-9
    # φ moved: the comparison above is not between two copies of θ.
    assert relative_error(phi, {k: v.expand_as(phi[k]) for k, v in theta.items()}) > 1e-3


@pytest.mark.parametrize("algorithm, inner", [("imaml", GradientDescent(3, 0.2, backtrack=True)),
                                              ("imaml", NewtonCG(2, 3)), ("fomaml", GradientDescent(2, 0.2))])
def test_task_groups_give_each_task_the_result_of_one_batch(algorithm, inner):
    """17 tasks in 2 groups (9 and 8) on two threads: the same meta-gradient, per-task metrics and
    φ as one batch, in the tasks' order."""
    model = TaskModel(make_net("stride"), "classification")
    theta = {k: v[0] for k, v in perturbed(model.parameters(), 1, 0.3, 1).items()}
    tasks = tasks_for("stride", tasks=17)
    kwargs = dict(algorithm=algorithm, inner=inner, lam=2.0, cg_steps=3)
    reference, reference_metrics = MetaLearner(model, **kwargs).meta_gradient(theta, tasks)
    reference_phi, _ = MetaLearner(model, **kwargs).adapt(theta, tasks)
    grouped = MetaLearner(model, task_groups=2, **kwargs)
    seen = []
    per_group = MetaLearner._per_task_meta_gradients

    def spy(self, theta, group):
        seen.append((threading.current_thread().name, len(group.support_x), torch.get_num_threads()))
        return per_group(self, theta, group)

    threads = torch.get_num_threads()
    with mock.patch.object(MetaLearner, "_per_task_meta_gradients", autospec=True, side_effect=spy):
        grads, metrics = grouped.meta_gradient(theta, tasks)
    assert sorted(size for _, size, _ in seen) == [8, 9] and len({name for name, _, _ in seen}) == 2, seen
    assert all(count == max(1, threads // 2) for _, _, count in seen) and torch.get_num_threads() == threads
    assert relative_error(grads, reference) < 1e-9
    assert metrics.keys() == reference_metrics.keys()
    for k in reference_metrics:
        torch.testing.assert_close(metrics[k], reference_metrics[k], **TIGHT)
    phi, _ = grouped.adapt(theta, tasks)
    assert relative_error(phi, reference_phi) < 1e-9
    # Tasks differ, so a shuffled order would fail the per-task comparisons above.
    assert not torch.allclose(reference_metrics["post_query_loss"][:9], reference_metrics["post_query_loss"][8:])


@pytest.mark.parametrize("algorithm, options", [("maml", {}), ("imaml", dict(fused=False))])
def test_vmap_paths_take_the_tasks_as_one_batch(algorithm, options):
    model = TaskModel(make_net("stride"), "classification")
    learner = MetaLearner(model, algorithm, GradientDescent(2, 0.2), lam=2.0, cg_steps=3, task_groups=2, **options)
    with mock.patch("imaml_cli.meta.algorithms.run_groups", side_effect=lambda fn, tasks, groups: [fn(tasks)]) as run:
        learner.meta_gradient(model.parameters(), tasks_for("stride", tasks=17))
    assert run.call_args.args[2] == 1


def test_a_failing_group_raises_and_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()

    def fail_on_second(group):
        if group.support_x[0, 0, 0, 0, 0] == 8:
            raise RuntimeError("group 2 failed")
        return group

    tasks = TaskBatch(*(torch.arange(16.0).view(16, 1, 1, 1, 1),) * 4)
    with pytest.raises(RuntimeError, match="group 2 failed"):
        run_groups(fail_on_second, tasks, 2)
    assert torch.get_num_threads() == threads


def test_groups_hold_at_least_eight_tasks():
    assert [group_count(tasks, 4) for tasks in (7, 8, 16, 17, 31, 32, 64)] == [1, 1, 2, 2, 3, 4, 4]
    assert group_count(64, 1) == 1


FUSED_PASSES = ("outputs_and_gradient", "outputs_and_hessian", "outputs_gradient_and_hessian", "outputs")


@contextmanager
def hand_written_passes_only():
    """Counts the calls of the fused passes and makes every autograd route of a meta-step raise, so
    that a ``fused=True`` learner that silently fell back to vmap over autograd fails loudly."""
    with ExitStack() as stack:
        spies = {name: stack.enter_context(mock.patch.object(FusedConvNet, name, autospec=True,
                                                             side_effect=getattr(FusedConvNet, name)))
                 for name in FUSED_PASSES}
        for name in ("loss", "outputs", "loss_and_accuracy"):
            stack.enter_context(mock.patch.object(TaskModel, name, side_effect=AssertionError(f"autograd: {name}")))
        stack.enter_context(mock.patch("imaml_cli.meta.algorithms.hessian_operator",
                                       side_effect=AssertionError("autograd: hessian_operator")))
        calls = {}
        yield calls
        calls.update({name: spy.call_count for name, spy in spies.items()})


@pytest.mark.parametrize("algorithm, inner, gradients, hessians", [
    # Backtracking: one gradient per inner step; then the query gradient and one linearisation for CG.
    ("imaml", GradientDescent(4, 0.5, backtrack=True), 4 + 1, 1),
    # Plain GD: one gradient per step and the query gradient; FOMAML needs no Hessian.
    ("imaml", GradientDescent(3, 0.2), 3 + 1, 1), ("fomaml", GradientDescent(3, 0.2), 3 + 1, 0),
    ("reptile", GradientDescent(3, 0.2), 3, 0)])
def test_fused_true_runs_the_hand_written_passes(algorithm, inner, gradients, hessians):
    model = TaskModel(make_net("stride"), "classification")
    learner = MetaLearner(model, algorithm, inner, lam=2.0, cg_steps=3)
    with hand_written_passes_only() as calls:
        learner.meta_gradient(model.parameters(), tasks_for("stride"))
    # iMAML's linearisation for CG also yields the support gradient at φ that inner_grad_norm needs.
    assert (calls["outputs_and_gradient"], calls["outputs_gradient_and_hessian"]) == (gradients, hessians), calls
    with hand_written_passes_only() as calls:
        learner.adapt(model.parameters(), tasks_for("stride"))
    # Adaptation alone (evaluation) takes one more gradient for iMAML, at φ, for inner_grad_norm.
    assert calls["outputs_and_gradient"] == inner.steps + (algorithm == "imaml"), calls


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_newton_direction_leaves_phi_where_it_was(fused):
    """CG overflowing for one task (fused: task 0; per-task under vmap: every task) must not make
    φ NaN: the line search's step 0 keeps φ, and the other tasks adapt as before."""
    import imaml_cli.meta.inner as inner_module

    model = TaskModel(make_net("stride"), "classification")
    theta = {k: v[0] for k, v in perturbed(model.parameters(), 1, 0.3, 1).items()}
    tasks = tasks_for("stride")
    learner = MetaLearner(model, "imaml", NewtonCG(2, 3), lam=2.0, fused=fused)
    reference, _ = learner.adapt(theta, tasks)
    real = inner_module.conjugate_gradient

    def overflowing(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs.get("batch_dims") == 1:
            solution = {k: v.clone().index_fill_(0, torch.tensor([0]), float("nan")) for k, v in result.solution.items()}
        else:
            solution = {k: torch.full_like(v, float("nan")) for k, v in result.solution.items()}
        return result._replace(solution=solution)

    with mock.patch.object(inner_module, "conjugate_gradient", side_effect=overflowing):
        phi, _ = learner.adapt(theta, tasks)
    assert all(torch.isfinite(v).all() for v in phi.values())
    stuck = range(1) if fused else range(len(tasks.support_x))
    for t in stuck:
        assert all(torch.equal(phi[k][t], theta[k]) for k in theta)
    if fused:
        assert relative_error({k: v[1:] for k, v in phi.items()}, {k: v[1:] for k, v in reference.items()}) < 1e-9


def test_fused_newton_cg_linearises_once_per_iteration():
    """Each Newton iteration: one linearisation (its gradient and every CG product), one forward
    pass per nonzero line-search step; then the query gradient and CG's linearisation."""
    model = TaskModel(make_net("stride"), "classification")
    learner = MetaLearner(model, "imaml", NewtonCG(3, 2), lam=2.0, cg_steps=3)
    searched = len([s for s in LINE_SEARCH_STEPS if s]) * 3
    with hand_written_passes_only() as calls:
        learner.meta_gradient(model.parameters(), tasks_for("stride"))
    # The metrics' forward passes: post-adaptation support is the Hessian's; pre-query and post-query
    # come from the query gradient and one extra pass.
    assert (calls["outputs_and_gradient"], calls["outputs_gradient_and_hessian"]) == (1, 3 + 1), calls
    assert calls["outputs"] == searched + 1, calls


@pytest.mark.parametrize("experiment, shape", [("omniglot_5w1s", (1, 28, 28)), ("miniimagenet_5w1s", (3, 84, 84))])
def test_the_built_in_networks_take_the_fused_path_by_default(experiment, shape):
    """The learner the app builds for the real networks, with the default perf settings."""
    from conftest import compose
    from imaml_cli.config import validate
    from imaml_cli.engine import components

    config = validate(compose([f"experiment={experiment}", "inner_solver.steps=2", "cg.steps=2", "device=cpu"]))
    network = components.build_network(config, torch.device("cpu"))
    learner = components.build_learner(config, network, torch.device("cpu"))
    assert config["perf"]["fused"] and learner.fused
    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.rand(2, 5, *shape, generator=g), torch.arange(5).repeat(2, 1),
                      torch.rand(2, 5, *shape, generator=g), torch.arange(5).repeat(2, 1))
    with hand_written_passes_only() as calls:
        grads, _ = learner.meta_gradient(learner.model.parameters(), tasks)
    assert (calls["outputs_and_gradient"], calls["outputs_gradient_and_hessian"]) == (2 + 1, 1), calls
    assert all(torch.isfinite(v).all() for v in grads.values())


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_batched_loss_equals_the_per_task_loss(kind):
    g = torch.Generator().manual_seed(0)
    model = TaskModel(build_model("sinusoid_mlp", 1), kind)
    out = torch.randn(4, 6, 3 if kind == "classification" else 1, generator=g, dtype=torch.float64)
    y = torch.randint(3, (4, 6), generator=g) if kind == "classification" else torch.randn(4, 6, 1, generator=g,
                                                                                            dtype=torch.float64)
    torch.testing.assert_close(model.batched_loss_of_outputs(out, y), vmap(model.loss_of_outputs)(out, y), **TIGHT)


@pytest.mark.parametrize("backtrack", [False, True])
def test_batched_gradient_descent_equals_the_per_task_solver(backtrack):
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 5, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    solver = GradientDescent(4, 0.3, backtrack)
    batched = solver.batched(lambda p: ({"w": 2 * (p["w"] - targets) ** 3}, ((p["w"] - targets) ** 4).sum(-1) / 2),
                             theta, 0.7, 3)
    per_task = vmap(lambda t: solver(lambda p: ((p["w"] - t) ** 4).sum() / 2, theta, 0.7))(targets)
    torch.testing.assert_close(batched["w"], per_task["w"], **TIGHT)


def test_batched_cg_equals_cg_under_vmap():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + torch.eye(8, dtype=torch.float64)
    b = {"x": torch.randn(4, 2, generator=g, dtype=torch.float64),
         "y": torch.randn(4, 2, 3, generator=g, dtype=torch.float64)}

    def matvec(a, v):  # one system, or one per entry of a leading task dimension
        flat = torch.cat([v["x"], v["y"].flatten(-2)], -1)
        out = (a @ flat.unsqueeze(-1)).squeeze(-1)
        return {"x": out[..., :2], "y": out[..., 2:].unflatten(-1, (2, 3))}

    batched, residual, _, _ = conjugate_gradient(lambda v: matvec(a, v), b, 5, batch_dims=1)
    single, single_residual, _, _ = vmap(lambda a, b: conjugate_gradient(lambda v: matvec(a, v), b, 5))(a, b)
    for k in b:
        torch.testing.assert_close(batched[k], single[k], **TIGHT)
    torch.testing.assert_close(residual, single_residual, **TIGHT)


def test_cached_reverse_over_reverse_products_equal_forward_over_reverse():
    net = make_net("stride")
    model = TaskModel(net, "classification")
    params = {k: v[0] for k, v in perturbed(model.parameters(), 1, 0.3, 1).items()}
    x, y = [t[0] for t in tasks_for("stride")[:2]]
    loss = lambda p: model.loss(p, x, y)  # noqa: E731
    cached = hessian_operator(loss, params, "reverse_over_reverse")
    fresh = hessian_operator(loss, params, "forward_over_reverse")
    for seed in range(2):
        v = {k: v[0] for k, v in perturbed({k: torch.zeros_like(v) for k, v in params.items()}, 1, 1.0, seed).items()}
        assert relative_error(cached(v), fresh(v)) < 1e-9


def test_native_convolution_refuses_cached_products_under_vmap():
    model = TaskModel(ConvNet(1, 8, 4, 3, blocks=2, stride=2, conv_impl="native"), "classification")
    with pytest.raises(ValueError, match="forward_over_reverse"):
        MetaLearner(model, "imaml", GradientDescent(1, 0.1), hvp_mode="reverse_over_reverse", fused=False)
    with pytest.raises(ValueError, match="forward_over_reverse"):
        MetaLearner(model, "imaml", NewtonCG(1, 2, "reverse_over_reverse"), fused=False)
    MetaLearner(model, "imaml", NewtonCG(1, 2, "reverse_over_reverse"))  # fused Newton-CG needs no autograd
    MetaLearner(model, "imaml", GradientDescent(1, 0.1), hvp_mode="forward_over_reverse", fused=False)
    MetaLearner(model, "imaml", GradientDescent(1, 0.1))  # the fused products need no autograd


def torch_runs_float32_products_in_bf16() -> bool:
    """Whether torch itself, told directly, rounds a float32 batched product to bfloat16 here.

    oneDNN does so only on CPUs with AMX; elsewhere the setting is accepted and has no effect
    (relative error about 1e-7 instead of 1e-3), and the test below could not tell a working
    ``matmul_precision`` from a broken one.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 64, generator=g), torch.randn(2, 64, 64, generator=g)
    exact = torch.bmm(a.double(), b.double())
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        error = ((torch.bmm(a, b).double() - exact).norm() / exact.norm()).item()
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    return error > 1e-4


@pytest.mark.skipif(not torch_runs_float32_products_in_bf16(),
                    reason="this CPU does not run float32 products in bfloat16 (oneDNN needs AMX)")
def test_bf16_products_stay_within_bfloat16_precision_and_restore_settings():
    # A bf16 product rounds its inputs to 8 significant bits (relative error up to 2^-9 = 2e-3 per
    # entry); a gradient or Hessian-vector product chains a dozen of them, so 3e-2 is a loose
    # bound that a wrong result (order 1) cannot meet. Per operation, because the meta-gradient
    # after many inner steps amplifies any rounding (BENCHMARKS.md measures both on real shapes).
    torch.manual_seed(0)
    net = ConvNet(1, 9, 8, 3, blocks=3, stride=2)
    fused = FusedConvNet(net, "classification")
    params = fused.to_internal(perturbed(TaskModel(net, "classification").parameters(), 3, 0.1, 1))
    vector = fused.to_internal(perturbed({k: torch.zeros_like(v) for k, v in net.state_dict().items()}, 3, 1.0, 2))
    x, y = tasks_for("stride", images=6)[:2]
    batch = fused.prepare(x.float(), y)
    results = {}
    for precision in ("ieee", "bf16"):
        before = torch.backends.mkldnn.matmul.fp32_precision
        with matmul_precision(precision, torch.device("cpu")):
            results[precision] = (fused.outputs_and_gradient(params, batch)[1],
                                  fused.outputs_and_hessian(params, batch)[1](vector))
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    for exact, fast in zip(results["ieee"], results["bf16"]):
        # Above 1e-4, three orders of magnitude over float32's rounding (1e-7 here): bf16 was in
        # effect. A context manager that left the products in float32 gives about 1e-7.
        assert 1e-4 < relative_error(fast, exact) < 3e-2
    with pytest.raises(ValueError, match="precision"):
        MetaLearner(TaskModel(net, "classification"), "imaml", GradientDescent(1, 0.1), precision="fp8")
    with pytest.raises(ValueError, match="not available"):
        with matmul_precision("tf32", torch.device("cpu")):
            pass
