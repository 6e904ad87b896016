"""algorithm.zero_head: θ's output layer held at zero through meta-training, the rest trained, resumes
exact; θ's predictions before adaptation are then those of a zero output (closed forms)."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import QUICK, assert_same_state, compose
from imaml_cli.config import validate
from imaml_cli.data.episodes import TaskBatch
from imaml_cli.engine import components
from imaml_cli.engine.checkpoint import load_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import GradientDescent
from imaml_cli.meta.task import TaskModel

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
    initial = initial_params(overrides)  # zero_head off: the head as drawn
    head = ("layers.2.weight", "layers.2.bias")  # the sinusoid MLP's last linear layer
    for name in head:
        assert torch.count_nonzero(zero[name]) == 0, name
        assert not torch.equal(meta[name], initial[name]), name  # without the setting, the head is meta-learned
    for name in set(initial) - set(head):
        assert not torch.equal(zero[name], initial[name]), name


def test_a_zero_head_run_resumes_exactly(tmp_path):
    train(compose(QUICK + ZERO + ["train.meta_steps=2"]), tmp_path / "chunks")
    train(compose(QUICK + ZERO), tmp_path / "chunks")
    train(compose(QUICK + ZERO), tmp_path / "whole")
    assert_same_state(load_checkpoint(tmp_path / "chunks" / "checkpoints" / "last.pt"),
                      load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt"))


def test_a_branch_with_zero_head_starts_from_a_zero_head_and_counts_its_own_best(tmp_path, caplog):
    """The trunk's best was scored with its meta-learned head: not this run's to keep or test."""
    train(compose(QUICK), tmp_path / "trunk")
    trunk_best = tmp_path / "trunk" / "checkpoints" / "best.pt"
    step = load_checkpoint(trunk_best)["step"]
    branch = tmp_path / "branch"
    train(compose(QUICK + ZERO + ["train.meta_steps=6", f"train.resume={trunk_best}"]), branch)
    for name in ("last.pt", "best.pt"):
        params = load_checkpoint(branch / "checkpoints" / name)["params"]
        assert all(torch.count_nonzero(params[k]) == 0 for k in ("layers.2.weight", "layers.2.bias")), name
    results = json.loads((branch / "results.json").read_text())
    assert results["best_step"] > step
    assert "algorithm.zero_head set the output layer" in caplog.text


def test_the_conv_nets_output_layer_is_its_head():
    config = validate(compose(["experiment=omniglot_5w1s", "dataset.root=x"] + ZERO))
    network = components.build_network(config, torch.device("cpu"))
    assert components.held_at_zero(config, network) == ("head.weight", "head.bias")
    assert torch.count_nonzero(network.head.weight) == 0 and torch.count_nonzero(network.head.bias) == 0
    assert torch.count_nonzero(network.features[0].conv.weight) > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
def test_before_adaptation_a_zero_head_run_predicts_uniformly(fused):
    """The Omniglot net as a zero_head run builds it: cross-entropy ln(ways) at θ on every task."""
    config = validate(compose(["experiment=omniglot_5w1s", "dataset.root=x"] + ZERO))
    network = components.build_network(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    tasks = TaskBatch(torch.randn(3, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(3, 1),
                      torch.randn(3, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(3, 1))
    learner = MetaLearner(TaskModel(network, "classification"), "imaml", GradientDescent(2, 0.1), lam=2.0,
                          fused=fused)
    theta = {k: v.detach() for k, v in network.named_parameters()}
    _, metrics = learner.adapt(theta, tasks)
    torch.testing.assert_close(metrics["pre_support_loss"], torch.full((3,), math.log(5)))
    assert (metrics["post_support_loss"] < math.log(5)).all()


@pytest.mark.parametrize("network", [nn.Sequential(nn.Linear(1, 4)), nn.Sequential(nn.Conv1d(1, 1, 1))],
                         ids=["wrong-size", "no-linear"])
def test_a_network_without_an_output_layer_is_refused_in_one_line(network):
    config = validate(compose(QUICK + ZERO))
    with pytest.raises(UserError, match=r"^algorithm.zero_head=true needs a network whose last nn.Linear is its "
                                        r"output layer \(1 outputs\).*set algorithm.zero_head=false$"):
        components.held_at_zero(config, network)
    assert components.held_at_zero(validate(compose(QUICK)), network) == ()
