"""The simulated chain: blocks, windows, stop rule, replayable randomness, worker split and the problem source."""

from __future__ import annotations

import hashlib
import re

import anyio
import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.chain import (
    SIMULATED_CHAIN,
    WindowClock,
    WindowContext,
    WorkerSlot,
    block_time_from_env,
    proof_randomness,
    safety_blocks_from_env,
    stand_in,
)
from grail_pipeline.mining.messages import ProblemTask
from grail_pipeline.mining.source import ProblemSource, WindowClose


class FakeTime:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_protocol_randomness_vector() -> None:
    """grail-protocol.md §9: sha256((block_hash + drand).encode()) with the 0x-prefixed hash verbatim."""
    block_hash = "0x" + hashlib.sha256(b"block").hexdigest()
    drand = hashlib.sha256(b"drand").hexdigest()
    assert proof_randomness(block_hash, drand) == "67ddf5ce5b7cfd4c4081d2a6ce1c1235e4f240e4322c6b1e106a6cec47948f9c"


def test_window_context_is_replayable_from_the_run_seed() -> None:
    a = WindowClock(block_time_s=12, run_seed=7, genesis=0.0).context(90)
    b = WindowClock(block_time_s=0.1, run_seed=7, genesis=5.0).context(90)
    assert a == b  # same seed and window: same chain, whatever the timing
    assert re.fullmatch(r"0x[0-9a-f]{64}", a.block_hash)
    assert re.fullmatch(r"[0-9a-f]{64}", a.randomness)  # the validator's hex regex, unlike the raw hash
    assert a.randomness == proof_randomness(a.block_hash, stand_in(SIMULATED_CHAIN, "drand", 7, 90))
    assert a.block_hash == "0x" + stand_in(SIMULATED_CHAIN, "block", 7, 90) and a.window_start == 90 and a.use_drand
    others = {WindowClock(run_seed=s, genesis=0.0).context(w).block_hash for s in (7, 8) for w in (90, 120)}
    assert len(others) == 4


def test_blocks_windows_and_the_stop_rule() -> None:
    t = FakeTime(1000.0)
    clock = WindowClock(block_time_s=12, window_blocks=30, safety_blocks=1, time_fn=t)
    assert clock.genesis == 1000.0 and clock.block() == 0 and clock.window_seconds == 360
    t.now = 1000.0 + 12 * 29 - 0.001
    assert clock.block() == 28 and clock.generation_open(0)
    t.now = 1000.0 + 12 * 29
    assert clock.block() == 29 and not clock.generation_open(0)  # one safety block before the end
    assert clock.next_generation_window() == 30
    assert clock.time_of_block(30) == 1000.0 + 360
    t.now = 1000.0 + 12 * 30
    assert clock.block() == 30 and clock.window_start(clock.block()) == 30 and clock.generation_open(30)
    assert clock.next_generation_window() == 30
    assert not clock.generation_open(0, 5 * 30)
    t.now = 0.0
    assert clock.block() == 0  # before genesis


@pytest.mark.parametrize("safety", [0, 5])
def test_safety_blocks(safety: int) -> None:
    clock = WindowClock(block_time_s=1, window_blocks=30, safety_blocks=safety, genesis=0.0)
    assert clock.generation_end(60) == 90 - safety
    assert clock.generation_open(60, 89 - safety) and not clock.generation_open(60, 90 - safety)


def test_worker_slot() -> None:
    assert WorkerSlot.from_env({}) == WorkerSlot(0, 1)
    slot = WorkerSlot.from_env({"GRAIL_WORKER_ID": "2", "GRAIL_TOTAL_WORKERS": "3"})
    assert (slot.worker_id, slot.total_workers, slot.describe()) == (2, 3, "worker 2 of 3")


@pytest.mark.parametrize("env, words", [
    ({"GRAIL_WORKER_ID": "3", "GRAIL_TOTAL_WORKERS": "3"}, "GRAIL_WORKER_ID=3 is out of range"),
    ({"GRAIL_WORKER_ID": "-1", "GRAIL_TOTAL_WORKERS": "2"}, "out of range"),
    ({"GRAIL_WORKER_ID": "1"}, "below GRAIL_TOTAL_WORKERS=1"),
    ({"GRAIL_TOTAL_WORKERS": "0"}, "GRAIL_TOTAL_WORKERS must be at least 1"),
    ({"GRAIL_WORKER_ID": "one"}, "GRAIL_WORKER_ID='one' is not a whole number"),
])
def test_worker_slot_errors_are_one_line(env: dict[str, str], words: str) -> None:
    with pytest.raises(UserError) as info:
        WorkerSlot.from_env(env)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_environment_settings() -> None:
    assert safety_blocks_from_env(30, {}) == 0
    assert safety_blocks_from_env(30, {"GRAIL_MINER_SAFETY_BLOCKS": "6"}) == 6
    for bad in ("30", "-1", "x"):
        with pytest.raises(UserError, match="GRAIL_MINER_SAFETY_BLOCKS"):
            safety_blocks_from_env(30, {"GRAIL_MINER_SAFETY_BLOCKS": bad})
    assert block_time_from_env({}) == 12.0
    assert block_time_from_env({"GRAIL_BLOCK_TIME": "0.2"}) == 0.2
    for bad in ("0", "-3", "fast", "nan"):
        with pytest.raises(UserError, match="GRAIL_BLOCK_TIME"):
            block_time_from_env({"GRAIL_BLOCK_TIME": bad})


def fake_task(window: WindowContext, index: int, block: int, attempt: int) -> ProblemTask:
    return ProblemTask(window=window, index=index, seed=index, problem=None, prompt_ids=[1], targets=[None],
                       block=block, attempt=attempt)


class StubPlan:
    """A deadline plan whose answer the test sets (DeadlinePlan itself is tested in test_deadline.py)."""

    def __init__(self, open_until: float | None = None, clock: WindowClock | None = None) -> None:
        self.open_until = open_until  # seconds into each window during which problems are admitted
        self.clock = clock
        self.admitted_keys: list[tuple[int, int, int]] = []

    def admit(self, window_start: int) -> bool:
        if self.open_until is None:
            return True
        return self.clock.time_fn() < self.clock.time_of_block(window_start) + self.open_until

    def admitted(self, key: tuple[int, int, int]) -> None:
        self.admitted_keys.append(key)

    def saturated(self) -> bool:
        return False

    def describe(self, window_start: int) -> dict:
        return {}


def run_source(clock: WindowClock, pace: float, max_windows: int | None = None, stop_after: int | None = None,
               plan: StubPlan | None = None) -> tuple[list[ProblemTask], list[WindowClose], ProblemSource]:
    """Consume the source at one task per `pace` seconds, as a pipeline would."""
    closes: list[WindowClose] = []
    taken: list[ProblemTask] = []

    async def on_close(close: WindowClose) -> None:
        closes.append(close)

    source: ProblemSource | None = None

    async def main() -> None:
        nonlocal source
        source = ProblemSource(clock, plan or StubPlan(), fake_task, on_close, max_windows=max_windows,
                               checkpoint_window=lambda start: 1000 + start)
        async for t in source.tasks():
            taken.append(t)
            if stop_after is not None and len(taken) == stop_after:
                source.stop()
            await anyio.sleep(pace)

    anyio.run(main)
    return taken, closes, source


def test_source_issues_indices_from_zero_while_the_plan_admits() -> None:
    clock = WindowClock(block_time_s=0.02, window_blocks=10, safety_blocks=0)  # 0.2-s windows
    plan = StubPlan(open_until=0.1, clock=clock)
    taken, closes, source = run_source(clock, pace=0.012, max_windows=3, plan=plan)
    assert len(closes) == 3 and source.windows_closed == 3
    assert [c.window_start for c in closes] == sorted({c.window_start for c in closes})
    assert all(c.window_start % 10 == 0 for c in closes)
    for close in closes:
        assert not close.partial
        assert close.indices == tuple(range(len(close.indices)))  # 0, 1, 2, ... contiguous
        mine = [t for t in taken if t.window.window_start == close.window_start]
        assert tuple(t.index for t in mine) == close.indices
        assert all(close.window_start <= t.block < close.window_start + 6 for t in mine)  # the plan's 0.1 s, 5 blocks
        assert mine[0].window.block_hash == clock.context(close.window_start).block_hash
        assert mine[0].window.checkpoint_window == 1000 + close.window_start
    assert plan.admitted_keys == [t.key for t in taken]


def test_safety_blocks_still_end_intake_before_the_windows_end() -> None:
    clock = WindowClock(block_time_s=0.02, window_blocks=10, safety_blocks=4)
    taken, closes, _ = run_source(clock, pace=0.012, max_windows=2)
    for close in closes:
        assert all(t.block < close.window_start + 6 for t in taken if t.window.window_start == close.window_start)


def test_a_dropped_group_is_redrawn_for_its_index_before_new_ones() -> None:
    clock = WindowClock(block_time_s=1.0, window_blocks=30)
    closes: list[WindowClose] = []

    async def on_close(close: WindowClose) -> None:
        closes.append(close)

    async def main() -> None:
        source = ProblemSource(clock, StubPlan(), fake_task, on_close)
        tasks = source.tasks()
        first = [await tasks.__anext__() for _ in range(3)]
        assert source.redraw(first[1])
        again = await tasks.__anext__()
        assert (again.index, again.attempt) == (1, 1)
        assert (await tasks.__anext__()).index == 3
        assert source.redraw(again)
        source.stop()
        with pytest.raises(StopAsyncIteration):
            await tasks.__anext__()
        assert not source.redraw(again)  # the window stopped issuing: the sink ends the file before index 1

    anyio.run(main)
    assert closes[0].indices == (0, 1, 2, 3) and closes[0].abandoned == (1,)


def test_stop_closes_the_open_window_as_partial_and_ends_intake() -> None:
    clock = WindowClock(block_time_s=0.05, window_blocks=30, safety_blocks=1)  # a 1.5 s window
    taken, closes, source = run_source(clock, pace=0.01, stop_after=5)
    assert [t.index for t in taken] == [0, 1, 2, 3, 4]
    assert len(closes) == 1 and closes[0].partial and closes[0].indices == (0, 1, 2, 3, 4)
    assert source.windows_closed == 0


def test_stop_noticed_after_the_window_closed_still_counts_as_partial() -> None:
    """The source waits while the pipeline is full; a stop during that wait still cuts the window short."""
    t = FakeTime(0.0)
    clock = WindowClock(block_time_s=1, window_blocks=30, safety_blocks=1, time_fn=t)
    closes: list[WindowClose] = []

    async def on_close(close: WindowClose) -> None:
        closes.append(close)

    async def main() -> None:
        source = ProblemSource(clock, StubPlan(), fake_task, on_close)
        tasks = source.tasks()
        assert (await tasks.__anext__()).index == 0
        t.now = 5.0
        source.stop()  # at block 5, while the pipeline holds the source
        t.now = 45.0  # the pipeline lets go long after the window's end
        with pytest.raises(StopAsyncIteration):
            await tasks.__anext__()

    anyio.run(main)
    assert len(closes) == 1 and closes[0].partial and closes[0].indices == (0,)
