"""A Hydra callback that keeps a command from cluttering or sharing its run directory.

Hydra creates the run directory, opens the log file and writes ``.hydra/`` before the task
function runs, so a command refused by validation would leave an empty ``outputs/<date>/<time>/``
behind, or rewrite the record of the run it was refused for. Around that work this callback

- before it: makes the run directory (one line if it cannot) and takes its lock (``RunLock``), so
  that a second command cannot write into a directory a running one owns;
- after a failed job that wrote nothing but those files: puts everything back as it was (a new
  folder removed with the empty parents it needed; an existing run's ``.hydra/``, log and lock
  file restored);
- then ends a UserError or an interrupted run with its one line and exit status.

A sweep job's folder is Hydra's before any callback sees it: there it only takes the lock.
Ranks above 0 of torchrun own no run directory and only report.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from imaml_cli.engine.run_lock import NAME as LOCK_NAME, RunLock
from imaml_cli.errors import UserError, exit_if_expected, exit_on_user_error
from imaml_cli.torchrun import is_quiet_rank

RECORDS = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _times(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_atime_ns, st.st_mtime_ns


@dataclass
class Before:
    """What a run directory held before the command touched it."""

    folder: Path
    created: list[Path]                  # the folders this command makes, deepest first
    record_dir: Path | None              # Hydra's .hydra/
    record_dir_existed: bool
    files: dict[Path, tuple[bytes, tuple[int, int]] | None]  # Hydra's records, the lock file: bytes, times
    logs: dict[Path, tuple[int, tuple[int, int]]]            # log files: sizes and times
    work: dict[Path, tuple[int, int]]    # every other file: size and modification time

    @classmethod
    def take(cls, folder: Path, output_subdir: str | None) -> "Before":
        created, parent = [], folder
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"cannot make the run directory {folder}: {parent} is a file; choose another "
                            "hydra.run.dir")
        record_dir = folder / output_subdir if output_subdir else None
        names = [folder / LOCK_NAME, *((record_dir / n) for n in RECORDS if record_dir)]
        before = cls(folder, created, record_dir, bool(record_dir and record_dir.is_dir()),
                     {p: ((p.read_bytes(), _times(p)) if p.is_file() else None) for p in names},
                     {p: (p.stat().st_size, _times(p)) for p in folder.glob("*.log")}, {})
        before.work = before._work()
        return before

    def _work(self) -> dict[Path, tuple[int, int]]:
        if not self.folder.is_dir():
            return {}
        ours = set(self.files) | set(self.folder.glob("*.log"))
        return {p: _stat(p) for p in self.folder.rglob("*")
                if p.is_file() and p not in ours and not (self.record_dir and self.record_dir in p.parents)}

    def untouched(self) -> bool:
        """Nothing but Hydra's files and the lock changed: the command did no work."""
        return self._work() == self.work

    def restore(self) -> None:
        if self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
            for parent in self.created[1:]:
                try:
                    parent.rmdir()  # only while empty: another command may have started in it meanwhile
                except OSError:
                    break
            return
        for path, old in self.files.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old[0])
                os.utime(path, ns=old[1])
        if self.record_dir and not self.record_dir_existed:
            shutil.rmtree(self.record_dir, ignore_errors=True)
        for path in self.folder.glob("*.log"):
            if path in self.logs:
                os.truncate(path, self.logs[path][0])
                os.utime(path, ns=self.logs[path][1])
            else:
                path.unlink()


def make_folder(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the folder {folder} ({error.strerror}); choose a writable {key}") from None


class RunDirGuard(Callback):
    def __init__(self) -> None:
        self.lock: RunLock | None = None
        self.before: Before | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if is_quiet_rank(os.environ):
            return
        folder = Path(str(config.hydra.run.dir)).absolute()
        with exit_on_user_error():
            self.before = Before.take(folder, config.hydra.output_subdir)
            try:
                make_folder(folder, "hydra.run.dir")
                self._lock(folder)
            except UserError:
                # Only folders made here are undone: a busy folder's owner is writing into its own.
                if self.before.created:
                    self.before.restore()
                raise

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with exit_on_user_error():
            make_folder(Path(str(config.hydra.sweep.dir)).absolute(), "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.before is None and not is_quiet_rank(os.environ):  # a sweep job, in the folder Hydra made
            with exit_on_user_error():
                self._lock(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        failed = job_return.status is JobStatus.FAILED
        if failed and self.before is not None and self.before.untouched():
            self.before.restore()
        if self.before is None and self.lock is not None:  # a sweep job: the next one takes its own
            self.lock.release()
            self.lock = None
        if failed:
            # The exception itself: JobReturn.return_value would first print a line of its own.
            exit_if_expected(job_return._return_value)

    def _lock(self, folder: Path) -> None:
        lock = RunLock(folder)
        lock.acquire()
        self.lock = lock
