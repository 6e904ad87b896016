"""algorithm.zero_head: θ's output layer held at zero through meta-training, the rest trained, resumes
exact; θ's predictions before adaptation are then those of a zero output (closed forms)."""

import math

import pytest
import torch
from torch import nn

from conftest import QUICK, assert_same_state, compose
from imaml_cli.config import validate
from imaml_cli.engine import components
from imaml_cli.engine.checkpoint import load_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import GradientDescent
from imaml_cli.meta.task import TaskModel
from test_meta_gradient import image_tasks, small_convnet

ZERO = ["algorithm.zero_head=true"]


def initial_params(overrides) -> dict:
    network = components.build_network(validate(compose(QUICK + overrides)), torch.device("cpu"))
    return {k: v.detach().clone() for k, v in network.named_parameters()}


@pytest.mark.parametrize("algorithm", ["imaml", "maml", "reptile"])
def test_the_output_layer_stays_zero_and_the_rest_trains(tmp_path, algorithm):
    overrides = [f"algorithm={algorithm}"]
    train(compose(QUICK + overrides + ZERO), tmp_path / "zero")
    train(compose(QUICK + overrides), tmp_path / "meta")
    zero = load_checkpoint(tmp_path / "zero" / "checkpoints" / "last.pt")["params"]
    meta = load_checkpoint(tmp_path / "meta" / "checkpoints" / "last.pt")["params"]
    initial = initial_params(overrides)
    head = ("layers.2.weight", "layers.2.bias")  # the sinusoid MLP's last linear layer
    for name in head:
        assert torch.count_nonzero(zero[name]) == 0, name
        assert torch.count_nonzero(meta[name]) > 0, name  # without the setting, the head is meta-learned
    for name in set(initial) - set(head):
        assert not torch.equal(zero[name], initial[name]), name


def test_a_zero_head_run_resumes_exactly(tmp_path):
    train(compose(QUICK + ZERO + ["train.meta_steps=2"]), tmp_path / "chunks")
    train(compose(QUICK + ZERO), tmp_path / "chunks")
    train(compose(QUICK + ZERO), tmp_path / "whole")
    assert_same_state(load_checkpoint(tmp_path / "chunks" / "checkpoints" / "last.pt"),
                      load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt"))


def test_a_branch_with_zero_head_starts_from_a_zero_head(tmp_path):
    train(compose(QUICK), tmp_path / "trunk")
    trunk = tmp_path / "trunk" / "checkpoints" / "last.pt"
    train(compose(QUICK + ZERO + ["train.meta_steps=6", f"train.resume={trunk}"]), tmp_path / "branch")
    branch = load_checkpoint(tmp_path / "branch" / "checkpoints" / "last.pt")["params"]
    assert torch.count_nonzero(branch["layers.2.weight"]) == 0


def test_the_conv_nets_output_layer_is_its_head():
    config = validate(compose(["experiment=omniglot_5w1s", "dataset.root=x"] + ZERO))
    network = components.build_network(config, torch.device("cpu"))
    assert components.zero_output_layer(config, network) == ("head.weight", "head.bias")
    assert torch.count_nonzero(network.head.weight) == 0 and torch.count_nonzero(network.head.bias) == 0
    assert torch.count_nonzero(network.features[0].conv.weight) > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
def test_before_adaptation_a_zero_head_predicts_uniformly(fused):
    """Zero logits: the cross-entropy at θ is ln(ways) on every task, and adaptation moves the head."""
    net = small_convnet()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    tasks = image_tasks(3, torch.Generator().manual_seed(2))
    ways = int(tasks.support_y.max()) + 1
    learner = MetaLearner(TaskModel(net, "classification"), "imaml", GradientDescent(3, 0.3), lam=2.0, fused=fused)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    phi, metrics = learner.adapt(theta, tasks)
    torch.testing.assert_close(metrics["pre_support_loss"], torch.full((3,), math.log(ways), dtype=torch.float64))
    assert torch.count_nonzero(phi["head.weight"]) > 0


def test_a_network_without_an_output_layer_is_refused_in_one_line():
    config = validate(compose(QUICK + ZERO))
    with pytest.raises(UserError, match=r"^algorithm.zero_head=true needs a network whose last nn.Linear is its "
                                        r"output layer \(1 outputs\).*set algorithm.zero_head=false$"):
        components.zero_output_layer(config, nn.Sequential(nn.Linear(1, 4)))
    assert components.zero_output_layer(validate(compose(QUICK)), nn.Sequential(nn.Linear(1, 4))) == ()
