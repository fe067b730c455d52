"""The one exception type users see: a clear message, no traceback."""


class GenfusionError(Exception):
    """Bad input or params: the message names the file or key and the problem."""
