"""The one progress layout of the commands that run long work: name, bar, done of total, live rate, time.

On a terminal it is rich's live bar. Anywhere else (PM2's log files, a pipe, CI) a live bar shows nothing, so
the same calls print a plain line per running task every `LINE_EVERY_S` seconds, and one when a task starts and
when it stops: a log read later still says where the work was.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

LINE_EVERY_S = 5.0


def rate_progress(console: Console) -> Progress:
    """A transient bar per task on a terminal, progress lines elsewhere; a task carries a `rate` field."""
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True)
    return LineProgress(console)


class LineProgress(Progress):
    """rich's Progress, its live display off, printing a line per running task every LINE_EVERY_S seconds (from a
    thread of its own, so a long step without updates still shows its elapsed time) and at each start and stop."""

    def __init__(self, console: Console, every_s: float = LINE_EVERY_S) -> None:
        super().__init__(TextColumn("{task.description}"), console=console, disable=True)
        self.every_s = every_s
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def line(self, task_id: TaskID, note: str = "") -> None:
        task = self._tasks[task_id]
        done = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
        rate = task.fields.get("rate") or ""
        elapsed = task.elapsed or 0.0
        self.console.print(f"{task.description}: {done}{f', {rate}' if rate else ''}, {elapsed:.0f} s{note}",
                           highlight=False, soft_wrap=True)

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self.line(task_id, " (started)")
        return task_id

    def stop_task(self, task_id: TaskID) -> None:
        with self._lock:  # the ticker prints under the same lock: nothing of a task comes after its "(done)"
            if self._tasks[task_id].stop_time is None:
                super().stop_task(task_id)
                self.line(task_id, " (done)")

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                for task in list(self._tasks.values()):
                    if task.started and task.stop_time is None:
                        self.line(task.id)

    def start(self) -> None:
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="progress-lines", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
