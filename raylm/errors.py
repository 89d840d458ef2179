"""The one exception type for user mistakes.

The CLI prints a ``UserError`` as a single line and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad input (config key, path, checkpoint, cluster address) the user can fix.

    The message names the culprit and what to do, in one line.
    """


class StageFailed(Exception):
    """A stage ran out of restarts; the message says where its logs are and how to resume."""


def first_line(err: BaseException) -> str:
    """An exception's message in one line (some libraries write several), for a UserError to quote."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
