import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


def compose(overrides=(), config_name="train"):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("imaml_cli.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


# A quick sinusoid run: every algorithm and solver runs in seconds on it.
QUICK = ["experiment=sinusoid", "train.meta_steps=4", "train.meta_batch_size=3", "train.val_every=2",
         "train.val_episodes=6", "train.checkpoint_every=2", "train.progress=false", "inner_solver.steps=2",
         "cg.steps=2", "eval.episodes=8", "eval.batch_size=4"]


def run_cli(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """An installed console script in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_same_state(a: dict, b: dict) -> None:
    """Parameters, optimizer state and the episode sampler's state, bit for bit."""
    assert a["step"] == b["step"]
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name])), name
    assert torch.equal(a["rng"]["sampler"], b["rng"]["sampler"])


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Whatever draws from the global generators (a network's initialisation, torch.randn without a
    generator) draws the same numbers whichever tests ran before, alone or in the whole suite."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("IMAML_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True, scope="session")
def caches_under_the_test_folders(tmp_path_factory):
    """Dataset caches that a test, or a command it runs, writes without naming a cache folder go
    under pytest's temporary folder rather than ~/.cache/imaml: no test reads what an earlier run
    left there, or leaves anything there. A test that looks into its cache takes ``cache_dir``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAML_CACHE_DIR", str(tmp_path_factory.mktemp("imaml-cache")))
        yield


@pytest.fixture(scope="session")
def real_omniglot_cache(tmp_path_factory):
    """One cache of the real Omniglot for the tests that read it, built by the first of them."""
    return tmp_path_factory.mktemp("real-omniglot-cache")
