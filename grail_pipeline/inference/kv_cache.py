"""The fast engine's KV cache: one row of keys and values per decode slot, for every layer.

K and V are [layers, slots, kv_heads, max_len, head_dim], allocated once at start-up: a slot's row is
reused by each rollout that holds it, and attention reads it only up to the slot's length, so what a
previous occupant (or prefill padding) left past that length is never read.
"""

from __future__ import annotations

import torch


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
