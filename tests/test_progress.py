"""Progress where nobody watches a terminal (PM2's logs, CI): lines every few seconds instead of a live bar."""

from __future__ import annotations

import io
import time

from rich.console import Console
from rich.progress import Progress

from grail_pipeline.cli.progress import LineProgress, rate_progress


def test_a_log_gets_a_line_per_task_every_few_seconds_and_at_its_start_and_stop() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    progress = rate_progress(console)
    assert isinstance(progress, LineProgress)
    progress.every_s = 0.05
    with progress:
        task = progress.add_task("batch 16: rollouts", total=32, rate="")
        progress.update(task, completed=16, rate="2.50 roll/s")
        time.sleep(0.3)  # a long step without updates: its lines keep coming
        progress.stop_task(task)
        time.sleep(0.15)  # a stopped task says nothing more
    lines = out.getvalue().splitlines()
    assert lines[0] == "batch 16: rollouts: 0/32, 0 s (started)"
    assert lines[-1].startswith("batch 16: rollouts: 16/32, 2.50 roll/s, ") and lines[-1].endswith("(done)")
    ticks = lines[1:-1]  # the first may come before the update on a busy machine
    assert all(line.startswith("batch 16: rollouts: ") and not line.endswith(")") for line in ticks)
    assert sum(line.startswith("batch 16: rollouts: 16/32, 2.50 roll/s, ") for line in ticks) >= 2


def test_a_terminal_gets_the_live_bar() -> None:
    console = Console(file=io.StringIO(), force_terminal=True)
    progress = rate_progress(console)
    assert type(progress) is Progress
