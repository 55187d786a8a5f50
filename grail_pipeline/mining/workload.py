"""The benchmark's replayable workload, and the warm-up that the benchmark, calibration and daemon share.

Problems are derived for a fixed, well-known hotkey in a simulated window from a seed, so every machine
benchmarks the same problems (W1: DESIGN.md §3). Warm-up problems come from far above the measured
indices with their lengths capped: they only need every kernel compiled and every graph captured once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grail_pipeline.mining.chain import BENCHMARK_CHAIN, WindowContext, simulated_window
from grail_pipeline.mining.messages import ProblemTask, SignedGroup, make_task
from grail_pipeline.mining.pipeline import Pipeline
from grail_pipeline.mining.runtime import Runtime

BENCHMARK_HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
WARMUP_INDEX_OFFSET = 1_000_000
WARMUP_MAX_TOKENS = 64


def benchmark_window(seed: int) -> WindowContext:
    """The benchmark's one window: block hash and proof randomness from the seed."""
    return simulated_window(BENCHMARK_CHAIN, 0, seed)


async def benchmark_tasks(runtime: Runtime, window: WindowContext, indices: range,
                          cap: int | None = None) -> AsyncIterator[ProblemTask]:
    """The run's problems; `cap` shortens target lengths (warm-up only needs every kernel once)."""
    for index in indices:
        task = make_task(window, index, BENCHMARK_HOTKEY, runtime.tokenizer, runtime.lengths)
        if cap is not None:
            task.targets = [None if t is None else min(t, cap) for t in task.targets]
        yield task


class _Discard:
    """A sink that drops what it is given: warm-up results are never counted or written."""

    async def put(self, group: SignedGroup) -> None:
        pass


async def warm_up(pipeline: Pipeline, runtime: Runtime, window: WindowContext, problems: int) -> None:
    """`problems` untimed problems through `pipeline`, lengths capped at WARMUP_MAX_TOKENS."""
    indices = range(WARMUP_INDEX_OFFSET, WARMUP_INDEX_OFFSET + problems)
    await pipeline.run(benchmark_tasks(runtime, window, indices, cap=WARMUP_MAX_TOKENS), _Discard())
