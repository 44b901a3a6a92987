"""The one exception type users see: its message is printed as a single line by the CLI."""


class MoerunError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` to stderr and exits with code 1; a traceback is
    shown only when MOERUN_DEBUG=1. Library callers can catch it like any exception.
    """
