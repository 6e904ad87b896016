"""The best checkpoint: the highest validation accuracy, or the lowest validation MSE, with the
validation scores scripted so that the right choice is known in advance."""

import json

import pytest
import torch

from conftest import QUICK, compose
from imaml_cli.engine import loop
from imaml_cli.engine.checkpoint import load_checkpoint
from imaml_cli.engine.evaluation import EvalResult
from imaml_cli.engine.loop import train
from test_image_folder import RUN, split_folders

# Validation after each of 4 meta-steps. The best is at step 2 either way; keeping the worst
# instead would pick step 3, and keeping the first or the last step 1 or 4.
ACCURACY = [50.0, 80.0, 30.0, 60.0]
MSE = [0.5, 0.2, 0.9, 0.4]


class ScriptedValidation:
    """Stands in for ``loop.evaluate``: validation i scores ``scores[i]``; records the parameters
    each evaluation saw."""

    def __init__(self, metric, scores):
        self.metric, self.scores = metric, list(scores)
        self.seen = {"val": [], "test": []}

    def __call__(self, learner, params, source, *, episodes, split, **_):
        self.seen[split].append({k: v.detach().clone() for k, v in params.items()})
        mean = self.scores[len(self.seen["val"]) - 1] if split == "val" else 42.0
        return EvalResult(self.metric, mean, 1.0, episodes, split, 5, 1, [mean] * episodes, 1)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_the_best_validation_score_picks_the_checkpoint_that_is_tested(tmp_path, cache_dir, monkeypatch, kind):
    if kind == "classification":
        split_folders(tmp_path / "root")
        overrides = RUN + [f"dataset.root={tmp_path / 'root'}", "train.meta_steps=4"]
        scripted = ScriptedValidation("accuracy", ACCURACY)
    else:
        overrides = QUICK + ["train.val_every=1"]
        scripted = ScriptedValidation("mse", MSE)
    monkeypatch.setattr(loop, "evaluate", scripted)
    score = train(compose(overrides), tmp_path / "run")

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert len(scripted.seen["val"]) == 4 and len(scripted.seen["test"]) == 1
    assert (results["best_step"], results["best_val"], results["score"], score) == (2, scripted.scores[1],
                                                                                     scripted.scores[1],
                                                                                     scripted.scores[1])
    assert results["checkpoint"] == "best" and results["test"]["mean"] == 42.0
    assert (best["step"], best["best_step"], best["best_score"], last["step"]) == (2, 2, scripted.scores[1], 4)
    # best.pt holds θ as validated at step 2, and that θ, not the last one, is what the test evaluates.
    tested = scripted.seen["test"][0]
    for name, value in best["params"].items():
        assert torch.equal(value, scripted.seen["val"][1][name]), name
        assert torch.equal(tested[name], value), name
    assert any(not torch.equal(last["params"][k], best["params"][k]) for k in best["params"])
