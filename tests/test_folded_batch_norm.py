"""The first layer's batch norm folded into the patch product, against the plain computation.

In every real network the first layer's patches (9 or 27 values) are narrower than its channels,
so ``ConvBlock._folded_batch_norm`` computes that layer's batch norm from the patches' mean and
covariance; MAML, iMAML-HF and ``perf.fused=false`` differentiate through it twice. The reference
is the native network (``F.conv2d`` then ``F.batch_norm``): the same function by an independent
route, with torch's own derivatives of batch norm. In float64 the two agree to rounding: 1e-9
relative leaves three orders of magnitude above float64's accumulated rounding here and is far
below the error of a wrong or detached term (order 1e-2 or more).
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from imaml_cli.data import TaskBatch
from imaml_cli.meta import tree
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.hvp import hessian_operator
from imaml_cli.meta.inner import GradientDescent, NewtonCG
from imaml_cli.meta.task import TaskModel
from imaml_cli.models import ConvNet, build_model
from imaml_cli.models.conv4 import ConvBlock

TIGHT = dict(rtol=1e-9, atol=1e-12)


def relative_error(a, b):
    return (tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)).item()


def twins(factory):
    """The same network (same parameters) with the folding im2col path and the native one."""
    torch.manual_seed(0)
    native = factory("native").double()
    folded = factory("im2col").double()
    folded.load_state_dict(native.state_dict())
    return folded, native


def first_layer_folds(network):
    conv = network.features[0].conv
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= conv.out_channels


def spy_on_folding():
    return mock.patch.object(ConvBlock, "_folded_batch_norm", autospec=True, side_effect=ConvBlock._folded_batch_norm)


def per_task(params, tasks, scale, generator):
    """Parameters per task, moved off the initialisation so that batch norm's scale and shift are
    not 1 and 0 (their derivatives would hide some terms there)."""
    return {k: v.detach() + scale * torch.randn(tasks, *v.shape, generator=generator, dtype=v.dtype)
            for k, v in params.items()}


@pytest.mark.parametrize("name, shape", [("omniglot_conv", (1, 28, 28)), ("miniimagenet_conv", (3, 84, 84))])
def test_built_in_networks_fold_and_their_gradients_and_hvps_equal_the_native_network(name, shape):
    folded, native = twins(lambda impl: build_model(name, 5, conv_impl=impl))
    assert first_layer_folds(folded)
    g = torch.Generator().manual_seed(0)
    tasks, images = 2, 3
    params = per_task(dict(native.named_parameters()), tasks, 0.1, g)
    vector = per_task({k: torch.zeros_like(v) for k, v in native.named_parameters()}, tasks, 1.0, g)
    x = torch.randn(tasks, images, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(images).repeat(tasks, 1)

    def loss(net):
        return lambda p, x, y: F.cross_entropy(functional_call(net, p, (x,)), y)

    def outputs(net):
        return vmap(lambda p, x: functional_call(net, p, (x,)))(params, x)

    def gradients(net):
        return vmap(grad(loss(net)))(params, x, y)

    def forward_over_reverse(net):
        return vmap(lambda p, v, x, y: jvp(lambda q: grad(loss(net))(q, x, y), (p,), (v,))[1])(params, vector, x, y)

    def reverse_over_reverse(net):  # the cached products of iMAML's CG (meta/hvp.py)
        return vmap(lambda p, v, x, y: hessian_operator(lambda q: loss(net)(q, x, y), p, "reverse_over_reverse")(v))(
            params, vector, x, y)

    reference = {"outputs": outputs(native), "gradient": gradients(native), "hvp": forward_over_reverse(native)}
    with spy_on_folding() as folding:
        torch.testing.assert_close(outputs(folded), reference["outputs"], **TIGHT)
        assert relative_error(gradients(folded), reference["gradient"]) < 1e-9
        assert relative_error(forward_over_reverse(folded), reference["hvp"]) < 1e-9
        assert relative_error(reverse_over_reverse(folded), reference["hvp"]) < 1e-9
    # Only the first layer folds, and it did in every call above.
    assert folding.call_count >= 4
    assert all(call.args[0] is folded.features[0] for call in folding.call_args_list)


# Small networks whose first layer folds as the real ones' does (patch width 9 below 12 channels,
# 27 below 28), with the stride (Omniglot) and max-pool (Mini-ImageNet) downsampling.
SMALL = {
    "stride": (lambda impl: ConvNet(1, 9, 12, 3, blocks=2, stride=2, conv_impl=impl), (1, 9, 9)),
    "pool": (lambda impl: ConvNet(3, 8, 28, 3, blocks=2, pool=True, conv_impl=impl), (3, 8, 8)),
}


@pytest.mark.parametrize("algorithm, inner, options", [
    ("maml", GradientDescent(3, 0.3), {}),
    ("imaml", NewtonCG(2, 3), {"fused": False}),
    ("imaml", NewtonCG(2, 3), {"fused": True}),
    ("imaml", GradientDescent(3, 0.3), {"fused": False}),
    ("imaml", GradientDescent(3, 0.3), {"fused": True}),  # the fused passes fold the same way
], ids=["maml", "imaml-hf-autograd", "imaml-hf-fused", "imaml-gd-autograd", "imaml-gd-fused"])
@pytest.mark.parametrize("name", SMALL)
def test_meta_gradients_through_the_folded_layer_equal_the_native_network(name, algorithm, inner, options):
    folded, native = twins(SMALL[name][0])
    assert first_layer_folds(folded)
    g = torch.Generator().manual_seed(1)
    theta = {k: v[0] for k, v in per_task(dict(native.named_parameters()), 1, 0.1, g).items()}

    def draw():
        return torch.randn(3, 6, *SMALL[name][1], generator=g, dtype=torch.float64), torch.arange(3).repeat(3, 2)
    tasks = TaskBatch(*draw(), *draw())
    kwargs = dict(algorithm=algorithm, inner=inner, lam=2.0, cg_steps=3)
    # The native reference runs task by task: F.batch_norm's double backward does not run under vmap.
    reference, reference_metrics = MetaLearner(TaskModel(native, "classification"), vectorize=False,
                                               hvp_mode="forward_over_reverse", **kwargs).meta_gradient(theta, tasks)
    learner = MetaLearner(TaskModel(folded, "classification"), **options, **kwargs)
    with spy_on_folding() as folding:
        grads, metrics = learner.meta_gradient(theta, tasks)
    assert relative_error(grads, reference) < 1e-9
    for k in reference_metrics:
        torch.testing.assert_close(metrics[k], reference_metrics[k], **TIGHT)
    if options.get("fused"):
        assert folding.call_count == 0  # all of it in the hand-written passes
    else:
        assert folding.call_count > 0  # autograd went through the folded layer
