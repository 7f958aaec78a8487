"""The one exception type users see: a message that says what, where and what to do."""


class CwtopsError(Exception):
    """A user-facing error. The CLI prints its message and exits non-zero."""
