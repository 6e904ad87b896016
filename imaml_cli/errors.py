"""The exceptions that reach a user as a single line instead of a traceback."""

import sys
from contextlib import contextmanager



class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is one line that names the problem and the fix. Entry points print it and exit
    with a non-zero status; nothing else in the package catches it.
    """


@contextmanager
def exit_on_user_error():
    """Turn a UserError (exit 2), or anything carrying an ``exit_code`` (an interrupted run), into a
    printed line and an exit status, so that Hydra prints no traceback."""
    try:
        yield
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if not hasattr(error, "exit_code"):
            raise
        print(str(error), file=sys.stderr)
        sys.exit(error.exit_code)
