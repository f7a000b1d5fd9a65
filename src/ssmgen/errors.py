"""One error type for user mistakes.

Library code raises `UserError` with a one-line message that names the file (or option) and the
problem; the CLI prints it and exits with code 2. Anything else is a bug and exits with code 1.
"""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad option, unusable input. One line, no traceback."""
