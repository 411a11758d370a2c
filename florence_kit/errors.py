"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix (unknown task, missing column, unreachable hub, ...).

    The message names the problem and the fix; the CLI prints it on one line, without a traceback.
    """
