"""The fast engine's KV cache: one row of keys and values per decode slot, for every layer.

K and V are [layers, slots, kv_heads, max_len, head_dim], allocated once at start-up: a slot's row is
reused by each rollout that holds it, and attention reads it only up to the slot's length, so what a
previous occupant (or prefill padding) left past that length is never read.

A row is as long as what a slot can really hold (`positions_per_slot`): a prompt of up to the prompt
limit P and up to N new tokens, less the last token sampled, which is never fed back and so never
written: P + N − 1 positions. It was P + N before (one position per slot that nothing ever wrote); at
W1 on the 3B preset (36 layers, 2 KV heads of 128, bf16: 36,864 bytes per position, P = 512, N = 1024)
that saves 9.4 MB at 256 slots (14.50 GB → 14.49 GB) and 18.9 MB at 512 slots (28.99 GB → 28.97 GB).
The rest of the cache is what the slots need: a smaller cache means fewer slots or a lower prompt limit.
"""

from __future__ import annotations

import torch


def positions_per_slot(max_prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions one slot's row needs: the prompt limit plus the new tokens, less the last (never written)."""
    return max_prompt_tokens + max_new_tokens - 1


def kv_cache_bytes(layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype_bytes: int) -> int:
    """The cache's size from its shape: keys and values, every layer, slot and position."""
    return 2 * layers * slots * kv_heads * max_len * head_dim * dtype_bytes


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, [slots, kv_heads, max_len, head_dim] views."""
        return self.k[i], self.v[i]

    def write_step(self, i: int, slot_ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """A decode step's keys and values [slots, kv_heads, head_dim], each slot's at its own position."""
        self.k[i][slot_ids, :, positions] = k
        self.v[i][slot_ids, :, positions] = v

    def fill(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prefilled prompt's keys and values [kv_heads, width, head_dim] into positions 0..width-1 of every
        slot in `slots` (the rollouts of one group share their prompt)."""
        width, group = k.shape[1], slots.shape[0]
        self.k[i, :, :, :width].index_put_((slots,), k.unsqueeze(0).expand(group, -1, -1, -1))
        self.v[i, :, :, :width].index_put_((slots,), v.unsqueeze(0).expand(group, -1, -1, -1))
