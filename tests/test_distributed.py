"""Data parallelism over tasks: two processes (torchrun, gloo) train and evaluate as one process does."""

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import BIN, QUICK, compose, run_cli
from imaml_cli.data import TaskBatch
from imaml_cli.engine.distributed import Distributed
from imaml_cli.engine.evaluation_run import evaluate_checkpoint
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError
from imaml_cli.torchrun import QUIET_RANK, rank_argv

# torchrun gives each rank one thread unless OMP_NUM_THREADS is set; the single-process references
# use one thread too, so that every matmul sums in the same order and only the split differs.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# iMAML at λ = 0.5, not the sinusoid preset's 1, where λ and 1/λ coincide.
IMAML = QUICK + ["algorithm.lam=0.5"]


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun(*args: str, cwd: Path):
    """Two ranks on this machine, as a user starts them."""
    with tempfile.TemporaryDirectory() as scratch:  # torchrun leaves a log folder in $TMPDIR
        result = run_cli("torchrun", "--standalone", "--nproc_per_node=2", *args, cwd=cwd,
                         env={**ONE_THREAD, "TMPDIR": scratch})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def printed(result, start: str) -> int:
    """Lines of stdout that start so (log records, which start with a time, do not)."""
    return sum(line.startswith(start) for line in result.stdout.splitlines())


def assert_same_run(single: Path, parallel: Path) -> None:
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parallel / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    # Not bit for bit: two ranks average 1 + 2 tasks where one process averages 3, so float32 sums
    # round differently (about 1e-7); 1e-5 is far below what a lost or doubled task would change.
    for name in a["params"]:
        torch.testing.assert_close(b["params"][name], a["params"][name], rtol=0, atol=1e-5, msg=name)
    assert torch.equal(a["rng"]["sampler"], b["rng"]["sampler"])
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (single, parallel))
    assert rb["test"]["per_episode"] == pytest.approx(ra["test"]["per_episode"], abs=1e-5)
    assert (rb["best_val"], rb["best_step"], rb["checkpoint"]) == (pytest.approx(ra["best_val"], abs=1e-5),
                                                                   ra["best_step"], ra["checkpoint"])


@pytest.fixture(scope="module")
def single_imaml(tmp_path_factory) -> Path:
    """One process, QUICK's global meta-batch of 3 tasks: the reference for two ranks (1 + 2 tasks)."""
    run = tmp_path_factory.mktemp("single") / "run"
    with one_thread():
        train(compose(IMAML), run)
    return run


def test_imaml_on_two_ranks_equals_one_process_and_rank_0_writes_one_run_dir(single_imaml, tmp_path):
    result = torchrun("-m", "imaml_cli.train", *IMAML, cwd=tmp_path)
    # No hydra.run.dir: rank 0's Hydra picks outputs/<date>/<time>/ and rank 1 writes nothing of its own.
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    (run,) = tmp_path.glob("outputs/*/*")
    assert_same_run(single_imaml, run)
    assert printed(result, "test MSE") == 1 and result.stdout.count("val MSE") == 2
    assert (run / ".hydra" / "config.yaml").exists()
    assert (run / "train.log").read_text().count("val MSE") == 2
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


def test_maml_resumed_by_the_console_script_on_two_ranks_equals_one_process(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    with one_thread():
        train(compose(QUICK + ["algorithm=maml", "train.meta_steps=2"]), run)
        train(compose(QUICK + ["algorithm=maml"]), straight)
    torchrun(str(BIN / "imaml-train"), *QUICK, "algorithm=maml", f"hydra.run.dir={run}", cwd=tmp_path)
    assert_same_run(straight, run)
    assert (run / "train.log").read_text().count("resuming from") == 1


def test_eval_on_two_ranks_equals_one_process(single_imaml, tmp_path):
    # 10 episodes in batches of 3: rank 0 adapts batches 0 and 2 (6 episodes), rank 1 batches 1 and 3 (4).
    overrides = [f"checkpoint={single_imaml / 'checkpoints' / 'best.pt'}", "eval.episodes=10", "eval.batch_size=3"]
    result = torchrun("-m", "imaml_cli.evaluate", *overrides, f"hydra.run.dir={tmp_path / 'parallel'}",
                      cwd=tmp_path)
    with one_thread():
        mean = evaluate_checkpoint(compose(overrides, config_name="eval"), overrides, tmp_path / "single")
    single, parallel = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("single", "parallel"))
    assert parallel["per_episode"] == single["per_episode"] and len(single["per_episode"]) == 10
    assert parallel["mean"] == single["mean"] == mean
    assert printed(result, "test MSE") == 1


def test_ranks_above_0_run_hydra_without_files_and_sweeps_are_refused():
    argv = ["imaml-train", "experiment=sinusoid"]
    assert rank_argv(argv, {}) == argv
    assert rank_argv(argv, {"WORLD_SIZE": "2", "RANK": "0"}) == argv
    assert rank_argv(argv, {"WORLD_SIZE": "2", "RANK": "1"}) == [*argv, *QUIET_RANK]
    with pytest.raises(UserError, match="cannot run under torchrun"):
        rank_argv([*argv, "-m"], {"WORLD_SIZE": "2", "RANK": "0"})


def test_a_sweep_under_torchrun_stops_with_one_line(tmp_path):
    result = run_cli("imaml-train", "-m", *QUICK, cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot run under torchrun" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_split_the_meta_batch_in_order(world):
    batch = TaskBatch(*(torch.arange(5 * 2).view(5, 2) + 100 * i for i in range(4)))
    shards = [Distributed(rank, world).shard(batch) for rank in range(world)]
    assert sum(local for _, local, _ in shards) == 5 and all(total == 5 for *_, total in shards)
    for i in range(4):
        assert torch.equal(torch.cat([part[i] for part, _, _ in shards]), batch[i])
    with pytest.raises(UserError, match="train.meta_batch_size=5 is smaller than the 6 processes"):
        Distributed(0, 6).shard(batch)


def _two_ranks(rank: int, port: int, folder: Path) -> None:
    # Both ranks join the store the test process already serves, as torchrun's workers join their
    # agent's (torch reads these variables in its env:// rendezvous).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    world = Distributed.start(torch.device("cpu"))
    try:
        # Tasks 0 | 1 2 with values 1 | 2 4: the weighted average of the ranks' means is the global mean.
        mean = torch.tensor([1.0]) if rank == 0 else torch.tensor([3.0])
        assert world.average({"g": mean}, *((1, 3) if rank == 0 else (2, 3)))["g"].item() == pytest.approx(7 / 3)
        # Rank 0 evaluated batches 0 and 2, rank 1 batch 1: gathered back in batch order.
        mine = [torch.tensor([0.0]), torch.tensor([2.0])] if rank == 0 else [torch.tensor([1.0])]
        assert [v.item() for v in world.gather_lists(mine)] == [0.0, 1.0, 2.0]
        assert world.largest(15 if rank == 1 else 0) == 15
        # Rank 0 builds first, even when it is slower; the others start once it has finished.
        log = folder / "built.txt"

        def build():
            if rank == 0:
                time.sleep(0.5)
            with log.open("a") as f:
                f.write(f"{rank}\n")
            return rank

        assert world.main_first(build) == rank
        assert log.read_text().split() == ["0", "1"]
        # Only rank 0's run directory counts; it must be visible to every rank.
        assert world.shared_folder(folder / f"run{rank}") == folder / "run0" and (folder / "run0").is_dir()
        with mock.patch.object(Path, "is_dir", lambda self: rank == 0):
            with pytest.raises(UserError, match="rank 1 cannot see the run directory"):
                world.shared_folder(folder / "run0")
    finally:
        world.close()


def test_process_group_helpers_on_two_processes(tmp_path):
    # The store listens on a port the system picked, from before the ranks start until they end: a
    # free port found, closed and bound again later could be taken by another process in between.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_two_ranks, args=(store.port, tmp_path), nprocs=2)
    finally:
        del store
