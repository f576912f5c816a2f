"""User-caused errors: one line on stderr, exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix. The message is one line that says what to do."""
