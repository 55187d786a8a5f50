"""The fast engine: continuous batching over a slot KV cache, one CUDA graph per decode step.

Every step advances all slots by one token on the device. The host never waits for the step it has
just launched: it reads the tokens of the step before (copied to pinned memory), appends them to each
slot's completion, retires finished rollouts and refills their slots with the next problem's prompt
(prefilled once, shared by its 16 rollouts). Slots are handed out lowest index first; a freed slot is
parked at position 0 so that until it is refilled its attention reads one key.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.engine import (
    EndOfRequests,
    Engine,
    GroupRequest,
    GroupResult,
    RequestFeed,
    SamplingParams,
)
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.inference.model_runner import SlotRunner
from grail_pipeline.protocol.profile import PROFILE

log = logging.getLogger("grail_pipeline")


@dataclass
class _Group:
    request: GroupRequest
    slots: list[int]
    started: float
    completions: dict[int, list[int]] = field(default_factory=dict)


@contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """The interpreter's thread switch interval set to `seconds` for a while, then put back.

    The host loop gives up the interpreter lock inside every CUDA call and must take it back. While
    another thread runs Python (the proof forward, signing), CPython makes the waiter wait a whole
    switch interval (5 ms by default) before it asks the holder to let go: a few of those per 5 ms
    decode step leave the GPU idle.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class _StepGraph:
    """`runner.step` captured once as a CUDA graph (or called directly off the GPU)."""

    def __init__(self, runner: SlotRunner, use_graph: bool, warmup_steps: int = 3) -> None:
        self.runner = runner
        self.graph: torch.cuda.CUDAGraph | None = None
        if not use_graph:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup_steps):  # compiles, autotunes and loads every kernel outside the capture
                runner.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            runner.step()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.runner.step()
        self.graph.replay()
        return self.runner.next_tokens


class FastEngine(Engine):
    """Continuous batching of many problems' rollouts in `slots` decode slots."""

    name = "fast"

    def __init__(self, loaded: LoadedModel, sampling: SamplingParams, slots: int, max_prompt_tokens: int = 512,
                 compile_step: bool | None = None, cuda_graphs: bool | None = None, lag: int = 3,
                 switch_seconds: float = 2e-4) -> None:
        super().__init__()
        on_gpu = loaded.device.type == "cuda"
        self.sampling = sampling
        self.slots = slots
        self.max_prompt_tokens = max_prompt_tokens
        self.max_len = max_prompt_tokens + sampling.max_new_tokens
        t0 = time.perf_counter()
        self.runner = SlotRunner(loaded.model, sampling, slots, self.max_len,
                                 compile_step=on_gpu if compile_step is None else compile_step)
        self._graph = _StepGraph(self.runner, use_graph=on_gpu if cuda_graphs is None else cuda_graphs)
        if self._graph.graph is not None:
            self.runner.capture_prefills(PROFILE.rollouts_per_problem, max_prompt_tokens)
        self.startup_seconds = time.perf_counter() - t0
        # steps in flight ahead of the host: the GPU stays fed while the host waits for the interpreter lock
        self.lag = lag
        self.switch_seconds = switch_seconds
        self._pinned = [torch.zeros(slots, dtype=torch.long, pin_memory=on_gpu) for _ in range(self.lag + 1)]
        self._events = [torch.cuda.Event() if on_gpu else None for _ in range(self.lag + 1)]

    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        with switch_interval(self.switch_seconds):
            self._run(feed, emit)

    def _run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        s = self.slots
        free = list(range(s))  # kept sorted: lowest slot first
        owner: list[_Group | None] = [None] * s
        occupied = np.zeros(s, dtype=bool)
        first_step = np.zeros(s, dtype=np.int64)  # the first step whose token belongs to the occupant
        count = np.zeros(s, dtype=np.int64)
        limit = np.zeros(s, dtype=np.int64)
        prompt_len = np.zeros(s, dtype=np.int64)
        out = np.zeros((s, self.sampling.max_new_tokens), dtype=np.int64)
        eos = self.sampling.eos_token_id
        waiting: GroupRequest | None = None
        feed_open = True
        step = 0
        pending: deque[int] = deque()  # launched steps whose tokens are not read yet, oldest first
        ring = len(self._pinned)

        def admit(request: GroupRequest) -> None:
            taken = [free.pop(0) for _ in range(request.num_samples)]
            targets = [t or 0 for t in request.targets]
            t0 = time.perf_counter()
            self.runner.admit(request.prompt_ids, taken, targets)
            self.stats.prefill_seconds += time.perf_counter() - t0
            group = _Group(request, taken, time.perf_counter())
            prompt_len[taken] = len(request.prompt_ids)
            for slot, target in zip(taken, targets):
                owner[slot] = group
                first_step[slot] = step
                count[slot] = 0
                limit[slot] = min(target, self.sampling.max_new_tokens) if target else self.sampling.max_new_tokens
            occupied[taken] = True

        def retire(tokens: np.ndarray, step_index: int) -> None:
            idx = np.nonzero(occupied & (first_step <= step_index))[0]
            out[idx, count[idx]] = tokens[idx]
            count[idx] += 1
            self.stats.generated_tokens += len(idx)
            self.stats.occupied_slot_steps += len(idx)
            self.stats.context_tokens += int((prompt_len[idx] + count[idx]).sum())
            done = idx[(tokens[idx] == eos) | (count[idx] >= limit[idx])]
            if not len(done):
                return
            occupied[done] = False
            for slot in done.tolist():
                group = owner[slot]
                owner[slot] = None
                group.completions[slot] = out[slot, : count[slot]].tolist()
                if len(group.completions) == len(group.slots):
                    emit(GroupResult(group.request, [group.completions[i] for i in group.slots],
                                     seconds=time.perf_counter() - group.started))
            self.runner.release(done.tolist())
            free.extend(done.tolist())
            free.sort()

        while True:
            while True:  # admit as many waiting groups as there are free slots for
                idle = not occupied.any() and not pending
                if waiting is None and feed_open:
                    try:
                        waiting = feed.next(wait=idle)
                    except EndOfRequests:
                        feed_open = False
                    if waiting is not None:
                        self._check(waiting)
                if waiting is None or len(free) < waiting.num_samples:
                    break
                admit(waiting)
                waiting = None
            if not occupied.any() and not pending:
                if not feed_open and waiting is None:
                    return
                continue
            t0 = time.perf_counter()
            if occupied.any():
                tokens = self._graph()
                self._pinned[step % ring].copy_(tokens, non_blocking=True)
                if self._events[step % ring] is not None:
                    self._events[step % ring].record()
                pending.append(step)
                step += 1
                self.stats.decode_steps += 1
                self.stats.slot_steps += s
            while pending and (len(pending) > self.lag or not occupied.any()):
                oldest = pending.popleft()
                if self._events[oldest % ring] is not None:
                    self._events[oldest % ring].synchronize()
                retire(self._pinned[oldest % ring].numpy(), oldest)
            self.stats.decode_seconds += time.perf_counter() - t0

    def _check(self, request: GroupRequest) -> None:
        if request.num_samples > self.slots:
            raise UserError(f"a group of {request.num_samples} rollouts needs at least that many slots "
                            f"(--batch-sizes {request.num_samples} or more)")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise UserError(f"a prompt of {len(request.prompt_ids)} tokens exceeds the fast engine's limit "
                            f"of {self.max_prompt_tokens}")
