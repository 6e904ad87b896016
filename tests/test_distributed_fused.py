"""Two torchrun ranks on the default fast path (the built-in conv net, fused passes, task groups)
train and evaluate as one process does.

Training is compared over one meta-step, to rounding. Over more steps two ranks and one process
part ways on every code path, fused or not: the meta-gradient of a small ReLU + batch-norm net is
so ill-conditioned in θ that a change of 1e-7 in θ (the all-reduce sums the task average in
another order) changes it by 0.4-5% (docs/scaling-out.md, "Same answer on N processes"). A lost,
doubled, mis-weighted or mis-ordered task, or a group run twice, moves Adam's first moment and
the parameters by ~1e-3 after one step.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, run_cli
from imaml_cli.engine.evaluation_run import evaluate_checkpoint
from imaml_cli.engine.loop import train
from test_distributed import ONE_THREAD, one_thread, torchrun


def write_folder(root: Path) -> Path:
    """Split folders of 6 classes of 28x28 grey images, 6 images each: distinct, learnable classes."""
    for k, split in enumerate(("train", "val", "test")):
        for c in range(6):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            rng = np.random.default_rng(100 * k + c)
            base = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            for i in range(6):
                noise = rng.integers(-20, 21, (28, 28))
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= 1e-5, f"{what}: relative difference {error:.2e}"


def overrides(root: Path) -> list[str]:
    return ["dataset=image_folder", f"dataset.root={root}", "dataset.image_size=28", "dataset.channels=1",
            "dataset.ways=3", "dataset.shots=2", "dataset.queries=2", "model=omniglot_conv",
            "train.meta_steps=1", "train.meta_batch_size=33", "train.val_every=1", "train.val_episodes=6",
            "train.checkpoint_every=1", "train.progress=false", "inner_solver.steps=3", "algorithm.lam=2.0",
            "eval.episodes=12", "eval.batch_size=4", "perf.fused=true", "perf.task_groups=2"]


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("data") / "images")
    cache = tmp_path_factory.mktemp("cache")
    return root, cache


def test_fused_training_on_two_ranks_equals_one_process(folder_runs, tmp_path, monkeypatch):
    root, cache = folder_runs
    monkeypatch.setenv("IMAML_CACHE_DIR", str(cache))
    single = tmp_path / "single"
    with one_thread():
        train(compose(overrides(root)), single)
    parallel = tmp_path / "parallel"
    torchrun("-m", "imaml_cli.train", *overrides(root), f"hydra.run.dir={parallel}", cwd=tmp_path)
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parallel / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 1
    # Relative to each tensor's norm: Adam's first step divides each entry by its own magnitude, so
    # an entry whose gradient is rounding noise differs by more than 1e-5 of itself.
    for name, value in a["params"].items():
        assert_relative(b["params"][name], value, name)
    for key, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert_relative(b["optimizer"]["state"][key][name], state[name], f"{name} of parameter {key}")
    assert max(state["exp_avg"].abs().max().item() for state in a["optimizer"]["state"].values()) > 1e-4
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (single, parallel))
    assert rb["test"]["per_episode"] == pytest.approx(ra["test"]["per_episode"], abs=1e-4)


def test_fused_evaluation_on_two_ranks_equals_one_process(folder_runs, tmp_path, monkeypatch):
    root, cache = folder_runs
    monkeypatch.setenv("IMAML_CACHE_DIR", str(cache))
    run = tmp_path / "run"
    with one_thread():
        train(compose(overrides(root) + ["train.val_every=0"]), run)
    args = [f"checkpoint={run / 'checkpoints' / 'last.pt'}", "eval.episodes=14", "eval.batch_size=4"]
    torchrun("-m", "imaml_cli.evaluate", *args, f"hydra.run.dir={tmp_path / 'parallel'}", cwd=tmp_path)
    with one_thread():
        evaluate_checkpoint(compose(args, config_name="eval"), args, tmp_path / "single")
    single, parallel = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("single", "parallel"))
    # Each rank adapts whole batches of the same episodes, so the numbers are the same to the bit.
    assert parallel["per_episode"] == single["per_episode"] and len(single["per_episode"]) == 14
