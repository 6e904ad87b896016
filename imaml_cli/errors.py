"""The exceptions that reach a user as a single line instead of a traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is one line that names the problem and the fix. Entry points print it and exit
    with a non-zero status; nothing else in the package catches it.
    """


def exit_if_expected(error: BaseException) -> None:
    """Print a UserError (exit 2), or anything carrying an ``exit_code`` (an interrupted run), as
    one line and exit; return for anything else, which is a bug and deserves its traceback."""
    if isinstance(error, UserError):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if hasattr(error, "exit_code"):
        print(str(error), file=sys.stderr)
        sys.exit(error.exit_code)


@contextmanager
def exit_on_user_error():
    try:
        yield
    except Exception as error:
        exit_if_expected(error)
        raise
