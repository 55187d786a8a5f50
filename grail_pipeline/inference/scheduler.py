"""The fast engine's slot scheduler: which slot holds which rollout, and when a group is done. Host state only.

Slots are handed out lowest index first (free slots are kept sorted), all of a group's rollouts at
once. The engine reads each decode step's tokens some steps after launching it (the lag), so a token
belongs to a slot's occupant only from the step the occupant was admitted at (`first_step`) on; what
the slot sampled before that was its previous occupant's, or nothing. A rollout ends at EOS or at its
limit (its target length, at most max_new_tokens); a group is finished once all its rollouts are.

`retire` runs once per decode step for every slot (512 on the benchmark), so it works on numpy arrays
over all slots and touches Python objects only for the rollouts that end.

A group can be preempted (`preempt`): when the paged KV cache runs out of pages, the engine gives the
youngest group's slots and pages back and admits its request again later, from its prompt. Its tokens so far
are dropped; steps already launched for its slots are read back as nobody's (the slots are free, or belong to
an occupant admitted at a later step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grail_pipeline.inference.engine import GroupRequest


@dataclass
class SlotGroup:
    """One admitted group: its slots (one per rollout, in the request's order) and the finished completions."""

    request: GroupRequest
    slots: list[int]
    started: float = 0.0  # set by the engine once the prompt is prefilled
    completions: dict[int, list[int]] = field(default_factory=dict)  # by slot

    @property
    def finished(self) -> bool:
        return len(self.completions) == len(self.slots)

    def ordered_completions(self) -> list[list[int]]:
        return [self.completions[slot] for slot in self.slots]


@dataclass
class Retired:
    """What one decode step's tokens did: counts for the stats, groups finished, slots freed."""

    tokens: int  # tokens that belonged to an occupant
    context: int  # their occupants' context lengths (prompt + completion so far), summed
    finished: list[SlotGroup]  # in the order their last rollout ended
    freed: list[int]  # ascending


class SlotScheduler:
    """Occupancy of `slots` decode slots for rollouts of up to `max_new_tokens` tokens."""

    def __init__(self, slots: int, max_new_tokens: int, eos_token_id: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.free = list(range(slots))  # kept sorted: lowest slot first
        self.owner: list[SlotGroup | None] = [None] * slots
        self.occupied = np.zeros(slots, dtype=bool)
        self.first_step = np.zeros(slots, dtype=np.int64)  # the first step whose token belongs to the occupant
        self.count = np.zeros(slots, dtype=np.int64)
        self.limit = np.zeros(slots, dtype=np.int64)
        self.prompt_len = np.zeros(slots, dtype=np.int64)
        self.out = np.zeros((slots, max_new_tokens), dtype=np.int64)
        self.groups: list[SlotGroup] = []  # admitted and not finished, oldest first

    @property
    def busy(self) -> bool:
        """Whether any slot holds a rollout."""
        return bool(self.occupied.any())

    @property
    def free_slots(self) -> int:
        return len(self.free)

    @property
    def occupied_slots(self) -> int:
        return int(self.occupied.sum())

    def admit(self, request: GroupRequest, step: int) -> SlotGroup:
        """Give a group the lowest free slots; its tokens count from decode step `step` on.

        The caller has checked there are enough free slots.
        """
        taken = [self.free.pop(0) for _ in range(request.num_samples)]
        group = SlotGroup(request, taken)
        self.prompt_len[taken] = len(request.prompt_ids)
        for slot, target in zip(taken, request.targets):
            self.owner[slot] = group
            self.first_step[slot] = step
            self.count[slot] = 0
            self.limit[slot] = min(target, self.max_new_tokens) if target else self.max_new_tokens
        self.occupied[taken] = True
        self.groups.append(group)
        return group

    def positions_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The occupied slots and the position decode step `step` writes for each: its prompt's last token's
        position plus the steps since its admission (the prefill wrote the positions before)."""
        idx = np.flatnonzero(self.occupied)
        return idx, self.prompt_len[idx] - 1 + (step - self.first_step[idx])

    def preempt(self, group: SlotGroup) -> tuple[list[int], int]:
        """Take a group's slots back before it finished (its request is admitted again later); returns the slots
        it still held and the tokens its rollouts had generated, now dropped."""
        held = [slot for slot in group.slots if self.owner[slot] is group]
        dropped = int(self.count[held].sum()) + sum(len(c) for c in group.completions.values())
        for slot in held:
            self.owner[slot] = None
        self.occupied[held] = False
        self.free.extend(held)
        self.free.sort()
        self.groups.remove(group)
        return held, dropped

    def retire(self, tokens: np.ndarray, step_index: int) -> Retired:
        """Append decode step `step_index`'s tokens [slots] to their occupants; end rollouts at EOS or the limit."""
        count = self.count
        idx = np.nonzero(self.occupied & (self.first_step <= step_index))[0]
        self.out[idx, count[idx]] = tokens[idx]
        count[idx] += 1
        context = int((self.prompt_len[idx] + count[idx]).sum())
        done = idx[(tokens[idx] == self.eos_token_id) | (count[idx] >= self.limit[idx])]
        if not len(done):
            return Retired(len(idx), context, [], [])
        self.occupied[done] = False
        finished = []
        freed = done.tolist()
        for slot in freed:
            group = self.owner[slot]
            self.owner[slot] = None
            group.completions[slot] = self.out[slot, : count[slot]].tolist()
            if group.finished:
                finished.append(group)
                self.groups.remove(group)
        self.free.extend(freed)
        self.free.sort()
        return Retired(len(idx), context, finished, freed)
