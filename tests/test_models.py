import pytest
import torch
from torch.func import functional_call, vmap

from imaml_cli.models import build_model


@pytest.mark.parametrize("name, outputs, expected", [
    # 3 conv kernels 64x64x3x3 + one 1x64x3x3, 4 BN (scale, shift), head 256 -> 5.
    ("omniglot_conv", 5, 3 * 64 * 64 * 9 + 64 * 9 + 4 * 128 + 256 * 5 + 5),
    ("omniglot_conv", 20, 3 * 64 * 64 * 9 + 64 * 9 + 4 * 128 + 256 * 20 + 20),
    # 3 conv kernels 32x32x3x3 + one 3x32x3x3, 4 BN, head 32*5*5 -> 5.
    ("miniimagenet_conv", 5, 3 * 32 * 32 * 9 + 3 * 32 * 9 + 4 * 64 + 800 * 5 + 5),
    ("sinusoid_mlp", 1, 40 + 40 + 40 * 40 + 40 + 40 + 1),
])
def test_parameter_counts(name, outputs, expected):
    assert sum(p.numel() for p in build_model(name, outputs).parameters()) == expected


@pytest.mark.parametrize("name, shape, outputs", [
    ("omniglot_conv", (1, 28, 28), 5), ("miniimagenet_conv", (3, 84, 84), 5), ("sinusoid_mlp", (1,), 1)])
def test_output_shapes_and_no_buffers(name, shape, outputs):
    torch.manual_seed(0)
    net = build_model(name, outputs)
    assert net(torch.randn(4, *shape)).shape == (4, outputs)
    # Batch statistics only: nothing a functional call would have to thread through.
    assert list(net.buffers()) == []


def test_convolutions_have_no_bias_before_batch_norm():
    net = build_model("omniglot_conv", 5)
    conv_biases = [n for n, _ in net.named_parameters() if ".conv." in n and n.endswith("bias")]
    assert conv_biases == []


def test_batch_norm_uses_per_task_statistics_under_vmap():
    torch.manual_seed(0)
    net = build_model("omniglot_conv", 5).double()
    params = dict(net.named_parameters())
    x = torch.randn(3, 5, 1, 28, 28, dtype=torch.float64)
    x[1] *= 10.0  # a task with another scale must not change the others' outputs
    batched = vmap(lambda xi: functional_call(net, params, (xi,)))(x)
    for t in range(3):
        # float64 and rounding-level: statistics shared across tasks would be off at order 1.
        torch.testing.assert_close(batched[t], net(x[t]), rtol=1e-9, atol=1e-12)
