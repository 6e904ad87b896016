"""model=custom: a network from outside the package, built by Hydra, run through vmap; networks
whose state the functional calls cannot thread are refused in one line before training."""

import json
import sys
import textwrap

import pytest
import torch

from conftest import QUICK, compose, run_cli
from imaml_cli.config import validate
from imaml_cli.engine import components
from imaml_cli.engine.evaluation_run import evaluate_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError

NETS = '''
import torch
from torch import nn


class SineNet(nn.Module):
    """The built-in sinusoid MLP rebuilt outside the package: 1-hidden-hidden-outputs, ReLU."""

    def __init__(self, num_outputs, hidden=40):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_outputs)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def with_norm(num_outputs, track_running_stats=False):
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=track_running_stats), nn.ReLU(),
                         nn.Linear(8, num_outputs))


class Counter(nn.Module):
    def __init__(self, num_outputs):
        super().__init__()
        self.head = nn.Linear(1, num_outputs)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        return self.head(x)


def not_a_module(num_outputs):
    return "a string"
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A module outside the package, importable in this process and in subprocesses."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "user_nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "user_nets", raising=False)
    return folder


def custom(target, *extra):
    return QUICK + ["model=custom", f"model._target_=user_nets.{target}", *extra]


def test_a_custom_network_trains_exactly_as_the_same_built_in_one(tmp_path, nets):
    """SineNet is the built-in MLP's architecture with the same initialisation order, so from the
    same seed the whole run, through Hydra's instantiate and vmap, must give the same numbers."""
    built_in = train(compose(QUICK + ["algorithm.lam=0.5"]), tmp_path / "built_in")
    from_outside = train(compose(custom("SineNet", "algorithm.lam=0.5")), tmp_path / "custom")
    assert from_outside == built_in
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("built_in", "custom"))
    assert a["test"]["per_episode"] == b["test"]["per_episode"]


def test_further_keys_are_the_constructors_keyword_arguments(tmp_path, nets):
    config = validate(compose(custom("SineNet", "+model.hidden=7")))
    network = components.build_network(config, torch.device("cpu"))
    assert network.layers[0].out_features == 7 and network.layers[-1].out_features == 1
    classification = validate(compose(["dataset.root=x", "model=custom", "model._target_=user_nets.SineNet",
                                       "dataset.ways=4"]))
    assert components.build_network(classification, torch.device("cpu")).layers[-1].out_features == 4


def test_a_custom_network_takes_the_vmap_path_even_if_it_is_a_built_in_class(nets):
    # A subclass could change forward(); only the built-in model names get the hand-written passes.
    config = validate(compose(["model=custom", "model._target_=imaml_cli.models.omniglot_convnet",
                               "dataset.root=x", "perf.hvp=forward_over_reverse"]))
    network = components.build_network(config, torch.device("cpu"))
    assert components.build_learner(config, network, torch.device("cpu"))._fused_model() is None
    built_in = validate(compose(["dataset.root=x"]))
    assert components.build_learner(built_in, network, torch.device("cpu"))._fused_model() is not None


@pytest.mark.parametrize("overrides, message", [
    (custom("with_norm", "+model.track_running_stats=true"),
     r"^model._target_=user_nets.with_norm: 1 \(BatchNorm1d\) keeps running statistics, .*; build it with "
     r"track_running_stats=False \(batch statistics\) or use GroupNorm or LayerNorm$"),
    (custom("Counter"), r"^model._target_=user_nets.Counter has the buffer calls, .*register_buffer\(\.\.\., "
                        r"persistent=False\)$"),
    (custom("with_norm"), r"^model._target_=user_nets.with_norm: 1 \(BatchNorm1d\) cannot take the reverse-over-"
                          r"reverse Hessian-vector products .*; set perf.hvp=forward_over_reverse"),
    (custom("NoSuchNet"), r"^model._target_=user_nets.NoSuchNet could not be built \(.*\); it must be importable"),
    (custom("not_a_module"), r"^model._target_=user_nets.not_a_module returned a str, not a torch.nn.Module$"),
    (QUICK + ["model=custom"], r"^config key 'model._target_' is missing; set model._target_=\.\.\."),
    (QUICK + ["+model._target_=user_nets.SineNet"], r"^unknown config key 'model._target_'"),
])
def test_networks_that_cannot_run_are_refused_before_training(tmp_path, nets, overrides, message):
    with pytest.raises(UserError, match=message):
        train(compose(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_norm_with_batch_statistics_runs_with_forward_over_reverse_products(tmp_path, nets):
    """Under vmap each task's batch norm normalises by that task's own statistics, as the loop over
    tasks does: the two runs agree (λ = 0.5, where λ and 1/λ differ). SGD, not Adam: the first
    layer's bias, right before batch norm, has a gradient of pure rounding noise that Adam would
    scale up to full steps, differently in each run."""
    settings = ("perf.hvp=forward_over_reverse", "algorithm.lam=0.5", "outer_optimizer=sgd")
    score = train(compose(custom("with_norm", *settings)), tmp_path / "vmap")
    looped = train(compose(custom("with_norm", *settings, "perf.vectorize=false")), tmp_path / "loop")
    # Float32 sums in another order move the parameters by about 1e-7 and the MSEs by about 5e-6
    # relative; a statistic taken over the whole meta-batch would move them by far more.
    assert score == pytest.approx(looped, rel=1e-4)
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("vmap", "loop"))
    assert a["test"]["per_episode"] == pytest.approx(b["test"]["per_episode"], rel=1e-4)
    first, second = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["params"]
                     for run in ("vmap", "loop"))
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6)


def test_train_command_and_evaluation_with_a_network_on_pythonpath(tmp_path, nets):
    env = {"PYTHONPATH": str(nets), "OMP_NUM_THREADS": "1"}
    trained = run_cli("imaml-train", *custom("SineNet", "+model.hidden=16"), f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "test mse" in trained.stdout.lower()
    # imaml-eval's work, in this process: the stored config rebuilds the network from its _target_.
    overrides = [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "eval.episodes=4"]
    evaluate_checkpoint(compose(overrides, config_name="eval"), overrides, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["episodes"] == 4
