"""What a finished or resumed run leaves in its folder, through the installed command: every logged
point once, no lock file, files the user's group can read, one unit per kind of scalar."""

import json
import os
import stat
from collections import Counter

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, run_cli


def scalar_steps(run) -> dict[str, list[int]]:
    """Every (tag, step) point TensorBoard shows, after its own handling of purged steps."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train(run, tmp_path, *overrides: str):
    result = run_cli("imaml-train", *QUICK, "train.log_every=1", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result


def test_a_resumed_run_keeps_every_point_once(tmp_path):
    run = tmp_path / "run"
    # Stopped after meta-step 2's checkpoint and validation (as a kill there leaves it), then resumed.
    train(run, tmp_path, "train.meta_steps=2")
    train(run, tmp_path, "train.meta_steps=4")
    steps = scalar_steps(run)
    assert steps["train/post_query_loss"] == [1, 2, 3, 4]
    assert steps["val/mse"] == [2, 4]
    # And a run that went on past its checkpoint before the kill loses what it logged after it.
    straight = tmp_path / "straight"
    train(straight, tmp_path, "train.meta_steps=3", "train.checkpoint_every=2", "train.val_every=3")
    (straight / "results.json").unlink()
    last = straight / "checkpoints" / "last.pt"
    os.replace(straight / "checkpoints" / "best.pt", last)  # the state at meta-step 3, validated there
    train(straight, tmp_path, "train.meta_steps=4", "train.checkpoint_every=2", "train.val_every=3")
    assert Counter(scalar_steps(straight)["train/post_query_loss"]) == Counter([1, 2, 3, 4])


def test_a_finished_run_leaves_no_lock_and_files_readable_as_the_umask_allows(tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(run, tmp_path)
    finally:
        os.umask(old)
    assert not (run / ".lock").exists()
    for path in (run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt", run / "results.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    result = run_cli("imaml-eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "eval" / ".lock").exists()
    assert stat.S_IMODE((tmp_path / "eval" / "eval.json").stat().st_mode) == 0o644


def test_a_sweep_leaves_no_lock_files(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("imaml-train", "-m", *QUICK, "algorithm.lam=0.5,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (sweep / "0" / "results.json").exists() and (sweep / "1" / "results.json").exists()
    assert not list(sweep.rglob(".lock"))


def test_accuracies_are_in_percent_in_training_as_in_validation(tmp_path):
    from test_distributed_fused import overrides, write_folder

    run = tmp_path / "run"
    result = run_cli("imaml-train", *overrides(write_folder(tmp_path / "images")), "train.meta_steps=2",
                     "train.val_every=2", "train.log_every=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = EventAccumulator(str(run / "tb"))
    steps.Reload()
    # 3 ways, 2 queries per class: a task's accuracy is a multiple of 1/6, so a meta-batch's mean (33
    # tasks) of 1/198 and a validation's (6 episodes) of 1/36.
    for tag, unit in (("train/pre_query_accuracy", 198), ("train/post_query_accuracy", 198), ("val/accuracy", 36)):
        values = [e.value for e in steps.Scalars(tag)]
        assert all(abs(v * unit / 100 - round(v * unit / 100)) < 1e-3 and 0 <= v <= 100 for v in values), tag
    assert max(e.value for e in steps.Scalars("train/post_query_accuracy")) > 1


def test_a_sweep_with_a_bad_later_value_stops_before_job_0_and_leaves_nothing(tmp_path):
    result = run_cli("imaml-train", "-m", *QUICK, "algorithm=imaml,maml", "algorithm.lam=0.5,-1",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the sweep's job with algorithm=imaml algorithm.lam=-1 would fail: algorithm.lam=-1 is invalid: "
        "expected a number > 0; nothing was run"]
    assert not list(tmp_path.iterdir())


def test_both_commands_say_where_they_write_and_eval_shows_its_progress(tmp_path):
    run, evaluation = tmp_path / "run", tmp_path / "eval"
    trained = train(run, tmp_path)
    lines = trained.stdout.splitlines()
    assert lines[0] == f"run folder: {run}"
    assert lines[-1] == f"written: {run / 'results.json'}, checkpoints/ and tb/ in {run}"
    result = run_cli("imaml-eval", f"checkpoint={run}", "train.progress=true", "eval.episodes=8", "eval.batch_size=2",
                     f"hydra.run.dir={evaluation}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("[")]  # log records
    assert lines[0] == f"run folder: {evaluation}" and lines[-1] == f"written: {evaluation / 'eval.json'}"
    assert "test episodes: 100%" in result.stderr and "8/8" in result.stderr


def test_per_episode_accuracies_carry_no_float_noise(tmp_path):
    from test_distributed_fused import overrides, write_folder

    run = tmp_path / "run"
    # An inner step too small to adapt: accuracies near chance, so thirds and sixths among them.
    result = run_cli("imaml-train", *overrides(write_folder(tmp_path / "images")), "train.val_every=0",
                     "inner_solver.lr=1e-5", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scores = json.loads((run / "results.json").read_text())["test"]["per_episode"]
    # 3 ways, 2 queries per class: k/6 of an episode's queries right, printed as such.
    assert {100 * k / 6 for k in range(7)} >= set(scores) and len(scores) == 12
    assert set(scores) - {0.0, 50.0, 100.0}


def test_an_image_folder_run_says_how_many_classes_each_split_got(tmp_path):
    from test_distributed_fused import overrides, write_folder

    root = write_folder(tmp_path / "images")
    result = run_cli("imaml-train", *overrides(root), f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for split in ("train", "val", "test"):
        assert f"the '{split}' split of {root / split}: 6 classes, 36 images" in result.stdout, split
