"""The one exception domain code raises for a user's mistake; the CLI (cli/errors.py, user_errors) turns
it into one line.

Exit codes (README, "Exit codes"): each class of problem has its own, so scripts can tell them apart.
"""

FAILED = 1        # the run itself failed (e.g. too many non-finite updates in a row)
BAD_CONFIG = 2    # bad arguments, config keys, values or presets (also click's own usage errors)
NOT_FOUND = 3     # a path that does not exist or is not what it must be (run dir, model, file)
EXISTS = 4        # refusing to replace an existing run directory
BAD_DATA = 5      # a file that exists but cannot be used: corrupted JSONL/YAML, empty or malformed data
GATE = 6          # `analyze --require`: a condition on the run's metrics does not hold
INTERRUPTED = 130  # Ctrl-C: stopped cleanly after a step, checkpoint written


class EntclipError(Exception):
    """A user-facing error. The message is one line that names the fix."""

    def __init__(self, message: str, exit_code: int = BAD_CONFIG):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception (at most 200 characters), for a one-line EntclipError."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
