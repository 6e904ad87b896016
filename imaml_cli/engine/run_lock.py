"""One command at a time in a run directory: an exclusive ``flock`` on ``<run dir>/.lock``.

The kernel drops a flock when its process ends, however it ends, so a run killed by SIGKILL or a
power loss leaves the file but never a lock that blocks the next start; no pid needs checking.
The holder writes its pid and host into the file only so that a refused command can name it.
"""

import fcntl
import os
import socket
from pathlib import Path

from imaml_cli.errors import UserError

NAME = ".lock"


class RunLock:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise UserError(f"cannot write into the run directory {self.folder} ({error.strerror}); "
                            "choose a writable hydra.run.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run directory {self.folder} is in use by {holder}; wait until it ends, or choose "
                            "another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
