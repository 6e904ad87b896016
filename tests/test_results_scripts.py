"""The results pipeline: a run published to pretrained/, imaml-eval reproducing its row, fine-tuning
from it, and the README's table generated from pretrained/results.json."""

import json
import math
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import REAL_OMNIGLOT, REPO, run_cli
from test_data_miniimagenet import make_folder_layout

sys.path.insert(0, str(REPO / "scripts"))
import results_table  # noqa: E402

# Flat-colour images in Mini-ImageNet's split-folder layout: a real classification run in seconds.
TINY = ["experiment=miniimagenet_5w1s", "dataset.ways=2", "dataset.queries=1", "dataset.download=false",
        "train.meta_steps=2", "train.meta_batch_size=2", "train.val_every=1", "train.val_episodes=4",
        "train.checkpoint_every=1", "train.progress=false", "inner_steps.gd=2", "cg.steps=2",
        "eval.episodes=6", "eval.batch_size=3"]


def script(name: str, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny finished run, published into a pretrained/ folder of its own."""
    tmp = tmp_path_factory.mktemp("publish")
    root = tmp / "mini"
    for split in ("train", "val", "test"):
        make_folder_layout(root, split)
    done = run_cli("imaml-train", *TINY, f"dataset.root={root}", f"dataset.cache_dir={tmp / 'cache'}",
                   f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    out = tmp / "pretrained"
    done = script("publish_pretrained.py", tmp / "run", "--name", "tiny", "--out", out,
                  "--test-time", "eval.inner_steps=1 eval.episodes=3")
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())
    return tmp, out, rows


def test_a_published_row_has_every_field_and_a_small_parameters_only_file(published):
    tmp, out, rows = published
    assert len(rows) == 1
    row = rows[0]
    assert {"dataset", "ways", "shots", "algorithm", "inner_solver", "meta_steps", "queries", "episodes",
            "test_accuracy", "ci95", "checkpoint", "command", "hardware", "wall_clock_s"} <= set(row)
    assert (row["dataset"], row["ways"], row["shots"], row["algorithm"], row["inner_solver"]) == (
        "miniimagenet", 2, 1, "imaml", "gd")
    assert (row["meta_steps"], row["queries"], row["episodes"]) == (2, 1, 6)
    # The command is the one that trained it, less the run folder it had on that machine.
    assert row["command"].startswith("imaml-train experiment=miniimagenet_5w1s dataset.ways=2")
    assert "hydra.run.dir" not in row["command"]
    state = torch.load(out / "tiny.pt", weights_only=True)
    assert "optimizer" not in state and set(state["params"]) and (out / "tiny.pt").stat().st_size < 1 << 20


def test_a_published_row_keeps_its_validation_curve_as_the_run_logged_it(published):
    tmp, _, rows = published
    logged = re.findall(r"meta-step (\d+): val accuracy ([0-9.]+)%", (tmp / "run" / "train.log").read_text())
    curve = rows[0]["validation"]
    assert curve["metric"] == "val/accuracy" and curve["steps"] == [int(step) for step, _ in logged] == [1, 2]
    assert curve["values"] == pytest.approx([float(value) for _, value in logged], abs=0.006)
    assert 0 < curve["train_seconds"][0] < curve["train_seconds"][1]


def test_imaml_eval_of_the_published_file_prints_the_rows_accuracy(published):
    tmp, out, rows = published
    done = run_cli("imaml-eval", f"checkpoint={out / 'tiny.pt'}", f"hydra.run.dir={tmp / 'eval'}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    printed = float(re.search(r"test accuracy ([0-9.]+)%", done.stdout).group(1))
    assert printed == rows[0]["test_accuracy"]


def test_a_test_time_setting_is_the_published_file_evaluated_with_those_overrides(published):
    tmp, out, rows = published
    (other,) = rows[0]["test_time"]
    done = run_cli("imaml-eval", f"checkpoint={out / 'tiny.pt'}", "eval.inner_steps=1", "eval.episodes=3",
                   f"hydra.run.dir={tmp / 'eval_other'}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"test accuracy ([0-9.]+)% ± ([0-9.]+) \(95% CI, (\d+) episodes", done.stdout)
    assert (other["overrides"], other["episodes"]) == ("eval.inner_steps=1 eval.episodes=3", 3)
    assert (other["test_accuracy"], other["ci95"]) == (float(printed.group(1)), float(printed.group(2)))
    assert int(printed.group(3)) == 3


def test_fine_tuning_from_a_published_file_starts_at_step_zero_with_its_parameters(published):
    tmp, out, _ = published
    done = run_cli("imaml-train", *TINY, "train.meta_steps=1", "train.val_every=0", f"train.resume={out / 'tiny.pt'}",
                   f"dataset.root={tmp / 'mini'}", f"dataset.cache_dir={tmp / 'cache'}",
                   f"hydra.run.dir={tmp / 'finetune'}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp / "finetune" / "results.json").read_text())["meta_steps"] == 1
    pretrained = torch.load(out / "tiny.pt", weights_only=True)["params"]
    tuned = torch.load(tmp / "finetune" / "checkpoints" / "last.pt", weights_only=True)
    # One Adam step from the published θ moves each tensor by about lr = 1e-3 at most.
    for name, value in pretrained.items():
        assert (tuned["params"][name] - value).abs().max() <= 1.1e-3
    assert tuned["optimizer"]["state"][0]["step"].item() == 1


def test_a_run_that_has_not_finished_is_refused_in_one_line(tmp_path):
    done = script("publish_pretrained.py", tmp_path, "--name", "x", "--out", tmp_path / "pretrained")
    assert done.returncode != 0 and "has not finished" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "pretrained").exists()


def test_the_table_shows_a_measured_row_and_names_the_missing_ones():
    row = {"dataset": "omniglot", "ways": 5, "shots": 1, "algorithm": "imaml", "inner_solver": "hf",
           "meta_steps": 1000, "checkpoint_step": 700, "meta_batch_size": 32, "queries": 1, "episodes": 600, "test_accuracy": 97.12,
           "ci95": 0.5, "checkpoint": "pretrained/x.pt", "hardware": "a CPU", "wall_clock_s": 5400,
           "test_time": [{"overrides": "inner_solver.tol=0.05", "test_accuracy": 97.3, "ci95": 0.45}]}
    lines = results_table.render([row]).splitlines()
    assert len(lines) == 2 + 4 * 5  # header, rule, every setting x algorithm of the paper's Table 2
    hf = next(line for line in lines if line.startswith("| 5-way 1-shot | iMAML-HF |"))
    assert "**97.12** ± 0.50; with `inner_solver.tol=0.05`: 97.30 ± 0.45 |" in hf and "1,000 meta-steps × 32 tasks (5% of the paper's), 1 h 30 min of meta-training on a CPU" in hf
    assert "| 99.50 ± 0.26 |" in hf and "| [x.pt](pretrained/x.pt), meta-step 700 |" in hf
    gd = next(line for line in lines if line.startswith("| 5-way 1-shot | iMAML-GD |"))
    assert "not measured" in gd and "omniglot_paper_runs.sh 5w1s_imaml_gd" in gd
    twenty = next(line for line in lines if line.startswith("| 20-way 5-shot | Reptile |"))
    assert "not measured" in twenty and "| 97.12 ± 0.32 |" in twenty


def test_the_readme_table_is_the_one_results_json_gives():
    done = script("results_table.py", "--check")
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not REAL_OMNIGLOT.is_dir(), reason="needs the real Omniglot in ../shared/data/omniglot")
def test_the_readmes_pretrained_command_reproduces_its_row_as_written(tmp_path, real_omniglot_cache):
    """The README's command, pasted into a clone that has the zips where the README says: data/omniglot."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("imaml-eval checkpoint=pretrained/")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    clone = tmp_path / "clone"
    (clone / "data").mkdir(parents=True)
    (clone / "pretrained").symlink_to(REPO / "pretrained")
    (clone / "data" / "omniglot").symlink_to(REAL_OMNIGLOT)
    done = run_cli(*args, cwd=clone, timeout=900, env={"IMAML_CACHE_DIR": str(real_omniglot_cache)})
    assert done.returncode == 0, done.stderr
    checkpoint = next(a.split("=", 1)[1] for a in args if a.startswith("checkpoint="))
    row = next(r for r in json.loads((REPO / "pretrained" / "results.json").read_text()) if r["checkpoint"] == checkpoint)
    assert float(re.search(r"test accuracy ([0-9.]+)%", done.stdout).group(1)) == row["test_accuracy"]


@pytest.mark.parametrize("where", [[], ["--init"]])
def test_the_inner_solver_diagnostics_run_on_a_checkpoint(published, where):
    tmp, _, _ = published
    done = script("inner_solver_convergence.py", tmp / "run" / "checkpoints" / "last.pt", "--tasks", "2",
                  "--gd", "2", "--hf", "1", "--power-iterations", "2", *where, cwd=tmp)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| GD") or line.startswith("| HF")]
    assert [row[0].split(",")[0].strip() for row in rows] == ["GD", "HF"]
    assert ("initialisation" in done.stdout) == bool(where)
    numbers = [float(x.strip().rstrip("%")) for row in rows for cell in row[1:] for x in cell.split(",")]
    assert all(math.isfinite(x) for x in numbers)
    assert float(rows[0][-1]) == 1.0  # the first solver's meta-gradient against itself


def test_the_inner_solver_diagnostics_take_a_tolerance_as_training_does(published):
    """With ``--set inner_solver.tol`` above any gradient, GD stops at θ: its row is GD with no step."""
    tmp, _, _ = published

    def gd_rows(*extra):
        done = script("inner_solver_convergence.py", tmp / "run" / "checkpoints" / "last.pt", "--tasks", "2",
                      "--hf", "--power-iterations", "2", *extra, cwd=tmp)
        assert done.returncode == 0, done.stderr
        return [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| GD")]

    (stopped,) = gd_rows("--gd", "5", "--set", "inner_solver.tol=1e9")
    at_theta, five_steps = gd_rows("--gd", "1", "5")
    assert "to ‖∇G‖ ≤ 1000000000.0" in stopped[0]
    assert stopped[1:3] == at_theta[1:3] != five_steps[1:3]  # proximal objective and ‖∇G(φ)‖
