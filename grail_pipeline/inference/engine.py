"""The small interface every generation engine implements.

An engine pulls groups of identical prompts (one SAT problem, 16 rollouts) from a feed and hands
back each group once all its completions are done. Pulling lets a continuous-batching engine take
new groups exactly when it has free slots, and lets the reference engine take one at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from grail_pipeline.protocol.profile import PROFILE


@dataclass(frozen=True)
class SamplingParams:
    """The miner's sampling settings plus the token ids an engine needs."""

    eos_token_id: int
    pad_token_id: int
    temperature: float = PROFILE.sampling.temperature
    top_p: float = PROFILE.sampling.top_p
    top_k: int = PROFILE.sampling.top_k
    repetition_penalty: float = PROFILE.sampling.repetition_penalty
    max_new_tokens: int = PROFILE.sampling.max_new_tokens


@dataclass
class GroupRequest:
    """One problem's prompt and a target length per rollout (None: the model decides)."""

    key: Any
    prompt_ids: list[int]
    targets: list[int | None]

    @property
    def num_samples(self) -> int:
        return len(self.targets)


@dataclass
class GroupResult:
    """The completions of one group, each ending in EOS unless it hit max_new_tokens."""

    request: GroupRequest
    completions: list[list[int]]
    seconds: float = 0.0  # wall time from admission to the last completion


class EndOfRequests(Exception):
    """The feed is closed and drained: the engine finishes what it holds and returns."""


class RequestFeed(Protocol):
    def next(self, wait: bool) -> GroupRequest | None:
        """The next group; None if none is ready and `wait` is False; EndOfRequests when closed."""


class ListFeed:
    """A feed over a fixed list (tests, warm-up)."""

    def __init__(self, requests: Iterable[GroupRequest]) -> None:
        self._items = list(requests)

    def next(self, wait: bool) -> GroupRequest | None:
        if not self._items:
            raise EndOfRequests
        return self._items.pop(0)


@dataclass
class EngineStats:
    """Counters an engine keeps for the benchmark's report."""

    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    occupied_slot_steps: int = 0  # sum over decode steps of active sequences
    slot_steps: int = 0  # sum over decode steps of the batch size (slots)
    computed_slot_steps: int = 0  # sum over decode steps of the rows computed (the fast engine's decode width)
    context_tokens: int = 0  # sum over occupied slot-steps of the context attended (KV read)
    preemptions: int = 0  # groups the fast engine took back for want of KV pages, to run again from their prompt
    preempted_tokens: int = 0  # tokens those groups had generated, dropped (occupied slot-steps count them)
    peak_kv_pages: int = 0  # most KV pages held at once (the fast engine's paged cache)

    @property
    def occupancy(self) -> float:
        return self.occupied_slot_steps / self.slot_steps if self.slot_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "generated_tokens": self.generated_tokens,
            "decode_steps": self.decode_steps,
            "decode_seconds": round(self.decode_seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "batch_occupancy": round(self.occupancy, 4),
            "step_ms": round(1000 * self.decode_seconds / self.decode_steps, 3) if self.decode_steps else 0.0,
            "mean_context": round(self.context_tokens / self.occupied_slot_steps, 1) if self.occupied_slot_steps else 0.0,
            "computed_rows_share": (round(self.computed_slot_steps / self.slot_steps, 4)
                                    if self.slot_steps and self.computed_slot_steps else 1.0),
            "preemptions": self.preemptions,
            "preempted_tokens": self.preempted_tokens,
            "peak_kv_pages": self.peak_kv_pages,
        }


class Engine(ABC):
    """Generates completions for groups pulled from a feed."""

    name: str = "base"

    def __init__(self) -> None:
        self.stats = EngineStats()

    @abstractmethod
    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        """Pull groups until the feed ends; call `emit` for each finished group."""

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def generate(self, requests: Iterable[GroupRequest]) -> list[GroupResult]:
        """Run a fixed list of groups to completion (results in completion order)."""
        results: list[GroupResult] = []
        self.run(ListFeed(requests), results.append)
        return results


class OneGroupEngine(Engine):
    """An engine that finishes each group before it takes the next (the reference method's shape)."""

    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        while True:
            try:
                request = feed.next(wait=True)
            except EndOfRequests:
                return
            if request is not None:
                emit(self.generate_group(request))

    @abstractmethod
    def generate_group(self, request: GroupRequest) -> GroupResult:
        """All completions of one group."""
