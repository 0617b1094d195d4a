"""The one exception type users see: its message is a single line that says what went wrong and what to do."""


class FaceveilError(Exception):
    """A user-facing error: printed as one line, exit status 2, never a traceback."""
