"""The one exception a user can cause and fix."""


class GraphbuildError(Exception):
    """A problem with the user's input or run directory.

    The message is one line that names the file, row or column at fault. The CLI prints it
    without a traceback and exits with code 2.
    """
