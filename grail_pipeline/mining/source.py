"""The problem source: this worker's problems of each window, issued while the simulated chain says it is open.

`ProblemSource` issues this worker's problem indices of the open window (worker k of T takes k,
k+T, …) while the window is open for generation, i.e. until GRAIL_MINER_SAFETY_BLOCKS blocks before
its end; it then tells the sink how many it issued (`WindowClose`) and waits for the next window. No
coordinator: processes on one or many nodes split the index space by their worker id alone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio

from grail_pipeline.mining.chain import WindowClock, WindowContext, WorkerSlot
from grail_pipeline.mining.messages import ProblemTask

logger = logging.getLogger("grail_pipeline")


@dataclass(frozen=True)
class WindowClose:
    """What the source tells the sink when it stops issuing problems for a window."""

    window: WindowContext
    indices: tuple[int, ...]  # issued, in order
    partial: bool  # the daemon stopped while the window was still open for generation
    opened: float  # unix time the first problem was issued
    closed: float  # unix time issuing stopped

    @property
    def window_start(self) -> int:
        return self.window.window_start


MakeTask = Callable[[WindowContext, int, int], ProblemTask]  # (window, index, block) -> task


class ProblemSource:
    """Issues this worker's problems of each window while the clock says it is open.

    Iterate `tasks()` (the pipeline's task source). `stop()` ends intake at the next problem: the
    window being issued is closed as partial, and the iteration ends, which drains the pipeline.
    `max_windows` ends the iteration after that many windows were closed by the stop rule.
    """

    def __init__(self, clock: WindowClock, worker: WorkerSlot, make_task: MakeTask,
                 on_close: Callable[[WindowClose], Awaitable[None]], max_windows: int | None = None) -> None:
        self.clock = clock
        self.worker = worker
        self.make_task = make_task
        self.on_close = on_close
        self.max_windows = max_windows
        self.windows_closed = 0
        self.current_window: int | None = None
        self.issued_total = 0
        self._stop = anyio.Event()
        self._stop_block: int | None = None

    def stop(self) -> None:
        """End intake; the window open at this moment is closed as partial."""
        if self._stop_block is None:
            self._stop_block = self.clock.block()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _sleep_until(self, when: float) -> None:
        """Sleep until unix time `when`, or until stop() is called."""
        delay = when - self.clock.time_fn()
        if delay > 0:
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def tasks(self) -> AsyncIterator[ProblemTask]:
        clock = self.clock
        while not self.stopping:
            block = clock.block()
            start = clock.next_generation_window(block)
            if start > block:  # between windows: wait for the next one to begin
                await self._sleep_until(clock.time_of_block(start))
                continue
            window = clock.context(start)
            self.current_window = start
            logger.debug("window %d open for generation until block %d (block hash %s)", start,
                         clock.generation_end(start), window.block_hash)
            issued: list[int] = []
            opened = clock.time_fn()
            partial = False
            for index in self.worker.indices():
                if self.stopping:  # possibly noticed late: the source waits while the pipeline is full
                    partial = clock.generation_open(start, self._stop_block)
                    break
                block = clock.block()
                if not clock.generation_open(start, block):
                    break
                issued.append(index)
                self.issued_total += 1
                yield self.make_task(window, index, block)
            if issued:
                await self.on_close(WindowClose(window, tuple(issued), partial, opened, clock.time_fn()))
            if self.stopping:
                return
            self.windows_closed += 1 if issued else 0
            if self.max_windows is not None and self.windows_closed >= self.max_windows:
                return
