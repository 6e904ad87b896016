"""eval.inner_steps: validation and test adapt with their own number of inner steps, meta-training
with inner_solver.steps; a resumed run that validates otherwise than its best checkpoint was scored
validates that checkpoint again. The truth each time: the checkpoint evaluated afresh by a learner
built with inner_solver.steps set to that number."""

import json
import logging

import pytest
import torch

from conftest import QUICK, assert_same_state, compose
from imaml_cli.config import validate
from imaml_cli.engine import components
from imaml_cli.engine.checkpoint import load_checkpoint
from imaml_cli.engine.evaluation import evaluate
from imaml_cli.engine.evaluation_run import evaluate_checkpoint
from imaml_cli.engine.loop import train

EVAL_STEPS = 5  # QUICK meta-trains with inner_solver.steps=2


def score(checkpoint, steps: int, split: str) -> float:
    """``checkpoint`` adapted with ``steps`` inner steps on QUICK's validation or test episodes."""
    config = validate(compose(QUICK + [f"inner_solver.steps={steps}"]))
    network = components.build_network(config, torch.device("cpu"))
    learner = components.build_learner(config, network, torch.device("cpu"))
    source = components.build_source(config, split, torch.device("cpu"), evaluation=True)
    theta = load_checkpoint(checkpoint)["params"]
    episodes = config["train"]["val_episodes"] if split == "val" else config["eval"]["episodes"]
    return evaluate(learner, theta, source, episodes=episodes, seed=config["eval"]["seed"],
                    batch_size=config["eval"]["batch_size"], split=split).mean


def test_validation_and_test_adapt_with_eval_inner_steps_and_meta_training_does_not(tmp_path):
    train(compose(QUICK + [f"eval.inner_steps={EVAL_STEPS}"]), tmp_path / "more")
    train(compose(QUICK), tmp_path / "same")
    checkpoints = tmp_path / "more" / "checkpoints"
    assert_same_state(load_checkpoint(checkpoints / "last.pt"), load_checkpoint(tmp_path / "same" / "checkpoints" / "last.pt"))
    results = json.loads((tmp_path / "more" / "results.json").read_text())
    assert results["best_val"] == pytest.approx(score(checkpoints / "best.pt", EVAL_STEPS, "val"), rel=1e-6)
    assert results["test"]["mean"] == pytest.approx(score(checkpoints / "best.pt", EVAL_STEPS, "test"), rel=1e-6)
    # The number of steps matters on these episodes, so the equalities above could fail.
    assert abs(results["test"]["mean"] - score(checkpoints / "best.pt", 2, "test")) > 1e-4


def test_imaml_eval_takes_eval_inner_steps_as_inner_solver_steps(tmp_path):
    train(compose(QUICK), tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    means = []
    for override in (f"eval.inner_steps={EVAL_STEPS}", f"inner_solver.steps={EVAL_STEPS}"):
        overrides = [f"checkpoint={best}", override]
        means.append(evaluate_checkpoint(compose(overrides, config_name="eval"), overrides, tmp_path / override))
    assert means[0] == means[1] == pytest.approx(score(best, EVAL_STEPS, "test"), rel=1e-6)


@pytest.mark.parametrize("where", ["new folder", "same folder"])
def test_a_resumed_run_that_validates_otherwise_validates_its_best_checkpoint_again(tmp_path, caplog, where):
    caplog.set_level(logging.INFO)
    trunk = tmp_path / "trunk"
    train(compose(QUICK), trunk)
    carried = load_checkpoint(trunk / "checkpoints" / "best.pt")
    again = score(trunk / "checkpoints" / "best.pt", EVAL_STEPS, "val")
    assert abs(again - carried["best_score"]) > 1e-6  # else a carried score would pass for a rescored one
    if where == "new folder":
        # No meta-steps after the branch point: the best to beat is the rescored one, and stays it.
        run = tmp_path / "branch"
        train(compose(QUICK + [f"eval.inner_steps={EVAL_STEPS}", f"train.resume={trunk / 'checkpoints' / 'last.pt'}"]),
              run)
        expected = again
    else:
        # Two more meta-steps and one validation of this run's own (sinusoid: the lower MSE is the better).
        run = trunk
        (run / "results.json").unlink()
        train(compose(QUICK + [f"eval.inner_steps={EVAL_STEPS}", "train.meta_steps=6"]), run)
        expected = min(again, score(run / "checkpoints" / "last.pt", EVAL_STEPS, "val"))
    results = json.loads((run / "results.json").read_text())
    assert results["best_val"] == pytest.approx(expected, rel=1e-6)
    assert "validated again as this run validates" in caplog.text
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert f"inner_steps: {EVAL_STEPS}" in best["config"]  # resumed again, it is not rescored a second time


def test_a_branch_that_validates_as_its_trunk_keeps_the_carried_score(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trunk = tmp_path / "trunk"
    train(compose(QUICK), trunk)
    carried = load_checkpoint(trunk / "checkpoints" / "best.pt")["best_score"]
    # The outer rate does not change a validation: no validation again.
    train(compose(QUICK + ["outer_optimizer.lr=0.0001", f"train.resume={trunk / 'checkpoints' / 'last.pt'}"]),
          tmp_path / "branch")
    assert json.loads((tmp_path / "branch" / "results.json").read_text())["best_val"] == carried
    assert "validated again" not in caplog.text
