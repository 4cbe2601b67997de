"""The command line's run: the commands registered on the app, and how it ends. A user's
error is one line and exit 2, never a traceback."""

from __future__ import annotations

import errno
import sys

import click
import typer

from graphbuild.cli import build, export, inspect, scale  # noqa: F401  (they register on `app`)
from graphbuild.cli.app import app
from graphbuild.errors import GraphbuildError
from graphbuild.graph.screened import own_process

# Usage errors: click's, and those of the click that typer >= 0.29 carries inside itself.
CLICK_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})
# Out of space or not writable: the user's to fix, worth one line rather than a traceback.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def run() -> None:
    own_process()  # the command line's process: graphbuild's own (graph/screened.py)
    try:
        # Typer turns Ctrl-C into a return value of 130 when not in standalone mode.
        code = app(standalone_mode=False)
    except GraphbuildError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        # Writes go to temp files renamed into place, and markers come last: nothing
        # half-written is marked done, so the same command resumes once there is room.
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror}; finished work is kept, fix this and rerun "
                   "the same command to resume", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        code = 130
    except CLICK_ERRORS as e:  # a mistyped command, a missing argument, a bad flag value
        e.show()
        sys.exit(e.exit_code)
    if code == 130:
        typer.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)
