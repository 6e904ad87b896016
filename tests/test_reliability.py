"""Faults injected into runs: kills, signals, failing disks, non-finite steps, hostile files."""

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, QUICK, assert_same_state, compose, run_cli
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


class Child:
    """A training command in a subprocess whose output is read as it comes (by two threads), so a
    full pipe never stalls it, and whose output a failed test shows."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None):
        self.process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def output(self) -> str:
        return f"stdout:\n{''.join(self.out)[-3000:]}\nstderr:\n{''.join(self.err)[-3000:]}"

    def wait_for_checkpoint(self, path: Path, step: int, timeout: float = 300) -> int:
        """Block until ``path`` holds a checkpoint of ``step`` or later, and return its step; fail
        the test, with the child's output, if the child ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        seen, current = None, -1
        while current < step:
            if self.process.poll() is not None:
                pytest.fail(f"the run ended (status {self.process.returncode}) before writing step {step}; "
                            f"last checkpoint step {current}\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no checkpoint of step {step} within {timeout} s; last step {current}\n{self.output()}")
            try:
                stat = path.stat()
                version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                version = None
            if version is not None and version != seen:  # loaded only when a new file was renamed in
                seen, current = version, read_step(path)
            time.sleep(0.05)
        return current

    def finish(self, timeout: float = 300) -> int:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not end within {timeout} s\n{self.output()}")
        for reader in self._readers:
            reader.join(10)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = {}

    def run(algorithm: str, extra: tuple) -> dict:
        if (algorithm, extra) not in cache:
            folder = tmp_path_factory.mktemp(f"straight-{algorithm}")
            result = run_cli("imaml-train", *LONG, f"algorithm={algorithm}", *extra, f"hydra.run.dir={folder}",
                             cwd=folder)
            assert result.returncode == 0, result.stderr
            cache[algorithm, extra] = load_checkpoint(folder / "checkpoints" / "last.pt")
        return cache[algorithm, extra]
    return run


# A learning rate that changes every meta-step: resuming must pick the schedule up where it was.
COSINE = ("outer_optimizer.schedule=cosine", "outer_optimizer.warmup_steps=5", "outer_optimizer.min_lr_fraction=0.1")


@pytest.mark.parametrize("algorithm, signum, extra", [
    ("imaml", signal.SIGKILL, ()), ("maml", signal.SIGKILL, ()), ("imaml", signal.SIGTERM, ()),
    ("maml", signal.SIGINT, ()), ("imaml", signal.SIGKILL, COSINE)],
    ids=["imaml-SIGKILL", "maml-SIGKILL", "imaml-SIGTERM", "maml-SIGINT", "imaml-cosine-SIGKILL"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, uninterrupted, algorithm, signum, extra):
    args = [*LONG, f"algorithm={algorithm}", *extra, f"hydra.run.dir={tmp_path / 'run'}"]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    # A checkpoint step (every 3) in the first third of the 40 steps: the signal lands mid-run even
    # when this process is descheduled for a while on a busy machine.
    target = 3 * random.Random(f"{algorithm}{signum}{extra}").randint(1, 4)
    child = Child([str(BIN / "imaml-train"), *args], cwd=tmp_path)
    reached = child.wait_for_checkpoint(last, target)
    child.process.send_signal(signum)
    status = child.finish()
    stderr = "".join(child.err)
    assert status in (-signal.SIGKILL, 128 + signum), child.output()
    stopped_at = read_step(last)
    assert reached <= stopped_at < 40, (reached, stopped_at, child.output())
    if signum != signal.SIGKILL:
        assert f"{signal.Signals(signum).name} at meta-step {stopped_at}" in stderr
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr

    resumed = run_cli("imaml-train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(load_checkpoint(last), uninterrupted(algorithm, extra))


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
    # torch.save's file names the class it would import; a bare pickle fails before that.
    why = "it holds objects other than tensors" if payload == "torch" else "it is not a file that torch.save wrote"
    with pytest.raises(UserError, match=why):
        load_checkpoint(path)
    assert not marker.exists()
    result = run_cli("imaml-eval", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2 and f"{path} cannot be read as a checkpoint: {why}" in result.stderr
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
    # The run's own last.pt: the way on is its best.pt, which this run has (validation every 2 steps).
    assert str(error.value) == (
        f"{path} cannot be read as a checkpoint: it is truncated or damaged (a copy cut short, or a write that "
        f"never finished); move it away and run the same command with train.resume={tmp_path}/checkpoints/best.pt "
        "to go on from the best checkpoint, or choose a new hydra.run.dir to start over")
    # And that way works.
    path.rename(tmp_path / "damaged.pt")
    train(compose(QUICK + [f"train.resume={tmp_path}/checkpoints/best.pt"]), tmp_path)
    assert load_checkpoint(path)["step"] == 4


# The console script on tiny generated Omniglot archives: the packaged split names characters the
# generated archives do not have, so the command replaces it before Hydra runs (in every run alike).
TINY_CHARACTERS = {"background": {"Alpha": ["character01", "character02"]}, "evaluation": {"Gamma": ["character01"]}}
OMNIGLOT_COMMAND = f"""
import sys
from imaml_cli.data import omniglot
omniglot.split_characters = lambda split: {TINY_CHARACTERS!r}
from imaml_cli.train import main
sys.argv[0] = "imaml-train"
main()
"""


def test_omniglot_conv_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Exact resume on the default path of real training: the Omniglot conv net, iMAML with the
    backtracking inner loop on the fused passes. SIGKILL leaves no chance to save: the rerun
    continues from the last periodic checkpoint and recomputes the steps after it."""
    from test_data_omniglot import make_zips

    root = make_zips(tmp_path / "omniglot")
    settings = ["experiment=omniglot_5w1s", f"dataset.root={root}", "dataset.download=false",
                "train.meta_steps=24", "train.meta_batch_size=2", "train.checkpoint_every=4", "train.val_every=0",
                "train.progress=false", "inner_solver.steps=3", "cg.steps=2", "eval.episodes=2"]
    # One thread, so that every product sums in the same order in every run.
    env = {"IMAML_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-c", OMNIGLOT_COMMAND, *settings, f"hydra.run.dir={run}"]

    # The data cache is built once, before the two runs that start together would race for it.
    from imaml_cli.data.omniglot import load_omniglot
    load_omniglot(root, "train", cache_dir=tmp_path / "cache", characters=TINY_CHARACTERS)

    straight = Child(command(tmp_path / "straight"), cwd=tmp_path, env=env)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    killed = Child(command(tmp_path / "run"), cwd=tmp_path, env=env)
    reached = killed.wait_for_checkpoint(last, 8)
    killed.process.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    stopped_at = read_step(last)
    assert reached <= stopped_at < 24, (reached, stopped_at, killed.output())
    assert straight.finish() == 0, straight.output()

    resumed = Child(command(tmp_path / "run"), cwd=tmp_path, env=env)
    assert resumed.finish() == 0, resumed.output()
    assert f"resuming from {last} at meta-step {stopped_at}" in (tmp_path / "run" / "train.log").read_text()
    final = load_checkpoint(last)
    assert final["step"] == 24
    assert_same_state(final, load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"))
