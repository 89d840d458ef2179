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


class Stopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, a scheduler's preemption, a Ray Job's stop) ended the work; ``how``, if
    given, says how to continue it. The CLI exits with 128 + the signal's number, as a shell reports a process a
    signal ended."""

    def __init__(self, signum: int, how: str = ""):
        super().__init__(how)
        self.signum, self.how = signum, how


def first_line(err: BaseException) -> str:
    """An exception's message in one line (some libraries write several), for a UserError to quote."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
