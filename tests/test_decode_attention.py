"""Decode-step attention over a slot KV cache against a naive loop over slots and heads.

The Triton kernel needs a GPU and is not run here; `decode_attention` on the CPU is the SDPA reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from grail_pipeline.inference.decode_attention import decode_attention, decode_attention_reference


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """softmax(q·k/sqrt(d)) over each slot's first `length` keys; query head h reads KV head h // group."""
    slots, hq, dim = q.shape
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    for s in range(slots):
        n = int(lengths[s])
        for h in range(hq):
            keys, values = k[s, h // group, :n].double(), v[s, h // group, :n].double()
            weights = torch.softmax(keys @ q[s, h].double() / math.sqrt(dim), dim=0)
            out[s, h] = (weights @ values).to(q.dtype)
    return out


@pytest.mark.parametrize("hq, hkv", [(8, 2), (4, 4), (14, 2), (6, 1)])
def test_reference_equals_naive_loop(hq, hkv) -> None:
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    slots, t, dim = 7, 19, 16
    q = torch.randn(slots, hq, dim, generator=g)
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    lengths = torch.tensor([1, t, 2, 5, t - 1, 11, 1], dtype=torch.int32)  # one key, the full cache, in between
    expected = naive(q, k, v, lengths)
    got = decode_attention_reference(q, k, v, lengths)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], v[0, torch.arange(hq) // (hq // hkv), 0])  # one key: its value, exactly
    torch.testing.assert_close(decode_attention(q, k, v, lengths), got, atol=0, rtol=0)  # the CPU dispatch


def test_keys_past_the_length_are_never_read() -> None:
    """Stale cache entries (a slot's previous occupant, prefill padding) beyond the length change nothing."""
    g = torch.Generator().manual_seed(1)
    slots, hq, hkv, t, dim = 4, 8, 2, 12, 16
    q = torch.randn(slots, hq, dim, generator=g)
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    lengths = torch.tensor([1, 4, 7, 12], dtype=torch.int32)
    before = decode_attention_reference(q, k, v, lengths)
    stale = torch.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    k2 = torch.where(stale, 1e4 * torch.randn(k.shape, generator=g), k)
    v2 = torch.where(stale, 1e4 * torch.randn(v.shape, generator=g), v)
    torch.testing.assert_close(decode_attention_reference(q, k2, v2, lengths), before, atol=0, rtol=0)


def test_rows_read_the_slots_their_index_names() -> None:
    """A step on some slots only: query row r reads slot slot_index[r]'s keys, up to row r's length."""
    g = torch.Generator().manual_seed(2)
    slots, hq, hkv, t, dim = 6, 8, 2, 10, 16
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    index = torch.tensor([4, 1, 5])
    q = torch.randn(len(index), hq, dim, generator=g)
    lengths = torch.tensor([3, 10, 1], dtype=torch.int32)
    expected = naive(q, k[index], v[index], lengths)
    torch.testing.assert_close(decode_attention(q, k, v, lengths, index), expected, atol=1e-5, rtol=1e-5)
