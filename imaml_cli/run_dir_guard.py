"""A Hydra callback that keeps a command from cluttering or sharing its run directory.

Hydra creates the run directory, opens the log file and writes ``.hydra/`` before the task
function runs, so a command refused by validation would leave an empty ``outputs/<date>/<time>/``
behind, or rewrite the record of the run it was refused for. Around that work this callback

- before it: makes the run directory (one line if it cannot), takes its lock (``RunLock``), so
  that a second command cannot write into a directory a running one owns, and notes what the
  directory holds;
- after a failed job that wrote nothing but those files: puts everything back as it was (a folder
  this process made removed with the empty parents it made; an existing run's ``.hydra/``, log and
  lock file restored);
- then ends a UserError or an interrupted run with its one line and exit status.

A command refused because another holds the lock removes nothing, not even a folder it made a
moment before: the holder may already be writing into it. A sweep locks its sweep directory
before the sweeper writes ``multirun.yaml``, and each job its own folder (Hydra's before any
callback sees it). Ranks above 0 of torchrun own no run directory and only report.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from imaml_cli.engine.run_lock import Busy, RunLock
from imaml_cli.errors import UserError, exit_if_expected, exit_on_user_error
from imaml_cli.torchrun import is_quiet_rank

RECORDS = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _size_and_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _put_back_times(path: Path, old: os.stat_result) -> None:
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: another command may have started in one."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


@dataclass
class Before:
    """What a run directory held before the command touched it, taken under its lock."""

    folder: Path
    created: list[Path]                  # the folders this process made, deepest first
    record_dir: Path | None              # Hydra's .hydra/
    record_dir_existed: bool
    files: dict[Path, tuple[bytes, os.stat_result] | None]  # Hydra's records, the lock file: bytes, stat
    logs: dict[Path, os.stat_result]     # log files: sizes and times
    work: dict[Path, tuple[int, int]]    # every other file: size and modification time

    @classmethod
    def take(cls, folder: Path, output_subdir: str | None, created: list[Path], lock: RunLock) -> "Before":
        record_dir = folder / output_subdir if output_subdir else None
        records = [record_dir / n for n in RECORDS] if record_dir else []
        before = cls(folder, created, record_dir, bool(record_dir and record_dir.is_dir()),
                     {lock.path: lock.previous,
                      **{p: ((p.read_bytes(), p.stat()) if p.is_file() else None) for p in records}},
                     {p: p.stat() for p in folder.glob("*.log")}, {})
        before.work = before._work()
        return before

    def _work(self) -> dict[Path, tuple[int, int]]:
        if not self.folder.is_dir():
            return {}
        ours = set(self.files) | set(self.folder.glob("*.log"))
        return {p: _size_and_mtime(p) for p in self.folder.rglob("*")
                if p.is_file() and p not in ours and not (self.record_dir and self.record_dir in p.parents)}

    def untouched(self) -> bool:
        """Nothing but Hydra's files and the lock changed: the command did no work."""
        return self._work() == self.work

    def restore(self) -> None:
        if self.folder in self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
            _remove_empty(self.created[1:])
            return
        for path, old in self.files.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old[0])
                _put_back_times(path, old[1])
        if self.record_dir and not self.record_dir_existed:
            shutil.rmtree(self.record_dir, ignore_errors=True)
        for path in self.folder.glob("*.log"):
            if path in self.logs:
                os.truncate(path, self.logs[path].st_size)
                _put_back_times(path, self.logs[path])
            else:
                path.unlink()


def make_folder(folder: Path, key: str) -> list[Path]:
    """Make ``folder`` and its missing parents; return those this process made, deepest first."""
    missing, parent = [], folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot make the folder {folder}: {parent} is a file; choose another {key}")
    made = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            continue  # another command made it meanwhile: it is not this one's to remove
        except OSError as error:
            _remove_empty(made)
            raise UserError(f"cannot make the folder {folder} ({error.strerror}); choose a writable {key}") from None
        made.insert(0, path)
    return made


class RunDirGuard(Callback):
    def __init__(self) -> None:
        self.lock: RunLock | None = None
        self.sweep_lock: RunLock | None = None
        self.before: Before | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if is_quiet_rank(os.environ):
            return
        folder = Path(str(config.hydra.run.dir)).absolute()
        with exit_on_user_error():
            created = make_folder(folder, "hydra.run.dir")
            self.lock = _acquire(RunLock(folder), created)
            # Under the lock, so that no other command changes what is recorded.
            self.before = Before.take(folder, config.hydra.output_subdir, created, self.lock)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Before the sweeper writes multirun.yaml: a sweep started twice stops with nothing written.
        folder = Path(str(config.hydra.sweep.dir)).absolute()
        with exit_on_user_error():
            self.sweep_lock = _acquire(RunLock(folder, "sweep directory", "hydra.sweep.dir"),
                                       make_folder(folder, "hydra.sweep.dir"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.sweep_lock is not None:
            self.sweep_lock.release(remove=True)
            self.sweep_lock = None

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.before is None and not is_quiet_rank(os.environ):  # a sweep job, in the folder Hydra made
            with exit_on_user_error():
                self.lock = _acquire(RunLock(Path(config.hydra.runtime.output_dir), key="hydra.sweep.dir"), [])

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        failed = job_return.status is JobStatus.FAILED
        restored = failed and self.before is not None and self.before.untouched()
        if restored:
            self.before.restore()  # the lock file too, as it was before
        if self.lock is not None:
            # Whatever the outcome, the run is over: no lock file stays behind (a sweep's next job
            # takes its own). Under torchrun this is rank 0, the last rank to leave the run.
            self.lock.release(remove=not restored)
            self.lock = None
        if failed:
            # The exception itself: JobReturn.return_value would first print a line of its own.
            exit_if_expected(job_return._return_value)


def _acquire(lock: RunLock, created: list[Path]) -> RunLock:
    """``lock``, held; a refused command removes only the empty folders it made itself."""
    try:
        lock.acquire()
    except Busy:
        raise  # even a folder this process made: the owner is already writing into it
    except UserError:
        _remove_empty(created)
        raise
    return lock
