"""The exception types that the CLI turns into a one-line message and an exit code (2, or 130 for Ctrl-C)."""


class UserError(Exception):
    """Bad input the user can fix (unknown task, missing column, unreachable hub, ...).

    The message names the problem and the fix; the CLI prints it on one line, without a traceback.
    """

    exit_code = 2


class BadImageError(UserError):
    """A row whose image cannot be decoded; ``finetune --skip-bad-images`` skips these rows."""


class RunInterrupted(UserError):
    """Ctrl-C during training: the model at the last finished step is saved; exit code 130 like any SIGINT."""

    exit_code = 130


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception message (or its type name): enough to name the cause in a
    one-line error, without the multi-line detail some libraries append."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
