"""The fast engine's KV cache: pages of keys and values, handed to slots as their sequences grow.

K and V are [layers, pages, PAGE, kv_heads, head_dim], allocated once at start-up. A slot's sequence lives in
the pages its row of `table` ([slots, pages_per_slot], on the device) names: position p of slot s is row
p % PAGE of page table[s, p // PAGE]. Which pages a slot holds is host state (kv_pages.py); the table is its
device copy, which the decode step's graph and the prefill graphs read.

Why pages (issue #21): a slot row held every slot's longest possible sequence (prompt limit + 1,024 new tokens)
while W1's mean context is ~530 and its prompts ~100: at 512 slots 29 GB of the cache (3B preset) was mostly
never written, and W2 (4× the bytes per token) peaked at 103 GB at 256 slots. Pages held by use let the same
memory hold two to three times the slots, which W2 and a 24-GB card need most. With as many pages as every
slot's longest sequence (`full_pages`, the default) nothing changes but the addressing.

Page 0 is the scratch page: every table entry a slot does not hold names it. Rows a step computes for a free
slot (the decode widths top the occupied slots up with free ones) and prefill padding past a slot's pages write
there, and nothing reads it: attention reads a slot's keys only up to its length, all within pages it holds.
What a page's previous holder left past the new holder's length is likewise never read.

A page is as long as the prefill's alignment and the attention kernel's block (64 positions): a prefill width
fills whole pages, the kernel reads one page per block, and a sequence wastes at most 63 positions (~6 % of
W1's mean context).
"""

from __future__ import annotations

import torch

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.memory import GB
from grail_pipeline.inference.models.decoder import Dims
from grail_pipeline.protocol.profile import PROFILE

PAGE = 64  # positions per page: the prefill's alignment (model_runner.PREFILL_ALIGN) and the kernel's block
SCRATCH_PAGE = 0


def positions_per_slot(max_prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions one slot can need: the prompt limit plus the new tokens, less the last (sampled, never written)."""
    return max_prompt_tokens + max_new_tokens - 1


def pages_for(positions: int) -> int:
    """Pages that hold `positions` positions."""
    return -(-positions // PAGE)


def full_pages(slots: int, max_len: int) -> int:
    """Pages for every slot's longest sequence at once, plus the scratch page: what never runs out."""
    return slots * pages_for(max_len) + 1


def page_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of one page in every layer."""
    return 2 * layers * PAGE * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(layers: int, pages: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """The cache's size from its shape: keys and values of every layer and page."""
    return pages * page_bytes(layers, kv_heads, head_dim, dtype_bytes)


def cache_pages(config, dtype_bytes: int, slots: int, max_len: int, kv_cache_gb: float | None) -> int:
    """The pages of the engine's KV cache: `kv_cache_gb` of them (at most every slot's longest sequence; None: that
    many), or a UserError line when they cannot hold one group at its longest, which the engine could not then
    run to the end."""
    full = full_pages(slots, max_len)
    if kv_cache_gb is None:
        return full
    dims = Dims.of(config)
    page = page_bytes(config.num_hidden_layers, dims.kv_heads, dims.head_dim, dtype_bytes)
    pages = min(full, int(kv_cache_gb * GB // page))
    group = min(slots, PROFILE.rollouts_per_problem)
    least = group * pages_for(max_len) + 1
    if pages < least:
        raise UserError(f"--kv-cache-gb {kv_cache_gb:g} holds {pages} KV pages; {group} rollouts at their longest "
                        f"need {least} ({least * page / GB:.2f} GB): give the cache more, or lower --max-prompt-tokens "
                        "or --max-new-tokens")
    return pages


class KVCache:
    def __init__(self, layers: int, slots: int, pages: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, pages, PAGE, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.full((slots, pages_for(max_len)), SCRATCH_PAGE, dtype=torch.int32, device=device)

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, [pages, PAGE, kv_heads, head_dim] views."""
        return self.k[i], self.v[i]

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each (slot, position)'s row in a layer's cache viewed as [pages × PAGE, kv_heads, head_dim]: the same in
        every layer, so a step or a prefill computes them once."""
        return self.table[slots, positions // PAGE].long() * PAGE + positions % PAGE

    def write(self, i: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values [*rows.shape, kv_heads, head_dim] into layer i's `rows` (from `rows`): a decode step's,
        one per slot, or a prefilled prompt's, [group, width] (the rollouts of one group share their prompt)."""
        self.k[i].view(-1, *self.k.shape[3:]).index_put_((rows,), k.expand(*rows.shape, -1, -1))
        self.v[i].view(-1, *self.v.shape[3:]).index_put_((rows,), v.expand(*rows.shape, -1, -1))

    def set_pages(self, slots: torch.Tensor, columns: torch.Tensor, pages: torch.Tensor) -> None:
        """table[slots[j], columns[j]] = pages[j]: pages handed out or taken back (kv_pages.py decides which)."""
        self.table.index_put_((slots, columns), pages.to(self.table.dtype))
