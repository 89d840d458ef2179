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
