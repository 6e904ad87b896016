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


def test_eval_takes_the_checkpoints_step_count_for_another_solver():
    from omegaconf import OmegaConf

    from imaml_cli.engine.evaluation_run import apply_overrides

    # A 20-way checkpoint: its preset's counts differ from the composed default preset's (5-way).
    stored = OmegaConf.create(validate(compose(["experiment=omniglot_20w1s", "inner_steps.hf=7"])))

    def evaluated(*overrides):
        composed = compose(["experiment=omniglot_5w1s", *overrides], config_name="eval")
        return validate(apply_overrides(stored, composed, list(overrides)))

    assert evaluated()["inner_solver"]["steps"] == 25
    assert evaluated("inner_solver=hf")["inner_solver"]["steps"] == 7
    assert evaluated("inner_steps.gd=3")["inner_solver"]["steps"] == 3
    assert evaluated("inner_solver=hf", "inner_solver.steps=2")["inner_solver"]["steps"] == 2


def test_resuming_a_checkpoint_that_predates_a_setting_goes_on_and_says_so(tmp_path, caplog):
    from omegaconf import OmegaConf

    from conftest import QUICK
    from imaml_cli.engine.checkpoint import load_checkpoint, save_checkpoint
    from imaml_cli.engine.loop import train

    train(compose(QUICK + ["train.meta_steps=2"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    old = OmegaConf.create(state["config"])
    del old.cg["solver"]
    state["config"] = OmegaConf.to_yaml(old)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, last)
    (tmp_path / "results.json").unlink()
    with caplog.at_level("WARNING", logger="imaml"):
        train(compose(QUICK + ["train.meta_steps=3"]), tmp_path)
    assert "the checkpoint predates cg.solver; the run goes on with cg.solver=cg" in caplog.text
    assert load_checkpoint(last)["step"] == 3
    with pytest.raises(UserError, match="other settings \\(cg.steps\\)"):
        train(compose(QUICK + ["train.meta_steps=4", "cg.steps=3"]), tmp_path)
