"""The one error type for user mistakes, printed as one line at the CLI edge."""


class SeedError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint).

    The message names the problem and the fix; the CLI prints it on one line
    and exits with code 2, never with a traceback.
    """
