"""scripts/carry_runs.sh: a run saved into runs-in-progress/ and restored elsewhere comes back file
for file, a save is a snapshot, and a restore never overwrites a run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


@pytest.fixture
def repo(tmp_path):
    """A work tree of its own: the script writes runs-in-progress/ beside its scripts/ folder."""
    (tmp_path / "tree" / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "carry_runs.sh", tmp_path / "tree" / "scripts")
    return tmp_path / "tree"


def carry(repo: Path, *args, path: str | None = None):
    env = {**os.environ, "PATH": path or f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(repo / "scripts" / "carry_runs.sh"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def make_run(folder: Path, step: int, best: bool = True) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"train:\n  meta_steps: {step * 2}\n")
    (folder / "tb").mkdir()
    (folder / "tb" / "events.out.tfevents.1.host").write_bytes(os.urandom(64))
    (folder / "checkpoints").mkdir()
    torch.save({"step": step, "params": {"w": torch.randn(3)}}, folder / "checkpoints" / "last.pt")
    if best:
        torch.save({"step": step - 1}, folder / "checkpoints" / "best.pt")
    (folder / "train.log").write_text("log\n")
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_saved_run_is_restored_file_for_file(repo, tmp_path):
    run = make_run(tmp_path / "runs" / "flagship", step=37)
    saved = carry(repo, "save", tmp_path / "runs", "flagship")
    assert saved.returncode == 0, saved.stderr
    assert "meta-step 37" in saved.stdout
    assert files(repo / "runs-in-progress" / "flagship") == files(run)

    restored = carry(repo, "restore", tmp_path / "elsewhere", "flagship")
    assert restored.returncode == 0, restored.stderr
    assert files(tmp_path / "elsewhere" / "flagship") == files(run)


def test_a_save_is_a_snapshot_without_files_of_an_earlier_save(repo, tmp_path):
    make_run(tmp_path / "runs" / "r", step=10)
    assert carry(repo, "save", tmp_path / "runs", "r").returncode == 0
    shutil.rmtree(tmp_path / "runs" / "r")
    make_run(tmp_path / "runs" / "r", step=20, best=False)
    assert carry(repo, "save", tmp_path / "runs", "r").returncode == 0
    kept = repo / "runs-in-progress" / "r"
    assert not (kept / "checkpoints" / "best.pt").exists()
    assert torch.load(kept / "checkpoints" / "last.pt", weights_only=True)["step"] == 20


def test_a_restore_never_overwrites_a_run(repo, tmp_path):
    make_run(tmp_path / "runs" / "r", step=10)
    assert carry(repo, "save", tmp_path / "runs", "r").returncode == 0
    there = make_run(tmp_path / "other" / "r", step=99)
    before = files(there)
    refused = carry(repo, "restore", tmp_path / "other", "r")
    assert refused.returncode == 2
    assert "already holds a run" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert files(there) == before


@pytest.mark.parametrize("action", ["save", "restore"])
def test_a_folder_without_a_run_is_refused_in_one_line(repo, tmp_path, action):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (repo / "runs-in-progress" / "empty").mkdir(parents=True)
    refused = carry(repo, action, tmp_path / "runs", "empty")
    assert refused.returncode == 2
    assert "checkpoints/last.pt does not exist" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_python_without_torch_only_loses_the_reported_step(repo, tmp_path):
    make_run(tmp_path / "runs" / "r", step=5)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    (bare / "python").chmod(0o755)
    saved = carry(repo, "save", tmp_path / "runs", "r", path=f"{bare}{os.pathsep}{os.environ['PATH']}")
    assert saved.returncode == 0
    assert "meta-step unknown" in saved.stdout and "Error" not in saved.stdout + saved.stderr
    assert files(repo / "runs-in-progress" / "r") == files(tmp_path / "runs" / "r")
