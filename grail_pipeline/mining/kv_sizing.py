"""How much KV cache a batch size needs, from the workload: `--kv-cache-gb auto`.

The paged cache (inference/kv_cache.py) holds, per occupied slot, the pages of its own tokens (from the page
its prompt ends in up to its current position) and a sixteenth of its group's shared prompt pages, for as long
as the group lives. Averaged over slot-time, what a slot holds is a property of the workload: the prompts'
lengths (the SAT chat, tokenized) and the completions' (the length profile). `kv_demand` computes it exactly
for a sample of groups drawn as the miner draws them; a batch size B then gets B times that, with a margin
(`MARGIN`) for the moments many long rollouts are in flight together, and never less than one group at its
longest (the engine's floor) nor more than every slot's longest sequence (which never runs out).

W1 (prompts 208–283 tokens, mean 239, over the first 64 problems; completions lognormal median 400): 5.77 pages
per slot, against the 24 a slot reserves at the default prompt limit (512 + 1,024 positions); at 512 slots,
with the margin, a 3B-model cache of 8.7 GB instead of 29 (measured on the CPU from the real tokenizer). A page too few costs a preemption (the youngest group reruns, `preemptions` in the engine's report),
not a wrong rollout. Natural lengths (real weights, stopping at EOS) have no profile to size from: `auto`
then keeps every slot's longest sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from grail_pipeline.inference.kv_cache import PAGE, full_pages, page_bytes, pages_for
from grail_pipeline.inference.kv_pages import PagePool
from grail_pipeline.inference.memory import GB
from grail_pipeline.inference.models.decoder import Dims
from grail_pipeline.mining.lengths import LengthProfile
from grail_pipeline.protocol.profile import PROFILE

MARGIN = 1.25  # pages over the mean slot-time demand; at 128+ slots the spread of their sum is a few per cent
SAMPLE_GROUPS = 64  # problems whose prompts are tokenized to size from (~0.1 s)


@dataclass(frozen=True)
class KVDemand:
    """Pages an occupied slot holds on average over slot-time (its own and its share of its group's prompt)."""

    pages_per_slot: float

    def pages(self, slots: int, max_len: int) -> int:
        """The cache for `slots` slots: the demand with its margin, within [one group at its longest, full]."""
        least = min(slots, PROFILE.rollouts_per_problem) * pages_for(max_len) + 1
        wanted = math.ceil(MARGIN * slots * self.pages_per_slot) + 1
        return min(full_pages(slots, max_len), max(least, wanted))


def kv_demand(prompt_lengths: list[int], lengths: LengthProfile, seed: int = 0) -> KVDemand | None:
    """The demand of groups with these prompts (tokens, one per group) and completions drawn from `lengths`
    (None for natural lengths: nothing to size from).

    A rollout whose prompt ends at position n (its last token, written by the first decode step) holds, at
    its k-th step, its own pages from the one holding n to the one holding n + k; its group holds the n // PAGE
    pages before that once, while the group's longest rollout runs."""
    if lengths.kind == "natural":
        return None
    held = steps = 0.0
    for g, tokens in enumerate(prompt_lengths):
        n, shared = tokens - 1, PagePool.prompt_pages(tokens)[0]
        targets = np.array(lengths.targets(seed + g, PROFILE.rollouts_per_problem), dtype=np.int64)
        for length in targets.tolist():
            k = np.arange(length)
            held += float(((n + k) // PAGE - n // PAGE + 1).sum())
        held += shared * int(targets.max())
        steps += int(targets.sum())
    return KVDemand(held / steps)


def kv_cache_gb(demand: KVDemand | None, config, dtype_bytes: int, slots: int, max_len: int) -> float | None:
    """`auto`'s cache in GB for `slots` slots (None, every slot's longest sequence, without a demand); half a page
    over the pages, so that the engine's whole-page count from GB gives them back exactly."""
    if demand is None:
        return None
    dims = Dims.of(config)
    page = page_bytes(config.num_hidden_layers, dims.kv_heads, dims.head_dim, dtype_bytes)
    return (demand.pages(slots, max_len) + 0.5) * page / GB
