"""Progress reporting: library code calls a Reporter; only the CLI draws a bar."""

from __future__ import annotations

import sys


class Reporter:
    """Silent by default. start() opens a task of `total` units, advance() counts them."""

    def start(self, total: int, unit: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class RichReporter(Reporter):
    """A rich progress bar with a rate (texts/s, queries/s) on stderr."""

    def __init__(self, description: str):
        self.description = description
        self._progress = None
        self._task = None

    def start(self, total: int, unit: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text("" if speed is None else f"{speed:,.0f} {unit}/s")

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            Rate(), TimeRemainingColumn(),
            console=Console(file=sys.stderr), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def reporter_for(description: str, quiet: bool) -> Reporter:
    """A bar when a person is watching; silence under --quiet or when stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        return Reporter()
    return RichReporter(description)
