"""The problem source: the window's problems, issued while the deadline plan says they can still make the file.

`ProblemSource` issues problem indices 0, 1, 2, … of the open window, in order, so the window file can
hold groups 0..N−1 contiguous (F's validator seeds group i of a file from index i). Before each problem
it asks the `DeadlinePlan` whether a group admitted now reaches the sink before the window's cut; the
first "no" closes the window (`WindowClose` tells the sink which indices were issued), and the source
waits for the next window to open. A group the signer dropped (a completion under 16 tokens) is redrawn
for the same index (`redraw`: new samples of the same prompt) ahead of new indices, so no gap opens.

With a `target` (problems per window: a hotkey's share of the cap, mining/fill.py) the window stops taking new
indices at the target but stays open for redraws until every issued group reached the sink, and `hold` (the
fill order of several hotkeys sharing one engine) keeps a source from issuing while it says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio

from grail_pipeline.mining.chain import WindowClock, WindowContext
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.messages import ProblemTask

logger = logging.getLogger("grail_pipeline")

HOLD_S = 0.05  # how often a held source looks again (DeadlinePlan.saturated)


@dataclass(frozen=True)
class WindowClose:
    """What the source tells the sink when it stops issuing problems for a window."""

    window: WindowContext
    indices: tuple[int, ...]  # issued, in order (a redrawn index once)
    partial: bool  # the daemon stopped while the window was still open for generation
    opened: float  # unix time the first problem was issued
    closed: float  # unix time issuing stopped
    abandoned: tuple[int, ...] = ()  # dropped groups whose redraw was queued but never issued

    @property
    def window_start(self) -> int:
        return self.window.window_start


MakeTask = Callable[[WindowContext, int, int, int], ProblemTask]  # (window, index, block, attempt) -> task
Indices = Callable[[int], AsyncGenerator[int, None]]  # window start -> its fresh indices; ending stops the window


async def local_indices(window_start: int) -> AsyncGenerator[int, None]:
    """One worker alone: 0, 1, 2, … (a fleet's come from its Redis claims: mining/fleet_worker.py)."""
    for index in itertools.count():
        yield index


class ProblemSource:
    """Issues the problems of each window while the plan admits them.

    Iterate `tasks()` (the pipeline's task source). `stop()` ends intake at the next problem: the
    window being issued is closed as partial, and the iteration ends, which drains the pipeline.
    `max_windows` ends the iteration after that many windows were closed by the plan; `last_window` (a fleet's,
    asked as each window opens) ends it after the window it names instead, the same one for every worker.
    """

    def __init__(self, clock: WindowClock, plan: DeadlinePlan, make_task: MakeTask,
                 on_close: Callable[[WindowClose], Awaitable[None]], max_windows: int | None = None,
                 checkpoint_window: Callable[[int], int] = lambda window_start: 0,
                 indices: Indices = local_indices,
                 before_window: Callable[[WindowContext], Awaitable[WindowContext | None]] | None = None,
                 on_open: Callable[[WindowContext], Awaitable[None]] | None = None,
                 last_window: Callable[[int], Awaitable[int | None]] | None = None, target: int | None = None,
                 hold: Callable[[], bool] | None = None) -> None:
        self.clock = clock
        self.target = target  # new indices per window, at most (None: while the plan admits them)
        self.hold = hold  # True: issue nothing now (another hotkey's source fills first)
        self.last_window = last_window
        self.on_open = on_open  # told when a window opens, before its first problem (the daemon times its cut)
        # called as each window opens, before its first problem (mining/rotation.py: the window's checkpoint);
        # returns the context its rollouts carry, or None to end the iteration first (the engine restarts)
        self.before_window = before_window
        self.checkpoint_window = checkpoint_window  # window start -> the checkpoint window its rollouts name
        self.indices = indices
        self.plan = plan
        self.make_task = make_task
        self.on_close = on_close
        self.max_windows = max_windows
        self.windows_closed = 0
        self.current_window: int | None = None
        self.issued_total = 0
        self._stop = anyio.Event()
        self._stop_block: int | None = None
        self._redraws: deque[ProblemTask] = deque()
        self._open: int | None = None  # the window being issued, while it is
        self._issued = 0  # new indices issued in the open window

    def stop(self) -> None:
        """End intake; the window open at this moment is closed as partial."""
        if self._stop_block is None:
            self._stop_block = self.clock.block()
        self._stop.set()

    @property
    def filling(self) -> bool:
        """A window is open and still takes new indices (below its target, if any)."""
        return self._open is not None and (self.target is None or self._issued < self.target)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def redraw(self, task: ProblemTask) -> bool:
        """Queue new samples of a dropped group's prompt for the same index; False once its window stopped
        issuing (the sink then ends the file before that index)."""
        if self._open != task.window.window_start or self.stopping:
            return False
        self._redraws.append(task)
        return True

    async def _sleep_until(self, when: float) -> None:
        """Sleep until unix time `when`, or until stop() is called."""
        delay = when - self.clock.time_fn()
        if delay > 0:
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def _next(self, window: WindowContext, fresh: AsyncIterator[int], block: int) -> ProblemTask | None:
        if self._redraws:
            old = self._redraws.popleft()
            return self.make_task(window, old.index, block, old.attempt + 1)
        index = await anext(fresh, None)  # None: the fleet stopped issuing this window's indices
        return None if index is None else self.make_task(window, index, block, 0)

    async def tasks(self) -> AsyncIterator[ProblemTask]:
        clock = self.clock
        while not self.stopping:
            block = clock.block()
            start = clock.next_generation_window(block)
            if start > block:  # between windows: wait for the next one to begin
                await self._sleep_until(clock.time_of_block(start))
                continue
            last = None if self.last_window is None else await self.last_window(start)
            if last is not None and start > last:
                return  # the fleet's run ended with an earlier window
            window = dataclasses.replace(clock.context(start), checkpoint_window=self.checkpoint_window(start))
            if self.before_window is not None:
                window = await self.before_window(window)
                if window is None:
                    return  # nothing of this window issued yet: the daemon restarts the engine, then iterates again
            self.current_window = self._open = start
            self._issued = 0
            if self.on_open is not None:
                await self.on_open(window)
            logger.debug("window %d open (block hash %s): %s", start, window.block_hash, self.plan.describe(start))
            issued: list[int] = []
            opened = clock.time_fn()
            partial = False
            fresh = self.indices(start)
            while True:
                if self.stopping:  # possibly noticed late: the source waits while the pipeline is full
                    partial = clock.generation_open(start, self._stop_block)
                    break
                block = clock.block()
                if not clock.generation_open(start, block) or not self.plan.admit(start):
                    break
                at_target = self.target is not None and len(issued) >= self.target and not self._redraws
                if at_target and not self.plan.in_flight():
                    break  # every group of the target reached the sink, none to redraw: the file can be written
                # a fleet worker's cold start (the first group measures the latency), another hotkey filling first,
                # or a target reached whose groups may still come back dropped (redrawn for the same index)
                if self.plan.saturated() or at_target or (self.hold is not None and not self._redraws and self.hold()):
                    await self._sleep_until(clock.time_fn() + HOLD_S)
                    continue
                task = await self._next(window, fresh, block)
                if task is None:
                    break
                if task.attempt == 0:
                    issued.append(task.index)
                    self._issued = len(issued)
                self.issued_total += 1
                self.plan.admitted(task.key)
                yield task
            await fresh.aclose()
            self._open = None
            abandoned = tuple(t.index for t in self._redraws)
            self._redraws.clear()
            if issued:
                await self.on_close(WindowClose(window, tuple(issued), partial, opened, clock.time_fn(), abandoned))
            if self.stopping:
                return
            self.windows_closed += 1 if issued else 0
            if self.max_windows is not None and self.windows_closed >= self.max_windows:
                return
            if last is not None and start >= last:
                return
            await self._sleep_until(clock.time_of_block(start + clock.window_blocks))
