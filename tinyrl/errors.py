"""User-caused errors: one line on stderr, exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix. The message is one line that says what to do."""


class Stopped(Exception):
    """fit stopped early because a signal asked it to, after saving a checkpoint. The message says how to resume;
    `code` is the exit status (128 + the signal's number, as a shell reports a process killed by it)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
