"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class SaesteerError(Exception):
    """A user-facing error: bad input, missing model, mismatched cache."""


class TrainError(SaesteerError):
    """Training cannot start or continue (NaN, bad checkpoint, mismatched config)."""


def short(value: object, limit: int = 60) -> str:
    """`value` cut to a prefix for an error message that echoes user input (which may be megabytes):
    a string as is, anything else as its repr; over `limit` characters, the first `limit` plus "..."."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
