"""The fast engine: continuous batching over a slot KV cache, one CUDA graph per decode step.

Every step advances all slots by one token on the device. The host never waits for the step it has
just launched: it reads the tokens of the step before (copied to pinned memory), appends them to each
slot's completion, retires finished rollouts and refills their slots with the next problem's prompt
(prefilled once, shared by its 16 rollouts). Slots are handed out lowest index first; a freed slot is
parked at position 0 so that until it is refilled its attention reads one key.

The KV cache is paged (kv_cache.py): a slot takes pages as its sequence grows (kv_pages.py), before the step
that writes into them. With `kv_cache_gb` None there are pages for every slot's longest sequence, and nothing can
run out. With fewer (more slots in the same memory, which W2 and a 24-GB card need; the commands' default,
`--kv-cache-gb auto`, sizes them from the workload: mining/kv_sizing.py), a group is admitted
only while its prompt's pages and a watermark (1 % of the pages) are free, and when a step's pages run out the
youngest group is preempted: its slots and pages go back and its request is admitted again, before any new one,
from its prompt (`stats.preemptions` counts them; its sampled tokens are dropped, so a rerun samples anew,
which any sample may: the validator checks a proof against the completion it is given).

With `shared_prompt_attention`, the groups whose slots share prompt pages are kept beside the page pool
(prompt_groups.py) and uploaded before a step when they change, so that the decode attention reads those pages
once per group (decode_attention.SharedPrompts).

This file is the loop alone: which slot holds what is the scheduler's (scheduler.py, host state only),
the decoding is the runner's (model_runner.py, device state, its CUDA graphs in cuda_graphs.py).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
from grail_pipeline.inference.kv_cache import PAGE, cache_pages, full_pages, pages_for, positions_per_slot
from grail_pipeline.inference.kv_pages import PagePool
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.inference.memory import Component, DeviceMemory
from grail_pipeline.inference.model_runner import SlotRunner
from grail_pipeline.inference.prompt_groups import PromptGroups
from grail_pipeline.inference.scheduler import SlotScheduler
from grail_pipeline.protocol.profile import PROFILE


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


class FastEngine(Engine):
    """Continuous batching of many problems' rollouts in `slots` decode slots."""

    name = "fast"

    def __init__(self, loaded: LoadedModel, sampling: SamplingParams, slots: int, max_prompt_tokens: int = 512,
                 compile_step: bool | None = None, cuda_graphs: bool | None = None, lag: int = 3,
                 switch_seconds: float = 2e-4, kv_cache_gb: float | None = None,
                 shared_prompt_attention: bool = False) -> None:
        super().__init__()
        on_gpu = loaded.device.type == "cuda"
        self.sampling = sampling
        self.slots = slots
        self.max_prompt_tokens = max_prompt_tokens
        self.max_len = positions_per_slot(max_prompt_tokens, sampling.max_new_tokens)
        self.kv_pages = cache_pages(loaded.model.config, loaded.dtype.itemsize, slots, self.max_len, kv_cache_gb)
        self.full_kv = self.kv_pages == full_pages(slots, self.max_len)
        t0 = time.perf_counter()
        meter = DeviceMemory(loaded.device)
        with meter.phase("state") as state:
            # the most pages a prompt fills whole: what a group's entry holds (decode_attention.SharedPrompts)
            self.max_shared = PagePool.prompt_pages(max_prompt_tokens)[0] if shared_prompt_attention else 0
            self.runner = SlotRunner(loaded.model, sampling, slots, self.max_len, self.kv_pages,
                                     compile_step=on_gpu if compile_step is None else compile_step,
                                     shared_prompt_pages=self.max_shared)
        if cuda_graphs is None:
            cuda_graphs = on_gpu
        with meter.phase("graphs") as graphs:
            if cuda_graphs:
                self.runner.capture_graphs(PROFILE.rollouts_per_problem, max_prompt_tokens)
        self.startup_seconds = time.perf_counter() - t0
        self.memory = self._memory(state, graphs)
        # steps in flight ahead of the host: the GPU stays fed while the host waits for the interpreter lock
        self.lag = lag
        self.switch_seconds = switch_seconds
        self._pinned = [torch.zeros(slots, dtype=torch.long, pin_memory=on_gpu) for _ in range(self.lag + 1)]
        # each step's active slots, uploaded behind the steps in flight: a buffer is reused only once its step ran
        self._active = [torch.zeros(slots, dtype=torch.long, pin_memory=on_gpu) for _ in range(self.lag + 1)]
        self._events = [torch.cuda.Event() if on_gpu else None for _ in range(self.lag + 1)]

    def _memory(self, state, graphs) -> list[Component]:
        """What the engine holds: the KV cache and the runner's other buffers (exact, from their tensors; on
        the GPU the allocator's delta over the runner's creation is beside them), and the graphs' pool."""
        kv = self.runner.kv.nbytes
        buffers = self.runner.buffer_bytes()
        held = (f"every slot's longest sequence: {self.slots} slots x {self.max_len} positions (prompt limit + max "
                f"new tokens - 1), in pages of {PAGE}" if self.full_kv else
                f"{self.kv_pages} pages of {PAGE} positions for {self.slots} slots, held by use (--kv-cache-gb)")
        out = [Component("kv_cache", kv, "exact", held),
               Component("sampler_buffers", buffers, "exact",
                         "the runner's per-slot state: token ids, positions, targets, seen-token mask [slots, vocab]")]
        if state.measured:
            out.append(Component("engine_state_allocated", state.allocated_delta, "measured",
                                 "allocator delta over the runner's creation (KV cache + buffers + rotary tables)"))
        if graphs.measured:
            out.append(Component("graph_pools", graphs.reserved_delta, "measured",
                                 "memory reserved by compiling and capturing the decode step and prefill graphs "
                                 "(their one pool: every temporary of a step, logits included)"))
        else:
            out.append(Component("step_logits", self.runner.step_logits_bytes(), "computed",
                                 "the decode step's logits [slots, vocab] in float32, allocated per step off the GPU"))
        return out

    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        with switch_interval(self.switch_seconds):
            self._run(feed, emit)

    def _run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        scheduler = SlotScheduler(self.slots, self.sampling.max_new_tokens, self.sampling.eos_token_id)
        self._pages = PagePool(self.kv_pages, self.slots, pages_for(self.max_len))
        self._groups = PromptGroups(self.slots, self.max_shared) if self.runner.shared is not None else None
        again: deque[GroupRequest] = deque()  # preempted groups' requests, oldest first: admitted before new ones
        waiting: GroupRequest | None = None
        feed_open = True
        step = 0
        pending: deque[int] = deque()  # launched steps whose tokens are not read yet, oldest first
        ring = len(self._pinned)
        while True:
            while True:  # admit as many waiting groups as there are free slots for
                idle = not scheduler.busy and not pending
                if waiting is None and again:
                    waiting = again.popleft()
                if waiting is None and feed_open:
                    try:
                        waiting = feed.next(wait=idle)
                    except EndOfRequests:
                        feed_open = False
                    if waiting is not None:
                        self._check(waiting)
                if waiting is None or scheduler.free_slots < waiting.num_samples or not self._admit(scheduler,
                                                                                                     waiting, step):
                    break
                waiting = None
            if not scheduler.busy and not pending:
                if not feed_open and waiting is None:
                    return
                continue
            t0 = time.perf_counter()
            if scheduler.busy:
                self._grow(scheduler, step, again)
                width = self._activate(scheduler, self._active[step % ring])
                if self._groups is not None and self._groups.dirty:
                    self.runner.set_shared_prompts(self._groups)
                tokens = self.runner.step(width)
                self._pinned[step % ring].copy_(tokens, non_blocking=True)
                if self._events[step % ring] is not None:
                    self._events[step % ring].record()
                pending.append(step)
                step += 1
                self.stats.decode_steps += 1
                self.stats.slot_steps += self.slots
                self.stats.computed_slot_steps += width
            while pending and (len(pending) > self.lag or not scheduler.busy):
                oldest = pending.popleft()
                if self._events[oldest % ring] is not None:
                    self._events[oldest % ring].synchronize()
                self._retire(scheduler, self._pinned[oldest % ring].numpy(), oldest, emit)
            self.stats.decode_seconds += time.perf_counter() - t0

    def _activate(self, scheduler: SlotScheduler, buffer: torch.Tensor) -> int:
        """The next step's width and slots: every occupied slot, then free ones up to the narrowest width that
        holds them (model_runner.py: rows cost the same occupied or not)."""
        occupied = np.flatnonzero(scheduler.occupied)
        width = self.runner.width_for(len(occupied))
        if width == self.slots:
            return width  # every slot: the full width's list never changes
        chosen = buffer.numpy()[:width]
        chosen[:len(occupied)] = occupied
        chosen[len(occupied):] = scheduler.free[:width - len(occupied)]
        self.runner.set_active(buffer[:width])
        return width

    def _admit(self, scheduler: SlotScheduler, request: GroupRequest, step: int) -> bool:
        """The group into the lowest free slots, its prompt's pages taken and its prompt prefilled; its tokens
        count from `step` on. False, with nothing done, while the pages it needs and the watermark are not free."""
        prompt_pages = self._pages.admission_pages(request.num_samples, len(request.prompt_ids))
        watermark = 0 if self.full_kv else -(-self.kv_pages // 100)  # a full cache never runs out: no margin
        if prompt_pages + watermark > self._pages.available:
            return False
        group = scheduler.admit(request, step)
        t0 = time.perf_counter()
        self.runner.set_pages(self._pages.admit(group.slots, len(request.prompt_ids)))
        if self._groups is not None:  # the pages its prompt fills whole, which every slot's row begins with
            shared = PagePool.prompt_pages(len(request.prompt_ids))[0]
            self._groups.admit(group.slots, self._pages.table[group.slots[0], :shared].tolist())
        self.runner.admit(request.prompt_ids, group.slots, [t or 0 for t in request.targets])
        group.started = time.perf_counter()
        self.stats.prefill_seconds += group.started - t0
        return True

    def _grow(self, scheduler: SlotScheduler, step: int, again: deque[GroupRequest]) -> None:
        """Pages for the position step `step` writes in every occupied slot; where they run out, the youngest
        group is preempted (its request to `again`, in front of those preempted before it) until they do not."""
        while True:
            slots, positions = scheduler.positions_at(step)
            changes = self._pages.grow(slots, np.minimum(positions, self.max_len - 1))
            if changes is not None:
                self.runner.set_pages(changes)
                held = self.kv_pages - 1 - self._pages.available
                self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, held)
                return
            victim = scheduler.groups[-1]
            freed, dropped = scheduler.preempt(victim)
            self._free(freed)
            again.appendleft(victim.request)
            self.stats.preemptions += 1
            self.stats.preempted_tokens += dropped
            self.stats.generated_tokens -= dropped

    def _free(self, slots: list[int]) -> None:
        """Slots given back: their pages to the pool (and their groups' shared reading), the slots parked."""
        if self._groups is not None:
            self._groups.release(slots)
        self.runner.set_pages(self._pages.release(slots))
        self.runner.release(slots)

    def _retire(self, scheduler: SlotScheduler, tokens: np.ndarray, step_index: int,
                emit: Callable[[GroupResult], None]) -> None:
        """One step's tokens to their rollouts: finished groups emitted, their slots parked for the next."""
        retired = scheduler.retire(tokens, step_index)
        self.stats.generated_tokens += retired.tokens
        self.stats.occupied_slot_steps += retired.tokens
        self.stats.context_tokens += retired.context
        for group in retired.finished:
            emit(GroupResult(group.request, group.ordered_completions(), seconds=time.perf_counter() - group.started))
        if retired.freed:
            self._free(retired.freed)

    def _check(self, request: GroupRequest) -> None:
        if request.num_samples > self.slots:
            raise UserError(f"a group of {request.num_samples} rollouts needs at least that many slots "
                            f"(--batch-sizes {request.num_samples} or more)")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise UserError(f"a prompt of {len(request.prompt_ids)} tokens exceeds the fast engine's limit "
                            f"of {self.max_prompt_tokens}")

