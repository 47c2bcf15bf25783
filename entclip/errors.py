"""The one exception domain code raises for a user's mistake; cli.py turns it into one line."""


class EntclipError(Exception):
    """A user-facing error. The message is one line that names the fix.

    `exit_code` 2 means bad input (config, arguments, paths); 1 means the run failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
