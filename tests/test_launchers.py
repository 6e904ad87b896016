"""Cluster recipes: Hydra's launcher plugins compose with our configs, and the sbatch script's command."""

import json
import os
import subprocess

import pytest

from conftest import QUICK, REPO, run_cli
from imaml_cli.engine.checkpoint import load_checkpoint

SBATCH = REPO / "scripts" / "slurm" / "train_multinode.sbatch"

# The README's SLURM sweep, less the sweep itself.
SLURM_RECIPE = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=32", "hydra.launcher.timeout_min=1440"]


def compose_with_hydra(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("imaml_cli.conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_the_slurm_recipe_composes_and_builds_its_launcher():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate

    cfg = compose_with_hydra(SLURM_RECIPE + ["experiment=omniglot_20w1s", "algorithm.lam=0.5"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 1, 1, 1)
    assert instantiate(launcher).params["timeout_min"] == 1440
    assert cfg.dataset.ways == 20


def test_the_joblib_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_with_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_two_job_sweep_with_the_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # Each job runs in its own process, as on a cluster, and returns its score to the sweep.
    result = run_cli("imaml-train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *QUICK,
                     "algorithm.lam=0.5,1.0", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lam in (("0", 0.5), ("1", 1.0)):
        assert json.loads((tmp_path / job / "results.json").read_text())["meta_steps"] == 4
        assert f"lam: {lam}" in load_checkpoint(tmp_path / job / "checkpoints" / "last.pt")["config"]
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2


def test_the_sbatch_script_starts_one_torchrun_per_node(tmp_path):
    """Dry run: fake srun and scontrol print what SLURM would run."""
    (tmp_path / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (tmp_path / "scontrol").write_text('#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n')
    for tool in ("srun", "scontrol"):
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "imaml"}
    result = subprocess.run(["bash", str(SBATCH), "experiment=miniimagenet_5w1s", "hydra.run.dir=runs/mini"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    for expected in ("--nnodes=2", "--nproc_per_node=gpu", "--rdzv_id=4242", "--rdzv_backend=c10d",
                     "--rdzv_endpoint=gpu-node-07:29500"):
        assert expected in args
    # The default run directory comes first, so that the user's hydra.run.dir (Hydra: last one wins) replaces it.
    assert args[args.index("-m"):] == ["-m", "imaml_cli.train", "hydra.run.dir=outputs/slurm/imaml-4242",
                                       "experiment=miniimagenet_5w1s", "hydra.run.dir=runs/mini"]
