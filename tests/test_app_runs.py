"""Whole runs: every algorithm end to end, resume, imaml-eval, sweeps, the installed scripts."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from conftest import QUICK, REPO, assert_same_state, compose, run_cli
from imaml_cli.engine import components, loop
from imaml_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError

TESTS = Path(__file__).resolve().parent


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def returned_values(target, name: str):
    """Patch ``target.name`` to record what each call returns; yields the list of returns."""
    original = getattr(target, name)
    values = []

    def record(*args, **kwargs):
        values.append(original(*args, **kwargs))
        return values[-1]
    return mock.patch.object(target, name, side_effect=record), values


@pytest.mark.parametrize("overrides", [
    ["algorithm=imaml"], ["algorithm=imaml", "inner_solver=hf"], ["algorithm=maml"], ["algorithm=fomaml"],
    ["algorithm=reptile", "outer_optimizer=sgd"]], ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_each_algorithm_and_solver_trains_end_to_end(tmp_path, overrides):
    patch, evaluations = returned_values(loop, "evaluate")
    with patch:
        score = train(compose(QUICK + overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta_steps"] == 4 and results["checkpoint"] == "best"
    assert results["test"]["episodes"] == 8 and len(results["test"]["per_episode"]) == 8
    # The score is the best (lowest) validation MSE of the run, from the validations at steps 2 and 4.
    validations = [r.mean for r in evaluations if r.split == "val"]
    assert len(validations) == 2 and all(math.isfinite(v) for v in validations)
    assert score == results["best_val"] == min(validations)
    assert results["best_step"] == 2 * (1 + validations.index(score))
    assert [r.mean for r in evaluations if r.split == "test"] == [results["test"]["mean"]]
    state = final_state(tmp_path)
    assert state["step"] == 4
    # The outer optimizer moved the parameters away from their initialisation.
    initial = dict(__import__("imaml_cli.engine.components", fromlist=["x"]).build_network(
        __import__("imaml_cli.config", fromlist=["x"]).validate(compose(QUICK + overrides)),
        torch.device("cpu")).named_parameters())
    assert any(not torch.equal(state["params"][k], initial[k].detach()) for k in initial)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_omniglot_run_on_generated_images(tmp_path, cache_dir, monkeypatch):
    from test_data_omniglot import make_zips, use_tiny_splits

    root = make_zips(tmp_path / "omniglot")
    # Each split has 2 characters of its own (8 classes with rotations), each character a bar of its
    # own height: 5-way episodes that adaptation can solve from one example per class.
    use_tiny_splits(tmp_path / "splits", monkeypatch)
    overrides = ["experiment=omniglot_5w1s", f"dataset.root={root}", "dataset.download=false",
                 "train.meta_steps=2", "train.meta_batch_size=2", "train.val_every=1", "train.val_episodes=2",
                 "inner_solver.steps=2", "cg.steps=2", "eval.episodes=4", "train.progress=false",
                 "dataset.queries=2"]
    train(compose(overrides), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["metric"] == "accuracy" and results["test"]["ways"] == 5
    # Chance is 20%.
    assert len(results["test"]["per_episode"]) == 4
    assert results["test"]["mean"] >= 80 and results["best_val"] >= 80


def test_extending_a_finished_run_equals_one_long_run(tmp_path):
    straight = QUICK + ["train.meta_steps=6"]
    train(compose(straight), tmp_path / "straight")
    train(compose(QUICK + ["train.meta_steps=3"]), tmp_path / "split")
    train(compose(straight), tmp_path / "split")
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert b["step"] == 6
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert torch.equal(a["rng"]["sampler"], b["rng"]["sampler"])


def test_a_finished_run_prints_its_result_and_exits(tmp_path, capsys):
    train(compose(QUICK), tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    train(compose(QUICK), tmp_path)
    assert "run already finished at meta-step 4: test MSE" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_from_a_given_checkpoint_into_a_new_run(tmp_path):
    train(compose(QUICK), tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.pt"
    train(compose(QUICK + ["train.meta_steps=6", f"train.resume={checkpoint}"]), tmp_path / "second")
    # The 2 further steps continue exactly where the first run stopped: a straight 6-step run.
    train(compose(QUICK + ["train.meta_steps=6"]), tmp_path / "straight")
    assert_same_state(final_state(tmp_path / "second"), final_state(tmp_path / "straight"))
    assert final_state(tmp_path / "second")["step"] == 6
    second, straight = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("second", "straight"))
    assert (second["best_val"], second["best_step"]) == (straight["best_val"], straight["best_step"])
    assert second["test"]["per_episode"] == straight["test"]["per_episode"]
    with pytest.raises(UserError, match="trained with dataset.name='sinusoid'"):
        train(compose(["train.meta_steps=6", f"train.resume={checkpoint}"]), tmp_path / "third")


@pytest.mark.parametrize("resume_from", ["best", "last", "lone"])
def test_a_run_continued_in_a_new_folder_tests_the_checkpoint_its_best_score_belongs_to(tmp_path, resume_from):
    """The first run's best validation is made unbeatable (MSE 0), so the continued run's score stays
    that one: its test must then use the first run's best state, whether that is the state resumed
    from (best.pt) or the best.pt beside the last.pt resumed from. A checkpoint alone, without its
    best.pt, cannot vouch for a best: the continued run counts its own."""
    train(compose(QUICK + ["train.meta_steps=3"]), tmp_path / "first")  # validated at 2, stopped at 3
    first = tmp_path / "first" / "checkpoints"
    source = tmp_path / "source" / "checkpoints"
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(first / name)
        save_checkpoint({**state, "best_score": 0.0}, source / name)
    if resume_from == "lone":
        (source / "best.pt").unlink()
    best_state = load_checkpoint(first / "best.pt")
    resume = source / ("best.pt" if resume_from == "best" else "last.pt")
    train(compose(QUICK + ["train.meta_steps=8", "train.val_every=2", f"train.resume={resume}"]), tmp_path / "second")
    result = json.loads((tmp_path / "second" / "results.json").read_text())
    assert result["checkpoint"] == "best"
    kept = load_checkpoint(tmp_path / "second" / "checkpoints" / "best.pt")
    # The continued run's own config (meta_steps 8) in whichever best.pt it keeps.
    assert "meta_steps: 8" in kept["config"]
    if resume_from == "lone":
        assert result["best_step"] > 3 and result["best_val"] > 0 and kept["step"] == result["best_step"]
    else:
        assert (result["best_val"], result["best_step"]) == (0.0, best_state["step"])
        assert kept["step"] == best_state["step"]
        for k in best_state["params"]:
            assert torch.equal(kept["params"][k], best_state["params"][k]), k


def test_a_run_directory_with_other_settings_is_refused(tmp_path):
    train(compose(QUICK), tmp_path)
    with pytest.raises(UserError, match=r"holds a run with other settings \(algorithm.lam\)"):
        train(compose(QUICK + ["algorithm.lam=0.5"]), tmp_path)
    # A speed-only setting may change between sittings: the run continues.
    train(compose(QUICK + ["train.meta_steps=5", "perf.task_groups=1"]), tmp_path)
    assert final_state(tmp_path)["step"] == 5


def test_checkpoints_load_with_plain_weights_only_torch_load(tmp_path):
    train(compose(QUICK), tmp_path)
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"params", "optimizer", "step", "rng", "config"} <= set(state)
        assert "algorithm:" in state["config"]


def digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One quick run through the installed console script, shared by the CLI tests below."""
    folder = tmp_path_factory.mktemp("cli")
    result = run_cli("imaml-train", *QUICK, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result


def test_train_cli_prints_the_result_line(finished_run):
    folder, result = finished_run
    assert "test MSE" in result.stdout and "95% CI, 8 episodes, 10-shot" in result.stdout
    assert (folder / "run" / ".hydra" / "config.yaml").exists()
    assert (folder / "run" / "train.log").read_text().count("val MSE") == 2


def evaluate_in_process(overrides: list[str], run_dir: Path):
    """imaml-eval's work in this process, with the learner it built and the scores it computed."""
    from imaml_cli.engine import evaluation_run

    learners, built = returned_values(components, "build_learner")
    results, evaluated = returned_values(evaluation_run, "evaluate")
    with learners, results:
        mean = evaluation_run.evaluate_checkpoint(compose(overrides, config_name="eval"), overrides, run_dir)
    (learner,), (result,) = built, evaluated
    assert mean == result.mean
    return learner, result


def test_eval_cli_with_overrides_writes_json(finished_run, tmp_path):
    folder, _ = finished_run
    checkpoint = folder / "run" / "checkpoints" / "best.pt"
    overrides = [f"checkpoint={checkpoint}", "eval.episodes=12", "inner_solver.steps=3", "eval.split=val"]
    result = run_cli("imaml-eval", *overrides, f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val MSE" in result.stdout and "12 episodes" in result.stdout
    report = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert report["episodes"] == 12 and len(report["per_episode"]) == 12 and report["split"] == "val"
    assert "inner_solver.steps=3" in report["overrides"]
    # The overrides reached the learner and the evaluation, and the command computed what they say.
    learner, scores = evaluate_in_process(overrides, tmp_path / "in_process")
    stored = load_checkpoint(checkpoint)["config"]
    assert "steps: 2" in stored and learner.inner.steps == 3
    assert (scores.split, scores.episodes) == ("val", 12)
    assert report["per_episode"] == pytest.approx(scores.per_episode, rel=0, abs=0)


def test_eval_of_a_checkpoint_that_predates_a_setting_uses_its_default(finished_run, tmp_path):
    folder, _ = finished_run
    state = load_checkpoint(folder / "run" / "checkpoints" / "best.pt")
    assert "  backtrack: true\n" in state["config"] and "  alternate_query: true\n" in state["config"]
    # alternate_query (meta-training only) and task_groups (speed only) change nothing here: no warning.
    for line in ("  backtrack: true\n", "  alternate_query: true\n", "  task_groups: auto\n"):
        assert line in state["config"]
        state["config"] = state["config"].replace(line, "")
    old = tmp_path / "old.pt"
    save_checkpoint(state, old)
    overrides = [f"checkpoint={old}", "eval.episodes=4", "inner_solver.backtrack=false"]
    result = run_cli("imaml-eval", *overrides, f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "predates inner_solver.backtrack; using today's defaults: inner_solver.backtrack=" in printed
    assert "alternate_query" not in printed and "task_groups" not in printed
    assert "inner_solver.backtrack=false" in json.loads((tmp_path / "cli" / "eval.json").read_text())["overrides"]
    # Without the override the missing setting takes today's default (true); with it, false.
    learner, _ = evaluate_in_process(overrides, tmp_path / "in_process")
    assert learner.inner.backtrack is False
    learner, _ = evaluate_in_process(overrides[:2], tmp_path / "default")
    assert learner.inner.backtrack is True


@pytest.mark.parametrize("args, message", [
    (["checkpoint=/nonexistent/last.pt"], "checkpoint /nonexistent/last.pt does not exist"),
    ([], "no checkpoint given; run imaml-eval checkpoint="),
    (["checkpoint={run}/train.log"], "train.log cannot be read as a checkpoint: it is not a file that torch.save wrote"),
    (["checkpoint={run}/checkpoints/best.pt", "dataset.ways=7", "experiment=omniglot_5w1s"],
     "experiment=... cannot change at evaluation"),
])
def test_eval_cli_bad_input(finished_run, tmp_path, args, message):
    folder, _ = finished_run
    args = [a.format(run=folder / "run") for a in args]
    result = run_cli("imaml-eval", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_of_an_incompatible_config_is_refused(tmp_path):
    train(compose(QUICK), tmp_path / "run")
    from imaml_cli.engine.evaluation_run import evaluate_checkpoint

    cfg = compose(["experiment=omniglot_5w1s", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"],
                  config_name="eval")
    with pytest.raises(UserError, match="built for omniglot inputs|ways"):
        evaluate_checkpoint(cfg, ["model=omniglot_conv", "dataset=omniglot"], tmp_path)


@pytest.mark.parametrize("args, message", [
    (["dataset.ways=1", "experiment=omniglot_5w1s"], "dataset.ways=1 is invalid"),
    (["algorithm.lam=0"], "algorithm.lam=0 is invalid"),
    (["device=cuda"], "device=cuda but no CUDA device is available"),
    (["train.resume=/nonexistent.pt", "hydra.run.dir={new}"], "checkpoint /nonexistent.pt does not exist"),
])
def test_train_cli_refuses_bad_input_and_keeps_the_existing_run(finished_run, tmp_path, args, message):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    folder, _ = finished_run
    before = digest(folder / "run")
    args = [a.format(new=tmp_path / "new") for a in args]
    result = run_cli("imaml-train", *QUICK, f"hydra.run.dir={folder / 'run'}", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert digest(folder / "run") == before


@pytest.fixture(scope="module")
def two_job_sweep(tmp_path_factory):
    """A two-job sweep through the console script; a Hydra callback records what each job returned
    to the sweeper."""
    folder = tmp_path_factory.mktemp("sweep")
    returned = folder / "returned.jsonl"
    result = run_cli("imaml-train", "-m", *QUICK, "algorithm.lam=0.5,1.0", f"hydra.sweep.dir={folder / 'sweep'}",
                     "+hydra.callbacks.record._target_=hydra_callbacks.RecordReturnValue",
                     f"+hydra.callbacks.record.path={returned}", cwd=folder,
                     env={"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    return folder / "sweep", [json.loads(line) for line in returned.read_text().splitlines()]


def test_two_job_sweep_with_the_basic_launcher(two_job_sweep):
    sweep, _ = two_job_sweep
    for job in ("0", "1"):
        assert json.loads((sweep / job / "results.json").read_text())["meta_steps"] == 4
    lams = [load_checkpoint(sweep / j / "checkpoints" / "last.pt")["config"] for j in ("0", "1")]
    assert "lam: 0.5" in lams[0] and "lam: 1.0" in lams[1]


def test_sweep_returns_the_validation_score(two_job_sweep):
    sweep, returned = two_job_sweep
    assert sorted(r["job"] for r in returned) == [0, 1]
    for r in returned:
        results = json.loads((sweep / str(r["job"]) / "results.json").read_text())
        assert r["value"] == results["best_val"] == results["score"] and isinstance(r["value"], float)


def test_regular_install_finds_its_configs_from_any_folder(tmp_path):
    """A non-editable install (a wheel into a separate folder) composes from an unrelated cwd."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    assert (target / "imaml_cli" / "conf" / "experiment" / "omniglot_20w1s.yaml").exists()
    assert (target / "imaml_cli" / "data" / "splits").is_dir()
    code = ("import sys; sys.argv = ['imaml-train', 'experiment=omniglot_20w1s', '--cfg', 'job'];"
            "from imaml_cli.train import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    # The preset's own values (the default experiment has 5 ways and 16 GD steps).
    assert "ways: 20" in result.stdout and "  gd: 25" in result.stdout
    assert str(target) in subprocess.run(
        [sys.executable, "-c", "import imaml_cli; print(imaml_cli.__file__)"], cwd=tmp_path, capture_output=True,
        text=True, env={"PYTHONPATH": str(target)}).stdout


def test_console_script_help_from_another_folder(tmp_path):
    result = run_cli("imaml-train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The help lists the packaged presets, so the script found its configs from an unrelated folder.
    experiments = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert len(experiments) >= 7 and all(name in result.stdout for name in experiments), result.stdout
