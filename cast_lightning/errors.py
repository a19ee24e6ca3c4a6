"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class CastError(ValueError):
    """A user-facing error: the message names what is wrong and how to fix it."""
