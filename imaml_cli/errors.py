"""The one exception type that reaches a user as a single line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is one line that names the problem and the fix. Entry points print it and exit
    with a non-zero status; nothing else in the package catches it.
    """
