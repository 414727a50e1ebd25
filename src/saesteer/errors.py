"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class SaesteerError(Exception):
    """A user-facing error: bad input, missing model, mismatched cache."""
