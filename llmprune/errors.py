"""The one exception for user mistakes."""


class LlmpruneError(Exception):
    """A user mistake: the message names the problem, where it is, and the fix.

    The CLI prints it as one line and exits with code 2; anything else is a bug.
    """
