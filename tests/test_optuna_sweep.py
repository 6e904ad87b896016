"""hparams_search=optuna: Hydra's Optuna sweeper over λ and the learning rates, in the direction the
dataset's score needs, reporting the best trial."""

import json

import pytest
import yaml

from conftest import QUICK, run_cli
from imaml_cli.config import DATASETS

SEARCHED = {"algorithm.lam": (0.1, 10.0), "inner_solver.lr": (0.001, 0.5), "outer_optimizer.lr": (0.0001, 0.01)}


def sweeper(overrides):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("imaml_cli.conf", version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True).hydra.sweeper


@pytest.mark.parametrize("overrides, direction", [
    (["experiment=sinusoid"], "minimize"),
    (["experiment=omniglot_20w5s"], "maximize"),
    (["experiment=miniimagenet_5w1s"], "maximize"),
    (["dataset=image_folder"], "maximize"),
    (["experiment=sinusoid", "dataset=omniglot", "model=omniglot_conv"], "maximize"),
])
def test_the_direction_follows_the_datasets_score(overrides, direction):
    chosen = sweeper(["hparams_search=optuna", *overrides])
    assert chosen._target_.endswith("OptunaSweeper") and chosen.direction == direction
    assert set(chosen.params) == set(SEARCHED)


def test_every_dataset_has_a_direction():
    for dataset in DATASETS:
        assert sweeper(["hparams_search=optuna", f"dataset={dataset}"]).direction in ("maximize", "minimize")


def test_without_the_preset_a_multirun_is_the_plain_grid_sweep():
    assert sweeper([])._target_.endswith("BasicSweeper")


def test_three_trials_on_the_sinusoid_report_the_lowest_validation_mse(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli("imaml-train", "-m", "hparams_search=optuna", *QUICK, "hydra.sweeper.n_trials=3",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1", "2"]
    scores, params = [], []
    for trial in trials:
        scores.append(json.loads((trial / "results.json").read_text())["best_val"])
        chosen = dict(o.split("=", 1) for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
                      if o.split("=", 1)[0] in SEARCHED)
        assert set(chosen) == set(SEARCHED)
        assert all(low <= float(chosen[key]) <= high for key, (low, high) in SEARCHED.items())
        params.append({key: float(value) for key, value in chosen.items()})
    assert len({tuple(p.values()) for p in params}) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(scores))
    assert best["best_params"] == pytest.approx(params[scores.index(min(scores))])
    log = done.stdout + done.stderr
    assert "Best parameters:" in log and "Best value:" in log
