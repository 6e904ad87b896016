"""The mode a file written through a temporary file should end with."""

import os


def as_if_created(fd: int) -> None:
    """Give the file behind ``fd`` the mode ``open()`` would have: 0666 less the umask.

    ``tempfile.mkstemp`` makes its files 0600, so a checkpoint or result renamed into place would
    otherwise be unreadable to the rest of a group sharing the run folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
