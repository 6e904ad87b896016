"""The paper's evaluation protocol in the presets, per-solver step counts, and eval.queries."""

import pytest
import torch

from conftest import compose
from imaml_cli.config import validate
from imaml_cli.engine.components import build_source
from imaml_cli.errors import UserError

OMNIGLOT = ["omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s"]
PRESETS = OMNIGLOT + ["miniimagenet_5w1s", "miniimagenet_5w5s", "sinusoid"]


@pytest.mark.parametrize("preset", OMNIGLOT)
def test_omniglot_presets_run_the_papers_protocol(preset):
    config = validate(compose([f"experiment={preset}"]))
    # As many query images per class as shots, in training and at test, on 600 test episodes.
    assert config["dataset"]["queries"] == config["dataset"]["shots"]
    assert config["eval"]["queries"] is None and config["eval"]["episodes"] == 600


@pytest.mark.parametrize("preset", PRESETS)
def test_each_solver_runs_its_own_step_count_from_the_preset(preset):
    gd = validate(compose([f"experiment={preset}"]))
    hf = validate(compose([f"experiment={preset}", "inner_solver=hf"]))
    assert gd["inner_solver"]["steps"] == gd["inner_steps"]["gd"]
    assert hf["inner_solver"]["steps"] == hf["inner_steps"]["hf"]
    # The preset's GD count must not leak into HF: changing it leaves HF's count alone.
    moved = validate(compose([f"experiment={preset}", "inner_solver=hf", f"inner_steps.gd={gd['inner_steps']['gd'] + 7}"]))
    assert moved["inner_solver"]["steps"] == hf["inner_steps"]["hf"]


def test_inner_solver_steps_still_overrides_the_chosen_solver():
    config = validate(compose(["inner_solver=hf", "inner_solver.steps=9"]))
    assert config["inner_solver"]["steps"] == 9
    with pytest.raises(UserError, match="inner_steps.hf=0 is invalid"):
        validate(compose(["inner_steps.hf=0"]))


def test_eval_queries_set_validation_and_test_episodes_only():
    config = validate(compose(["experiment=sinusoid", "dataset.queries=4", "eval.queries=7"]))
    cpu = torch.device("cpu")
    assert build_source(config, "train", cpu).queries == 4
    assert build_source(config, "train", cpu, evaluation=True).queries == 7
    assert build_source(config, "test", cpu, evaluation=True).queries == 7
    unset = validate(compose(["experiment=sinusoid", "dataset.queries=4"]))
    assert build_source(unset, "test", cpu, evaluation=True).queries == 4
    with pytest.raises(UserError, match="eval.queries=0 is invalid: expected null or an integer >= 1"):
        validate(compose(["eval.queries=0"]))
