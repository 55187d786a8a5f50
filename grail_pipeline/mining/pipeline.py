"""The mining pipeline: problems → generation (GPU) → proof forward (GPU) → scoring and signing (CPU) → sink.

Each stage is an anyio task joined to the next by a bounded memory object stream, so a slow stage
throttles the ones before it instead of filling memory. The engine and the prover each run in one
long-lived worker thread (compiled CUDA graphs are bound to the thread that recorded them); scoring
and sr25519 signing run in a small thread pool, whose threads hand each group to a worker process on
the GPU (Runtime.group_signer). The benchmark, the calibration and the daemon all run
this same pipeline. A run ends when its task source ends: everything already taken in is finished
and handed to the sink, which is how a stop signal drains in-flight work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from grail_pipeline.inference.engine import EndOfRequests, Engine, GroupRequest, GroupResult
from grail_pipeline.mining.messages import ProblemTask, ProvedGroup, SignedGroup
from grail_pipeline.proving.proofs import ProofJob, Prover


@dataclass(frozen=True)
class PipelineConfig:
    """Queue sizes and parallelism; `max_in_flight=1` is the reference method (nothing overlapped)."""

    generation_queue: int = 4
    proof_queue: int = 8
    sign_queue: int = 8
    sink_queue: int = 16
    sign_workers: int = 4
    proof_pool: int = 8  # groups proved together when they are waiting (fewer pads, bigger batches)
    max_in_flight: int | None = None


class GroupSink(Protocol):
    async def put(self, group: SignedGroup) -> None:
        """Take one finished group (dropped groups included)."""


@dataclass
class StageTimes:
    """Busy seconds of the host-side stages and the deepest each queue got, for the per-window and benchmark reports."""

    intake: float = 0.0
    prove: float = 0.0
    sign: float = 0.0
    sink: float = 0.0
    rollouts: int = 0  # signed and handed to the sink (the metrics' rollouts per second)
    max_depth: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # interpreter CPU seconds per stage's threads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_cpu(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 4) for k in ("intake", "prove", "sign", "sink")}


class GpuIdle:
    """Seconds in which no group was on the GPU side (queued for generation, generating, or waiting for or in
    its proof): the time the deadline plan leaves the GPU without work, reported per window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups = 0
        self._idle = 0.0
        self._since: float | None = time.perf_counter()

    def enter(self) -> None:
        with self._lock:
            if self._groups == 0 and self._since is not None:
                self._idle += time.perf_counter() - self._since
                self._since = None
            self._groups += 1

    def leave(self, count: int = 1) -> None:
        with self._lock:
            self._groups -= count
            if self._groups == 0:
                self._since = time.perf_counter()

    @property
    def groups(self) -> int:
        """Groups on the GPU side now (0: nothing of a window is generating or proving)."""
        with self._lock:
            return self._groups

    def seconds(self) -> float:
        """Idle seconds so far, the current stretch included."""
        with self._lock:
            now = time.perf_counter()
            return self._idle + (now - self._since if self._since is not None else 0.0)


class _StreamFeed:
    """The engine's view of the generation queue, called from the engine's worker thread."""

    def __init__(self, receive: ObjectReceiveStream[ProblemTask]) -> None:
        self._receive = receive

    def next(self, wait: bool) -> GroupRequest | None:
        try:
            if wait:
                task = anyio.from_thread.run(self._receive.receive)
            else:
                task = anyio.from_thread.run_sync(self._receive.receive_nowait)
        except anyio.WouldBlock:
            return None
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise EndOfRequests from None
        return GroupRequest(key=task, prompt_ids=task.prompt_ids, targets=task.targets)


class Pipeline:
    """Runs problem tasks through engine, prover and signer into a sink."""

    def __init__(self, engine: Engine, prover: Prover, sign: Callable[[ProvedGroup], SignedGroup],
                 config: PipelineConfig = PipelineConfig()) -> None:
        self.engine = engine
        self.prover = prover
        self.sign = sign
        self.config = config
        self.times = StageTimes()
        self.idle = GpuIdle()
        self._streams: dict[str, ObjectSendStream] = {}

    def stage_seconds(self) -> dict[str, float]:
        """Busy seconds per stage; generation is the engine's own GPU time (prefill and decode)."""
        gen = self.engine.stats.decode_seconds + self.engine.stats.prefill_seconds
        return {"generate": round(gen, 4), **self.times.as_dict()}

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in front of each stage right now."""
        return {name: s.statistics().current_buffer_used for name, s in self._streams.items()}

    async def run(self, tasks: AsyncIterable[ProblemTask], sink: GroupSink) -> None:
        cfg = self.config
        gen_send, gen_recv = anyio.create_memory_object_stream[ProblemTask](cfg.generation_queue)
        proof_send, proof_recv = anyio.create_memory_object_stream[GroupResult](cfg.proof_queue)
        sign_send, sign_recv = anyio.create_memory_object_stream[ProvedGroup](cfg.sign_queue)
        sink_send, sink_recv = anyio.create_memory_object_stream[SignedGroup](cfg.sink_queue)
        self._streams = {"generate": gen_send, "prove": proof_send, "sign": sign_send, "sink": sink_send}
        in_flight = anyio.Semaphore(cfg.max_in_flight) if cfg.max_in_flight else None
        cpu = anyio.CapacityLimiter(cfg.sign_workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._intake, tasks, gen_send, in_flight)
            tg.start_soon(self._generation, gen_recv, proof_send)
            tg.start_soon(self._proving, proof_recv, sign_send)
            async with sign_recv, sink_send:
                for _ in range(cfg.sign_workers):
                    tg.start_soon(self._signing, sign_recv.clone(), sink_send.clone(), cpu)
            tg.start_soon(self._sinking, sink_recv, sink, in_flight)

    async def _intake(self, tasks: AsyncIterable[ProblemTask], send: ObjectSendStream[ProblemTask],
                      in_flight: anyio.Semaphore | None) -> None:
        async with send:
            async for task in tasks:
                t0 = time.perf_counter()
                if in_flight is not None:
                    await in_flight.acquire()
                self.idle.enter()
                await send.send(task)
                self.times.intake += time.perf_counter() - t0
                self._note_depth("generate", send)

    async def _generation(self, receive: ObjectReceiveStream[ProblemTask],
                          send: ObjectSendStream[GroupResult]) -> None:
        def emit(result: GroupResult) -> None:
            anyio.from_thread.run(send.send, result)
            self._note_depth("prove", send)

        def work() -> None:
            cpu = time.thread_time()
            try:
                self.engine.run(_StreamFeed(receive), emit)
            finally:
                self.times.add_cpu("generate", time.thread_time() - cpu)

        async with receive, send:
            await anyio.to_thread.run_sync(work)

    async def _proving(self, receive: ObjectReceiveStream[GroupResult],
                       send: ObjectSendStream[ProvedGroup]) -> None:
        def take() -> list[GroupResult] | None:
            """The next group, plus whatever else is already waiting (up to proof_pool in all)."""
            try:
                results = [anyio.from_thread.run(receive.receive)]
            except anyio.EndOfStream:
                return None
            while len(results) < self.config.proof_pool:
                try:
                    results.append(anyio.from_thread.run_sync(receive.receive_nowait))
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            return results

        def work() -> None:
            cpu = time.thread_time()
            try:
                prove_all()
            finally:
                self.times.add_cpu("prove", time.thread_time() - cpu)

        def prove_all() -> None:
            while (results := take()) is not None:
                tasks: list[ProblemTask] = [r.request.key for r in results]
                t0 = time.perf_counter()
                proofs = self.prover.prove_many(
                    [ProofJob(t.prompt_ids, r.completions, t.window.randomness) for t, r in zip(tasks, results)])
                seconds = time.perf_counter() - t0
                self.times.prove += seconds
                self.idle.leave(len(results))
                for task, result, group_proofs in zip(tasks, results, proofs):
                    proved = ProvedGroup(task, result.completions, group_proofs, result.seconds, seconds / len(results))
                    anyio.from_thread.run(send.send, proved)
                    self._note_depth("sign", send)

        async with receive, send:
            await anyio.to_thread.run_sync(work)

    async def _signing(self, receive: ObjectReceiveStream[ProvedGroup], send: ObjectSendStream[SignedGroup],
                       cpu: anyio.CapacityLimiter) -> None:
        async with receive, send:
            async for group in receive:
                signed = await anyio.to_thread.run_sync(self._sign_timed, group, limiter=cpu)
                self.times.sign += signed.sign_seconds
                await send.send(signed)
                self._note_depth("sink", send)

    def _sign_timed(self, group: ProvedGroup) -> SignedGroup:
        cpu = time.thread_time()
        try:
            return self.sign(group)
        finally:
            self.times.add_cpu("sign", time.thread_time() - cpu)

    async def _sinking(self, receive: ObjectReceiveStream[SignedGroup], sink: GroupSink,
                       in_flight: anyio.Semaphore | None) -> None:
        async with receive:
            async for group in receive:
                t0 = time.perf_counter()
                await sink.put(group)
                self.times.sink += time.perf_counter() - t0
                self.times.rollouts += group.rollouts
                if in_flight is not None:
                    in_flight.release()

    def _note_depth(self, name: str, stream: ObjectSendStream) -> None:
        depth = stream.statistics().current_buffer_used
        if depth > self.times.max_depth.get(name, 0):
            self.times.max_depth[name] = depth
