"""What a new user and a crowded machine run into (issue 15), through the installed scripts.

Wrong data roots, run directories that cannot be written or are already in use, refused commands
that must leave nothing behind, imaml-eval's record, slips on the command line, sweeps, a cluster's
preemption signal, and validation/test episodes that must differ from each other.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import BIN, QUICK, compose, run_cli
from imaml_cli.config import validate
from imaml_cli import run_dir_guard
from imaml_cli.data import image_folder, make_episode_source, omniglot
from imaml_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from imaml_cli.engine.components import build_network
from imaml_cli.engine.run_lock import RunLock

# Trains until stopped; no checkpoint unless a signal asks for one.
ENDLESS = QUICK + ["train.meta_steps=100000", "train.val_every=0", "train.checkpoint_every=100000"]


def one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


def files(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def wait_for(condition, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def start(args, cwd: Path, script=("imaml-train",)) -> subprocess.Popen:
    return subprocess.Popen([*(str(BIN / s) if s.startswith("imaml") else s for s in script), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def training(run: Path) -> bool:
    """The loop runs: TensorBoard's event file is made as it starts, once its stop handlers are in place."""
    return any(run.glob("tb/events.out.tfevents.*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    result = run_cli("imaml-train", *QUICK, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "run", result


@pytest.fixture(scope="module")
def evaluations(finished, tmp_path_factory):
    """imaml-eval of the best checkpoint on the validation and on the test episodes."""
    run, _ = finished
    folder = tmp_path_factory.mktemp("evaluations")
    results = {}
    for split in ("val", "test"):
        results[split] = run_cli("imaml-eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}", f"eval.split={split}",
                                 "eval.episodes=8", f"hydra.run.dir={folder / split}", cwd=folder)
        assert results[split].returncode == 0, results[split].stderr
    return folder, results


@pytest.fixture
def omniglot_checkpoint(tmp_path) -> Path:
    """A parameters-only Omniglot checkpoint: enough for imaml-eval to get as far as the data."""
    config = validate(compose(["experiment=omniglot_5w1s"]))
    network = build_network(config, torch.device("cpu"))
    path = tmp_path / "omniglot.pt"
    save_checkpoint({"step": 0, "params": {k: v.detach() for k, v in network.named_parameters()},
                     "config": OmegaConf.to_yaml(OmegaConf.create(config))}, path)
    return path


# 1. Each split its own tasks.

def test_sinusoid_splits_share_no_task():
    sources = {s: make_episode_source("sinusoid", s, root=None, ways=1, shots=5, queries=5, device="cpu")
               for s in ("train", "val", "test")}
    batches = {s: source.sample(50, torch.Generator().manual_seed(0)) for s, source in sources.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        same = (batches[a].support_x[:, None] == batches[b].support_x[None]).all(-1).all(-1)
        assert not same.any(), (a, b)
    # Seeded, and a task does not depend on how many are drawn at once.
    again = sources["val"].sample(20, torch.Generator().manual_seed(0))
    assert torch.equal(again.query_y, batches["val"].query_y[:20])


def test_eval_on_val_and_on_test_are_different_episodes(evaluations):
    _, results = evaluations
    val = json.loads((evaluations[0] / "val" / "eval.json").read_text())
    test = json.loads((evaluations[0] / "test" / "eval.json").read_text())
    assert (val["split"], test["split"]) == ("val", "test")
    assert val["per_episode"] != test["per_episode"] and val["mean"] != test["mean"]


# 2. A wrong data root: one line, and nothing written.

def test_a_zip_given_as_the_data_root_is_refused_without_writing(tmp_path, cache_dir):
    data = tmp_path / "omniglot"
    data.mkdir()
    (data / "images_background.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    before = files(data)
    result = run_cli("imaml-train", "experiment=omniglot_5w1s", f"dataset.root={data / 'images_background.zip'}",
                     "train.progress=false", cwd=tmp_path)
    one_line_error(result, "images_background.zip is a file", f"(such as {data})")
    assert files(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omniglot"]


def test_eval_with_a_missing_data_root_does_not_create_it(tmp_path, cache_dir, omniglot_checkpoint):
    result = run_cli("imaml-eval", f"checkpoint={omniglot_checkpoint}", f"dataset.root={tmp_path / 'nowhere'}",
                     cwd=tmp_path)
    one_line_error(result, f"dataset.root={tmp_path / 'nowhere'}, which does not exist, so nothing is downloaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omniglot.pt"]


# 3. imaml-eval checkpoint=RUN_DIR.

def test_eval_of_a_run_directory_takes_its_best_else_its_last_checkpoint_and_says_which(finished, tmp_path):
    run, _ = finished
    result = run_cli("imaml-eval", f"checkpoint={run}", "eval.episodes=4", f"hydra.run.dir={tmp_path / 'best'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"evaluating {run / 'checkpoints' / 'best.pt'}, the best validation checkpoint" in result.stdout
    assert json.loads((tmp_path / "best" / "eval.json").read_text())["checkpoint"] == str(run / "checkpoints" / "best.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints")
    result = run_cli("imaml-eval", f"checkpoint={tmp_path / 'run'}", "eval.episodes=4",
                     f"hydra.run.dir={tmp_path / 'last'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"evaluating {tmp_path / 'run' / 'checkpoints' / 'last.pt'}, the last checkpoint" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli("imaml-eval", f"checkpoint={empty}", cwd=tmp_path),
                   "is a folder without checkpoints/best.pt or checkpoints/last.pt")


# 4. An unwritable run directory.

@pytest.mark.parametrize("script", ["imaml-train", "imaml-eval"])
def test_an_unwritable_run_directory_is_one_line(tmp_path, script):
    (tmp_path / "a_file").write_text("")
    for folder in ("/proc/imaml-run", tmp_path / "a_file" / "run"):
        result = run_cli(script, "checkpoint=x.pt" if script == "imaml-eval" else "experiment=sinusoid",
                         f"hydra.run.dir={folder}", cwd=tmp_path)
        one_line_error(result, f"{folder}", "choose")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# 5. A command that does no work changes nothing on disk.

@pytest.mark.parametrize("args", [["algorithm.lam=0"], ["train.resume=/nonexistent.pt"]],
                         ids=["validation", "missing-resume-file"])
def test_a_refused_start_leaves_no_run_directory(tmp_path, args):
    result = run_cli("imaml-train", *QUICK, *args, cwd=tmp_path)
    one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_command_leaves_an_existing_run_as_it_was(finished, tmp_path):
    run, _ = finished
    before = files(run)
    result = run_cli("imaml-train", *QUICK, "algorithm.lam=0.5", f"hydra.run.dir={run}", cwd=tmp_path)
    one_line_error(result, "holds a run with other settings (algorithm.lam)")
    assert files(run) == before
    assert list(tmp_path.iterdir()) == []


# 6. imaml-eval's record of what it did.

def test_eval_records_the_config_it_ran_with_and_logs_the_result(finished, evaluations):
    run, _ = finished
    folder, results = evaluations
    used = OmegaConf.load(folder / "val" / ".hydra" / "config.yaml")
    assert used.dataset.name == "sinusoid" and used.model.name == "sinusoid_mlp"
    assert used.eval.split == "val" and used.eval.episodes == 8
    assert used.checkpoint == str(run / "checkpoints" / "best.pt")
    result_line = next(line for line in results["val"].stdout.splitlines() if line.startswith("val MSE"))
    assert result_line in (folder / "val" / "evaluate.log").read_text()


# 7. Smaller frictions.

def test_the_result_line_is_printed_once(finished, evaluations):
    _, trained = finished
    _, results = evaluations
    assert trained.stdout.count("test MSE") == 1
    assert results["test"].stdout.count("test MSE") == 1 and results["val"].stdout.count("val MSE") == 1


@pytest.mark.parametrize("script, args, message", [
    ("imaml-train", ["train.metasteps=5"], "unknown config key 'train.metasteps'; did you mean train.meta_steps?"),
    ("imaml-eval", ["checkpoint=x.pt", "eval.episdoes=5"], "unknown config key 'eval.episdoes'; did you mean "
                                                         "eval.episodes?"),
    ("imaml-train", ["algorithm=imal"], "algorithm=imal is not an option; choose algorithm= one of fomaml, imaml, "
                                        "maml, reptile"),
    ("imaml-train", ["-m", "algorithm=imaml,imal"], "algorithm=imal is not an option"),
])
def test_slips_on_the_command_line_get_one_line_with_the_fix(tmp_path, script, args, message):
    result = run_cli(script, *args, cwd=tmp_path)
    one_line_error(result, message)
    assert "+train" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_configs_from_elsewhere_are_left_to_hydra(tmp_path):
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "my_exp.yaml").write_text("# @package _global_\ndefaults:\n  - sinusoid\n"
                                                     "train:\n  meta_steps: 7\n")
    one_line_error(run_cli("imaml-train", "experiment=my_exp", cwd=tmp_path), "experiment=my_exp is not an option")
    for where in (["-cd", str(conf)], [f"--config-dir={conf}"], [f"hydra.searchpath=[file://{conf}]"]):
        result = run_cli("imaml-train", *where, "experiment=my_exp", "--cfg", "job", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shown = OmegaConf.create(result.stdout)
        assert shown.train.meta_steps == 7 and shown.dataset.name == "sinusoid"


def test_a_sweep_ends_with_a_summary(tmp_path):
    result = run_cli("imaml-train", "-m", *QUICK, "train.meta_steps=2", "algorithm.lam=0.5,1.0",
                     f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    scores = {Path(job["folder"]).name: job["score"] for job in summary["jobs"]}
    assert scores == {job: json.loads((tmp_path / job / "results.json").read_text())["score"] for job in ("0", "1")}
    best = min(scores, key=scores.get)  # validation MSE
    assert summary["best"]["folder"] == str(tmp_path / best)
    printed = result.stdout[result.stdout.index("sweep summary:"):].splitlines()
    assert printed[1].startswith("0: algorithm.lam=0.5: val MSE") and printed[2].startswith("1: algorithm.lam=1.0")
    assert printed[3] == f"best: {tmp_path / best}"


def test_the_dataset_cache_is_keyed_on_the_resolved_root(tmp_path, monkeypatch):
    from test_data_omniglot import TINY_SPLIT, make_zips

    real = make_zips(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    builds = []
    build = omniglot._build
    monkeypatch.setattr(omniglot, "_build", lambda *a: builds.append(a) or build(*a))
    for spelling in (real, tmp_path / "link", tmp_path / "link" / ".." / "real"):
        omniglot.load_omniglot(spelling, "tiny", cache_dir=tmp_path / "cache", characters=TINY_SPLIT)
    assert len(builds) == 2  # the two archives, once
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_the_image_folder_cache_is_keyed_on_the_resolved_root(tmp_path, monkeypatch):
    from test_image_folder import load, split_folders

    split_folders(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    builds = []
    build = image_folder._build
    monkeypatch.setattr(image_folder, "_build", lambda *a: builds.append(a) or build(*a))
    monkeypatch.chdir(tmp_path)
    for spelling in (tmp_path / "link", tmp_path / "real", "link", "real", tmp_path / "link" / ".." / "real"):
        load(spelling, "train", cache_dir=tmp_path / "cache")
    assert len(builds) == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1


# 8. One command at a time in a run directory.

def test_a_second_command_in_a_busy_run_directory_stops_and_a_killed_one_does_not_block(tmp_path):
    run = tmp_path / "run"
    first = start([*ENDLESS, f"hydra.run.dir={run}"], tmp_path)
    try:
        wait_for(lambda: training(run), first)
        before = files(run / ".hydra")
        second = run_cli("imaml-train", *ENDLESS, f"hydra.run.dir={run}", cwd=tmp_path, timeout=60)
        one_line_error(second, f"run directory {run} is in use by process {first.pid} on ")
        assert files(run / ".hydra") == before
        first.kill()  # SIGKILL: no chance to clean up; the kernel drops the lock
        first.wait()
    finally:
        first.kill()
    third = run_cli("imaml-train", *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.parametrize("other_locks", ["before this one makes the folder", "after this one made it"])
def test_a_command_refused_by_a_busy_folder_removes_nothing_of_the_owners(tmp_path, monkeypatch, capsys, other_locks):
    """Two commands start on the same new folder at once and the other takes the lock first."""
    folder = tmp_path / "new" / "run"
    others = []

    def other_command():
        folder.mkdir(parents=True, exist_ok=True)
        others.append(RunLock(folder))
        others[0].acquire()  # another open file: flock refuses this process too
        (folder / "train.log").write_text("the other's log\n")

    def interleaved(path, key, make=run_dir_guard.make_folder):
        if other_locks.startswith("before"):
            other_command()
        made = make(path, key)
        if other_locks.startswith("after"):
            other_command()
        return made

    monkeypatch.setattr(run_dir_guard, "make_folder", interleaved)
    config = OmegaConf.create({"hydra": {"run": {"dir": str(folder)}, "output_subdir": ".hydra"}})
    try:
        with pytest.raises(SystemExit):
            run_dir_guard.RunDirGuard().on_run_start(config)
        assert f"run directory {folder} is in use by process {os.getpid()}" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "train.log"]
        assert (folder / "train.log").read_text() == "the other's log\n"
        assert (folder / ".lock").read_text().startswith(f"process {os.getpid()} on ")
    finally:
        others[0].release()


def test_a_sweep_started_on_a_busy_sweep_directory_writes_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    owner = RunLock(sweep)
    owner.acquire()
    try:
        before = files(sweep)
        result = run_cli("imaml-train", "-m", *QUICK, "algorithm.lam=0.5,1.0", f"hydra.sweep.dir={sweep}",
                         cwd=tmp_path)
        one_line_error(result, f"sweep directory {sweep} is in use by process {os.getpid()} on ",
                       "or choose another hydra.sweep.dir")
        assert files(sweep) == before
    finally:
        owner.release()


def test_under_torchrun_rank_0_holds_the_run_directory(tmp_path):
    run = tmp_path / "run"
    with tempfile.TemporaryDirectory() as scratch:  # torchrun leaves a log folder in $TMPDIR
        group = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "imaml_cli.train",
                                  *ENDLESS, f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": scratch})
        try:
            wait_for(lambda: training(run), group, timeout=240)
            other = run_cli("imaml-train", *ENDLESS, f"hydra.run.dir={run}", cwd=tmp_path, timeout=60)
            one_line_error(other, "is in use by process")
            pid = int(other.stderr.split("in use by process ")[1].split()[0])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"RANK=0" in environ and b"WORLD_SIZE=2" in environ
        finally:
            group.send_signal(signal.SIGTERM)
            group.communicate(timeout=120)
    # Rank 1 took no lock and made no folder of its own.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# 9. SLURM preemption: submitit's SIGUSR2.

def test_sigusr2_saves_a_checkpoint_and_stops(tmp_path):
    run = tmp_path / "run"
    process = start([*ENDLESS, f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: training(run), process)
    process.send_signal(signal.SIGUSR2)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, stderr
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert f"SIGUSR2 at meta-step {step}: checkpoint saved" in stderr and step >= 1


def test_sigusr2_hands_over_to_submitits_handler_after_the_checkpoint(tmp_path):
    """submitit installs its handler before the job runs; it requeues the job and exits 0."""
    run = tmp_path / "run"
    code = ("import signal, sys\n"
            "from pathlib import Path\n"
            "def requeue(signum, frame):\n"
            "    print('requeued with', Path(sys.argv[-1].split('=')[1], 'checkpoints', 'last.pt').exists())\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGUSR2, requeue)\n"
            "from imaml_cli.train import main\n"
            "main()\n")
    process = start(["-c", code, *ENDLESS, f"hydra.run.dir={run}"], tmp_path, script=(sys.executable,))
    wait_for(lambda: training(run), process)
    process.send_signal(signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "requeued with True" in stdout
