"""One command at a time in a run directory: an exclusive ``flock`` on ``<run dir>/.lock``.

The kernel drops a flock when its process ends, however it ends, so a run killed by SIGKILL or a
power loss leaves the file but never a lock that blocks the next start; no pid needs checking.
A command that ends in order removes the file (``release(remove=True)``). The holder writes its pid
and host into the file only so that a refused command can name it, and keeps what the file held
before (``previous``) so that a command refused later can put it back.
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
        # A holder that ends removes the file; whoever opened it just before holds the lock of a
        # file no longer there, while a third command makes a new one. So the lock counts only
        # on the file the path still names.
        for _ in range(100):
            if self._try_acquire():
                return
        raise UserError(f"could not lock the {self.kind} {self.folder}: {self.path} keeps being replaced; "
                        f"choose another {self.key}")

    def _try_acquire(self) -> bool:
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
        status = os.fstat(fd)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (status.st_dev, status.st_ino):
            os.close(fd)
            return False
        if existed:
            # Read under the lock: no other holder can be rewriting it.
            self.previous = os.pread(fd, status.st_size, 0), status
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with ``remove``, first delete the file (while still holding it)."""
        if self._fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
