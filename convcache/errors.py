"""Errors the CLI turns into a one-line message and an exit status instead of a traceback."""


class ConvcacheError(Exception):
    """A user-facing error: bad input, a missing file, an unmet requirement."""

    exit_code = 2


class ImageError(ConvcacheError):
    """An image that cannot be used: empty, corrupt, truncated, not an image, or too large."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
