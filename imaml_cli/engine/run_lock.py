"""One command at a time in a run directory: an exclusive ``flock`` on ``<run dir>/.lock``.

The kernel drops a flock when its process ends, however it ends, so a run killed by SIGKILL or a
power loss leaves the file but never a lock that blocks the next start; no pid needs checking.
The holder writes its pid and host into the file only so that a refused command can name it, and
keeps what the file held before (``previous``) so that a command refused later can put it back.
"""

import fcntl
import os
import socket
from pathlib import Path

from imaml_cli.errors import UserError

NAME = ".lock"


class Busy(UserError):
    """The folder is another live process's: whoever is refused must leave everything in it alone."""


class RunLock:
    def __init__(self, folder: Path, kind: str = "run directory", key: str = "hydra.run.dir"):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self.kind, self.key = kind, key  # for messages
        self.previous: tuple[bytes, os.stat_result] | None = None  # the file before acquire; None: new
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            try:
                fd, existed = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), False
            except FileExistsError:
                fd, existed = os.open(self.path, os.O_RDWR | os.O_CLOEXEC), True
        except OSError as error:
            raise UserError(f"cannot write into the {self.kind} {self.folder} ({error.strerror}); "
                            f"choose a writable {self.key}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{self.kind} {self.folder} is in use by {holder}; wait until it ends, or choose "
                       f"another {self.key}") from None
        if existed:
            # Read under the lock: no other holder can be rewriting it.
            status = os.fstat(fd)
            self.previous = os.pread(fd, status.st_size, 0), status
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
