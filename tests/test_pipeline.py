"""The pipeline's back-pressure: a slow sink throttles every stage before it, memory stays bounded, nothing is lost.

Engine, prover and signer are stand-ins that cost nothing, so the only slow stage is the sink and
the test can count exactly how much work is inside the pipeline at any moment.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import torch

from grail_pipeline.inference.engine import GroupRequest, GroupResult, OneGroupEngine
from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.messages import ProblemTask, ProvedGroup, SignedGroup
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.proving.proofs import ProofJob, Prover, RolloutProof

WINDOW = WindowContext(window_start=0, block_hash="0x" + "00" * 32, randomness="11" * 32)


class InstantEngine(OneGroupEngine):
    """Takes one group at a time and finishes it at once (16 completions of 20 tokens)."""

    name = "instant"

    def generate_group(self, request: GroupRequest) -> GroupResult:
        return GroupResult(request, [[7] * 20 for _ in request.targets], seconds=0.0)


class InstantProver(Prover):
    name = "instant"

    def __init__(self) -> None:
        pass

    def prove_many(self, jobs: list[ProofJob]) -> list[list[RolloutProof]]:
        return [[RolloutProof(torch.zeros(1), torch.zeros(1, 1), [0.0]) for _ in job.completions] for job in jobs]


def instant_sign(group: ProvedGroup) -> SignedGroup:
    n = len(group.completions)
    return SignedGroup(group.task, [{"index": i} for i in range(n)], [0.0] * n, [False] * n, [False] * n,
                       completion_tokens=20 * n, generate_seconds=0.0, proof_seconds=0.0, sign_seconds=0.0)


def task(index: int) -> ProblemTask:
    return ProblemTask(window=WINDOW, index=index, seed=index, problem=None, prompt_ids=[1, 2, 3],
                       targets=[None] * 16)


class Ledger:
    """Counts what the source handed out and what the sink got; tracks the most ever in between."""

    def __init__(self) -> None:
        self.issued = 0
        self.sunk: list[int] = []
        self.max_outstanding = 0

    async def source(self, n: int) -> AsyncIterator[ProblemTask]:
        for i in range(n):
            self.issued += 1
            self.max_outstanding = max(self.max_outstanding, self.issued - len(self.sunk))
            yield task(i)


class SlowSink:
    def __init__(self, ledger: Ledger, delay: float) -> None:
        self.ledger = ledger
        self.delay = delay

    async def put(self, group: SignedGroup) -> None:
        await anyio.sleep(self.delay)
        self.ledger.sunk.append(group.task.index)


def capacity(cfg: PipelineConfig) -> int:
    """Most groups the pipeline can hold: every queue full plus one in the hands of each worker."""
    holders = 1 + 1 + cfg.proof_pool + 1 + cfg.sign_workers + 1  # intake, engine, prover pool + send, signers, sink
    return cfg.generation_queue + cfg.proof_queue + cfg.sign_queue + cfg.sink_queue + holders


@pytest.mark.parametrize("cfg", [
    PipelineConfig(generation_queue=2, proof_queue=2, sign_queue=2, sink_queue=2, sign_workers=2, proof_pool=2),
    PipelineConfig(),  # the defaults the fast engine runs with
])
def test_slow_sink_throttles_the_source_and_drops_nothing(cfg: PipelineConfig) -> None:
    n, delay = 60, 0.01
    ledger = Ledger()
    pipeline = Pipeline(InstantEngine(), InstantProver(), instant_sign, cfg)
    depths: list[dict[str, int]] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while True:
                    depths.append(pipeline.queue_depths())
                    await anyio.sleep(0.002)

            tg.start_soon(watch)
            await pipeline.run(ledger.source(n), SlowSink(ledger, delay))
            tg.cancel_scope.cancel()

    t0 = time.perf_counter()
    anyio.run(main)
    elapsed = time.perf_counter() - t0
    assert sorted(ledger.sunk) == list(range(n))  # every group arrived exactly once
    assert elapsed >= n * delay  # the sink set the pace
    # the source was held back: never more in the pipeline than its queues and workers can hold...
    assert ledger.max_outstanding <= capacity(cfg)
    # ...and the queues did fill up (the slow sink really pushed back all the way to the source)
    assert ledger.max_outstanding >= cfg.sink_queue + cfg.generation_queue
    sizes = {"generate": cfg.generation_queue, "prove": cfg.proof_queue, "sign": cfg.sign_queue,
             "sink": cfg.sink_queue}
    for sample in depths:
        for name, depth in sample.items():
            assert depth <= sizes[name]
    assert max(d["sink"] for d in depths) == cfg.sink_queue
    assert pipeline.times.max_depth.get("sink") == cfg.sink_queue


def test_one_in_flight_is_the_reference_method() -> None:
    """max_in_flight=1: the next problem enters only when the previous one reached the sink."""
    ledger = Ledger()
    cfg = PipelineConfig(max_in_flight=1, proof_pool=1)
    pipeline = Pipeline(InstantEngine(), InstantProver(), instant_sign, cfg)
    anyio.run(pipeline.run, ledger.source(12), SlowSink(ledger, 0.005))
    assert ledger.sunk == list(range(12))
    assert ledger.max_outstanding <= 2  # one in the pipeline, one waiting in the intake
