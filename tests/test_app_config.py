"""Composing and validating configs: presets, algorithms, and every bad value refused in one line."""

import pytest
from omegaconf import OmegaConf

from conftest import compose
from imaml_cli.config import validate
from imaml_cli.errors import UserError

PRESETS = ["omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s", "miniimagenet_5w1s",
           "miniimagenet_5w5s", "sinusoid"]
ALGORITHMS = ["imaml", "maml", "fomaml", "reptile"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_algorithm(preset):
    for algorithm in [None, *ALGORITHMS]:
        overrides = [f"experiment={preset}"] + ([f"algorithm={algorithm}"] if algorithm else [])
        config = validate(compose(overrides))
        assert config["algorithm"]["name"] == (algorithm or "imaml")
    validate(compose([f"experiment={preset}", "inner_solver=hf"]))


def test_default_is_the_papers_omniglot_5way_1shot_imaml():
    config = validate(compose())
    assert config["dataset"] | {"root": None} == {
        "name": "omniglot", "root": None, "ways": 5, "shots": 1, "queries": 1, "download": True,
        "rotations": True, "cache_dir": None}
    assert config["algorithm"] == {"name": "imaml", "lam": 2.0, "alternate_query": True, "zero_head": False}
    assert (config["inner_solver"]["name"], config["inner_solver"]["steps"], config["cg"]["steps"]) == ("gd", 16, 5)
    assert config["model"]["name"] == "omniglot_conv"


@pytest.mark.parametrize("preset, ways, shots, steps", [
    ("omniglot_5w5s", 5, 5, 16), ("omniglot_20w1s", 20, 1, 25), ("omniglot_20w5s", 20, 5, 25)])
def test_omniglot_presets_follow_the_paper(preset, ways, shots, steps):
    config = validate(compose([f"experiment={preset}"]))
    assert (config["dataset"]["ways"], config["dataset"]["shots"], config["inner_solver"]["steps"]) == (ways, shots, steps)
    assert (config["algorithm"]["lam"], config["cg"]["steps"]) == (2.0, 5)


def test_data_root_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAML_DATA_DIR", str(tmp_path))
    assert validate(compose())["dataset"]["root"] == str(tmp_path)
    monkeypatch.delenv("IMAML_DATA_DIR")
    assert validate(compose())["dataset"]["root"] == "data"


@pytest.mark.parametrize("override, message", [
    ("dataset.ways=1", "dataset.ways=1 is invalid"),
    ("dataset.shots=0", "dataset.shots=0 is invalid: expected an integer >= 1"),
    ("dataset.queries=0", "dataset.queries=0 is invalid"),
    ("algorithm.lam=0", "algorithm.lam=0 is invalid: expected a number > 0"),
    ("algorithm.lam=-1", "algorithm.lam=-1 is invalid"),
    ("inner_solver.steps=0", "inner_solver.steps=0 is invalid"),
    ("inner_solver.lr=0", "inner_solver.lr=0 is invalid: expected a number > 0"),
    ("inner_solver.lr=-0.1", "inner_solver.lr=-0.1 is invalid"),
    ("outer_optimizer.lr=0", "outer_optimizer.lr=0 is invalid"),
    ("cg.steps=0", "cg.steps=0 is invalid"),
    ("train.meta_batch_size=0", "train.meta_batch_size=0 is invalid"),
    ("train.meta_steps=abc", "train.meta_steps='abc' is invalid: expected an integer >= 1"),
    ("train.meta_steps=1.5", "train.meta_steps=1.5 is invalid"),
    ("algorithm.lam=nan", "algorithm.lam=nan is invalid"),
    ("device=tpu", "device='tpu' is invalid: expected one of auto, cpu, cuda"),
    ("eval.split=holdout", "eval.split='holdout' is invalid: expected one of train, val, test"),
    ("+train.lerning_rate=1", "unknown config key 'train.lerning_rate'"),
    ("algorithm=maml inner_solver=hf", "algorithm=maml adapts by gradient descent; use inner_solver=gd"),
    ("dataset=miniimagenet", "model=omniglot_conv is built for omniglot inputs but dataset=miniimagenet"),
    ("perf.precision=fp8", "perf.precision='fp8' is invalid: expected one of ieee, bf16, tf32"),
    ("perf.task_groups=0", "perf.task_groups=0 is invalid: expected auto or an integer >= 1"),
    ("perf.task_groups=many", "perf.task_groups='many' is invalid: expected auto or an integer >= 1"),
    ("model.conv_impl=winograd", "model.conv_impl='winograd' is invalid"),
    ("model.conv_impl=native", "perf.hvp=reverse_over_reverse cannot run with model.conv_impl=native"),
    ("cg.trust_radius=true cg.damping=0", "so it needs cg.damping > 0 (got 0); set e.g. cg.damping=1"),
    ("cg.trust_radius=true cg.damping=1 cg.solver=neumann", "stops conjugate gradient, not cg.solver=neumann"),
])
def test_bad_values_get_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as error:
        validate(compose(override.split()))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_resolved_config_round_trips_through_yaml():
    config = validate(compose(["experiment=sinusoid"]))
    assert validate(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.create(config)))) == config


def test_precision_must_exist_on_the_device():
    import torch

    from imaml_cli.engine.components import build_learner, build_network

    config = validate(compose(["experiment=sinusoid", "perf.precision=tf32"]))
    with pytest.raises(UserError, match="perf.precision=tf32 is not available on cpu; use one of ieee, bf16"):
        build_learner(config, build_network(config, torch.device("cpu")), torch.device("cpu"))
    config = validate(compose(["experiment=sinusoid", "perf.precision=bf16"]))
    assert build_learner(config, build_network(config, torch.device("cpu")), torch.device("cpu")).precision == "bf16"


def test_task_groups_auto_is_one_per_cpu_thread():
    import torch

    from imaml_cli.engine.components import build_learner, build_network

    cpu = torch.device("cpu")
    config = validate(compose(["experiment=sinusoid"]))
    assert build_learner(config, build_network(config, cpu), cpu).task_groups == torch.get_num_threads()
    config = validate(compose(["experiment=sinusoid", "perf.task_groups=3"]))
    assert build_learner(config, build_network(config, cpu), cpu).task_groups == 3
