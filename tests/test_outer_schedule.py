"""The outer learning-rate schedule: its values against the closed form, that the optimizer steps
with them, and that a resumed run follows it (test_reliability.py)."""

import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, compose
from imaml_cli.config import validate
from imaml_cli.engine.checkpoint import load_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.engine.schedule import outer_learning_rate
from imaml_cli.errors import UserError


def settings(schedule="cosine", lr=0.01, warmup=0, floor=0.0, milestones=(), gamma=0.1):
    return {"lr": lr, "schedule": schedule, "warmup_steps": warmup, "min_lr_fraction": floor,
            "milestones": list(milestones), "gamma": gamma}


def test_cosine_meets_its_closed_form_at_the_ends_and_the_middle():
    # 10 warm-up steps then 100 of decay from 0.01 to 0.001.
    s = settings(warmup=10, floor=0.1)
    assert outer_learning_rate(s, 1, 110) == pytest.approx(0.001)
    assert outer_learning_rate(s, 5, 110) == pytest.approx(0.005)
    assert outer_learning_rate(s, 10, 110) == pytest.approx(0.01)
    assert outer_learning_rate(s, 60, 110) == pytest.approx((0.01 + 0.001) / 2)
    assert outer_learning_rate(s, 35, 110) == pytest.approx(0.001 + 0.009 * (1 + math.cos(math.pi / 4)) / 2)
    assert outer_learning_rate(s, 110, 110) == pytest.approx(0.001)
    rates = [outer_learning_rate(s, t, 110) for t in range(10, 111)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_constant_is_the_rate_after_its_warm_up():
    assert [outer_learning_rate(settings("constant", warmup=4), t, 50) for t in (1, 4, 5, 50)] == \
        pytest.approx([0.0025, 0.01, 0.01, 0.01])


def test_step_multiplies_by_gamma_from_the_meta_step_after_each_milestone():
    s = settings("step", lr=0.01, warmup=2, milestones=(3, 5), gamma=0.5)
    assert [outer_learning_rate(s, t, 8) for t in range(1, 9)] == \
        pytest.approx([0.005, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025, 0.0025])


def run(tmp_path, name, *overrides):
    folder = tmp_path / name
    train(compose(QUICK + ["outer_optimizer=sgd", "train.val_every=0", "train.log_every=1", *overrides]), folder)
    return folder, load_checkpoint(folder / "checkpoints" / "last.pt")


def test_the_optimizer_steps_with_the_scheduled_rate(tmp_path):
    """One SGD step with a 4-step warm-up at lr 0.4 is one step at 0.1, and not one at 0.4."""
    _, warm = run(tmp_path, "warm", "train.meta_steps=1", "outer_optimizer.lr=0.4", "outer_optimizer.warmup_steps=4")
    _, quarter = run(tmp_path, "quarter", "train.meta_steps=1", "outer_optimizer.lr=0.1")
    _, full = run(tmp_path, "full", "train.meta_steps=1", "outer_optimizer.lr=0.4")
    for k in warm["params"]:
        torch.testing.assert_close(warm["params"][k], quarter["params"][k], rtol=1e-6, atol=1e-7)
    assert max((warm["params"][k] - full["params"][k]).abs().max().item() for k in warm["params"]) > 1e-3


def test_the_rate_of_each_meta_step_is_logged(tmp_path):
    overrides = ["train.meta_steps=6", "outer_optimizer.schedule=cosine", "outer_optimizer.warmup_steps=2",
                 "outer_optimizer.min_lr_fraction=0.1", "outer_optimizer.lr=0.05"]
    folder, state = run(tmp_path, "cosine", *overrides)
    events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/outer_lr")}
    # warm-up 0.025, 0.05; then cos over 4 steps from 0.05 to 0.005.
    expected = {1: 0.025, 2: 0.05, 6: 0.005, 4: 0.005 + 0.045 * (1 + math.cos(math.pi / 2)) / 2}
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-6), step
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)


def test_a_step_schedule_is_the_run_resumed_at_its_milestone_with_the_lower_rate(tmp_path):
    """Two SGD steps at 0.4, then a resume with lr 0.1 for two more (how a run is branched at a
    checkpoint), give the parameters of one run with a step schedule at milestone 2, γ = 0.25."""
    first, _ = run(tmp_path, "first", "train.meta_steps=2", "outer_optimizer.lr=0.4")
    _, branched = run(tmp_path, "branched", "train.meta_steps=4", "outer_optimizer.lr=0.1",
                      f"train.resume={first / 'checkpoints' / 'last.pt'}")
    _, stepped = run(tmp_path, "stepped", "train.meta_steps=4", "outer_optimizer.lr=0.4", "outer_optimizer.schedule=step",
                     "outer_optimizer.milestones=[2]", "outer_optimizer.gamma=0.25")
    _, constant = run(tmp_path, "constant", "train.meta_steps=4", "outer_optimizer.lr=0.4")
    assert branched["step"] == stepped["step"] == 4
    for k in stepped["params"]:
        torch.testing.assert_close(stepped["params"][k], branched["params"][k], rtol=1e-5, atol=1e-6)
    assert max((stepped["params"][k] - constant["params"][k]).abs().max().item() for k in stepped["params"]) > 1e-3


@pytest.mark.parametrize("override, message", [
    ("outer_optimizer.schedule=linear", "outer_optimizer.schedule='linear' is invalid: expected one of constant, cosine, step"),
    ("outer_optimizer.schedule=step", "outer_optimizer.milestones go with outer_optimizer.schedule=step, and it needs them"),
    ("outer_optimizer.milestones=[100]", "outer_optimizer.milestones go with outer_optimizer.schedule=step"),
    ("outer_optimizer.milestones=[300,200]", "outer_optimizer.milestones=[300, 200] is invalid: expected a list of increasing"),
    ("outer_optimizer.gamma=0", "outer_optimizer.gamma=0 is invalid: expected a number > 0"),
    ("outer_optimizer.min_lr_fraction=1.5", "outer_optimizer.min_lr_fraction=1.5 is invalid: expected a number from 0 to 1"),
    ("outer_optimizer.warmup_steps=-1", "outer_optimizer.warmup_steps=-1 is invalid"),
])
def test_bad_schedule_settings_are_named(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose(QUICK + [override]))
