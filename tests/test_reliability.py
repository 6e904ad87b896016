"""Faults injected into runs: kills, signals, failing disks, non-finite steps, hostile files."""

import errno
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, QUICK, compose, run_cli
from imaml_cli.engine import checkpoint as checkpoint_module
from imaml_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError
from imaml_cli.meta.algorithms import MetaLearner

# Long enough (a few seconds) that a signal lands in the middle of training.
LONG = QUICK + ["train.meta_steps=40", "train.checkpoint_every=3", "train.val_every=10",
                "train.meta_batch_size=8", "inner_solver.steps=10", "cg.steps=4"]


def read_step(path: Path) -> int:
    try:
        return load_checkpoint(path)["step"]
    except UserError:
        return -1


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name])), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = {}

    def run(algorithm: str) -> dict:
        if algorithm not in cache:
            folder = tmp_path_factory.mktemp(f"straight-{algorithm}")
            result = run_cli("imaml-train", *LONG, f"algorithm={algorithm}", f"hydra.run.dir={folder}", cwd=folder)
            assert result.returncode == 0, result.stderr
            cache[algorithm] = load_checkpoint(folder / "checkpoints" / "last.pt")
        return cache[algorithm]
    return run


@pytest.mark.parametrize("algorithm, signum", [
    ("imaml", signal.SIGKILL), ("maml", signal.SIGKILL), ("imaml", signal.SIGTERM), ("maml", signal.SIGINT)],
    ids=["imaml-SIGKILL", "maml-SIGKILL", "imaml-SIGTERM", "maml-SIGINT"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, uninterrupted, algorithm, signum):
    args = [*LONG, f"algorithm={algorithm}", f"hydra.run.dir={tmp_path / 'run'}"]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    target = random.Random(f"{algorithm}{signum}").randint(3, 25)
    process = subprocess.Popen([str(BIN / "imaml-train"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 240
    while read_step(last) < target and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGKILL, 128 + signum), (process.returncode, stderr)
    stopped_at = read_step(last)
    assert target <= stopped_at < 40
    if signum != signal.SIGKILL:
        assert f"{signal.Signals(signum).name} at meta-step {stopped_at}" in stderr
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr

    resumed = run_cli("imaml-train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(load_checkpoint(last), uninterrupted(algorithm))


def test_a_write_failing_part_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "params": {}, "optimizer": {}, "rng": {}, "config": ""}, path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"\x80\x02partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(UserError) as error:
        save_checkpoint({"step": 2, "params": {}, "optimizer": {}, "rng": {}, "config": ""}, path)
    assert "No space left on device" in str(error.value) and "previous checkpoint there is unchanged" in str(error.value)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_crash_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "params": {}, "optimizer": {}, "rng": {}, "config": ""}, path)

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "params": {}, "optimizer": {}, "rng": {}, "config": ""}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def poison(monkeypatch, bad_calls):
    """Make the meta-gradient NaN on the given (1-based) calls."""
    original = MetaLearner.meta_gradient
    calls = []

    def meta_gradient(self, theta, tasks):
        calls.append(1)
        grads, metrics = original(self, theta, tasks)
        if len(calls) in bad_calls:
            grads = {k: torch.full_like(v, float("nan")) for k, v in grads.items()}
        return grads, metrics

    monkeypatch.setattr(MetaLearner, "meta_gradient", meta_gradient)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    poison(monkeypatch, {2})
    train(compose(QUICK + ["train.val_every=0", "train.log_every=1"]), tmp_path)
    import json

    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 1
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["params"].values())
    # Adam took 3 steps, not 4.
    assert all(s["step"] == 3 for s in state["optimizer"]["state"].values())


def test_persistent_non_finite_steps_stop_the_run_with_the_last_good_state(tmp_path, monkeypatch):
    train(compose(QUICK + ["train.meta_steps=2", "train.val_every=0"]), tmp_path / "good")
    good = load_checkpoint(tmp_path / "good" / "checkpoints" / "last.pt")
    poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(UserError) as error:
        train(compose(QUICK + ["train.meta_steps=20", "train.val_every=0", "train.max_bad_steps=3"]), tmp_path / "run")
    assert "3 meta-steps in a row had a non-finite loss or meta-gradient" in str(error.value)
    assert "lower outer_optimizer.lr or inner_solver.lr" in str(error.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 5
    for k in good["params"]:
        assert torch.equal(state["params"][k], good["params"][k])


class WritesMarker:
    """Unpickling this object runs a command: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["pickle", "torch"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = {"format": checkpoint_module.FORMAT, "step": 1, "params": WritesMarker(marker), "optimizer": {},
             "rng": {}, "config": ""}
    if payload == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(UserError, match="is not a readable imaml checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    result = run_cli("imaml-eval", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2 and "is not a readable imaml checkpoint" in result.stderr
    assert not marker.exists()
    # The payload is real: a plain unpickler would have run it.
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    train(compose(QUICK), tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError) as error:
        train(compose(QUICK), tmp_path)
    assert "is not a readable imaml checkpoint" in str(error.value) and "\n" not in str(error.value)
