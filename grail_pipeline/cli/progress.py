"""The one progress-bar layout of the commands that run the pipeline: name, bar, rollouts done, live rate, time."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def rate_progress(console: Console) -> Progress:
    """A transient bar per batch size; its task carries a `rate` field the measurement's sink updates."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True)
