"""Attention for one decode step over the paged KV cache, reading each slot's keys only up to its length.

On a GPU a Triton kernel handles one (row, KV head) per program and treats that head's query heads
(grouped-query attention) as rows of one small matrix product, so the bytes read are the live KV and no
more: at 512 slots the cache is mostly empty tail, and reading it whole would double the step time. It reads
one page (kv_cache.PAGE positions) per block, the page's number from the slot's row of the page table.
Elsewhere (CPU tests) the same function is computed with SDPA and a length mask over the gathered pages. A step
may run on some of the slots only (the engine's decode width, model_runner.py): query row r then reads slot
`slot_index[r]`.

A group's 16 rollouts share the pages their prompt fills whole (kv_pages.py: ~38 % of W1's live KV), and each
row reading them again costs bandwidth the GPU's L2 caught only 15 % of (0.087 ms against 0.102 per layer at 512
slots, bench/results/h200-2026-12-02/paged-w1/). With `SharedPrompts`, a first kernel reads each group's shared
pages once, its members' query heads the rows of one product, and leaves each row's softmax state; the row
kernel then begins from that state after the shared pages (cascade attention, as FlashInfer names it). The same
softmax, summed in another order: decoding's numerics are free, the proof recomputes from tokens. Not yet the
engine's default: `bench/cascade_probe.py` times it against the row kernel alone first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                               lengths: torch.Tensor, slot_index: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, Hq, D]; caches [pages, PAGE, Hkv, D]; table [S, pages per slot]; lengths [R] (valid keys, current
    token included) → [R, Hq, D].

    Row r reads the pages of slot `slot_index[r]` (default: slot r, R = S)."""
    if slot_index is not None:
        table = table[slot_index]
    rows, hq, dim = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    t = torch.arange(table.shape[1] * page, device=q.device)
    flat = table[:, t // page].long() * page + t % page  # [R, T]: each position's row of the flattened cache
    keys = k_cache.reshape(-1, hkv, dim)[flat].transpose(1, 2)  # [R, Hkv, T, D]
    values = v_cache.reshape(-1, hkv, dim)[flat].transpose(1, 2)
    grouped = q.view(rows, hkv, hq // hkv, dim)
    mask = t[None, :] < lengths[:, None].to(torch.long)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask[:, None, None, :])
    return out.reshape(rows, hq, dim)


@dataclass(frozen=True)
class SharedPrompts:
    """What lets a step read each group's shared prompt pages once (model_runner.py keeps them on the device; the
    engine's host side is prompt_groups.py): `members` [E, MEMBERS] (a group's slots, -1 where none), `pages`
    [E, P] and `count` [E] (the shared pages, in order, and how many), `start` [S] (positions a slot's shared
    pages cover: 0 outside a group), `row_of` [S] (each slot's query row in this step, -1 if none), and the
    buffers of each row's softmax state after them: `acc` [R, Hq, D], `m`, `l` [R, Hq] (float32)."""

    members: torch.Tensor
    pages: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    row_of: torch.Tensor
    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the softmax's running sum, as the papers name it)


if triton is not None:

    @triton.jit
    def _shared_prompt_kernel(
        q_ptr, k_ptr, v_ptr, members_ptr, pages_ptr, count_ptr, row_of_ptr, acc_ptr, m_ptr, l_ptr,
        stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ms, stride_pg,
        stride_ar, stride_ah, stride_mr, sm_scale,
        MEMBERS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """Program (entry, KV head): the group's members' query heads, as the rows of one product, against its
        shared pages; each member row's softmax state (max, sum, weighted values) to the buffers."""
        entry = tl.program_id(0)
        kv_head = tl.program_id(1)
        i = tl.arange(0, MEMBERS * BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, PAGE)
        slot = tl.load(members_ptr + entry * stride_ms + i // BLOCK_G)  # -1: no member in this place
        row = tl.load(row_of_ptr + slot, mask=slot >= 0, other=-1)
        head = kv_head * GROUP + i % BLOCK_G
        ok = (row >= 0) & (i % BLOCK_G < GROUP)
        q = tl.load(q_ptr + row[:, None] * stride_qs + head[:, None] * stride_qh + dims[None, :], mask=ok[:, None],
                    other=0.0)
        m_i = tl.full([MEMBERS * BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([MEMBERS * BLOCK_G], tl.float32)
        acc = tl.zeros([MEMBERS * BLOCK_G, HEAD_DIM], tl.float32)
        for j in range(0, tl.load(count_ptr + entry)):
            page = tl.load(pages_ptr + entry * stride_pg + j).to(tl.int64)
            k = tl.load(k_ptr + page * stride_kp + kv_head * stride_kh + cols[:, None] * stride_kt + dims[None, :])
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + page * stride_vp + kv_head * stride_vh + cols[:, None] * stride_vt + dims[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m_i = m_new
        tl.store(acc_ptr + row[:, None] * stride_ar + head[:, None] * stride_ah + dims[None, :], acc,
                 mask=ok[:, None])
        tl.store(m_ptr + row * stride_mr + head, m_i, mask=ok)
        tl.store(l_ptr + row * stride_mr + head, l_i, mask=ok)

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, idx_ptr, start_ptr, acc_ptr, m_ptr, l_ptr, out_ptr,
        stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ts,
        stride_ar, stride_ah, stride_mr, stride_os, stride_oh, sm_scale, v_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
        CARRY: tl.constexpr,
    ):
        """Program (row, KV head): the row's query heads against its slot's keys, from position start[slot] on
        with the softmax state the shared-prompt kernel left (CARRY), else from 0. A cache in another dtype (fp8)
        is read in the query's: its keys' scale is in sm_scale, its values' is v_scale."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(idx_ptr + row)
        length = tl.load(len_ptr + row)
        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, PAGE)
        row_ok = rows < GROUP
        heads = kv_head * GROUP + rows
        q = tl.load(q_ptr + row * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        pages = table_ptr + slot * stride_ts
        if CARRY:
            first = tl.load(start_ptr + slot)
            carried = row_ok & (tl.zeros([BLOCK_G], tl.int32) + first > 0)  # the scalar as a block mask
            m_i = tl.load(m_ptr + row * stride_mr + heads, mask=carried, other=float("-inf"))
            l_i = tl.load(l_ptr + row * stride_mr + heads, mask=carried, other=0.0)
            acc = tl.load(acc_ptr + row * stride_ar + heads[:, None] * stride_ah + dims[None, :],
                          mask=carried[:, None], other=0.0)
        else:
            first = 0
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for start in range(first, length, PAGE):
            page = tl.load(pages + start // PAGE).to(tl.int64)
            ok = start + cols < length
            k = tl.load(k_ptr + page * stride_kp + kv_head * stride_kh + cols[:, None] * stride_kt + dims[None, :],
                        mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + page * stride_vp + kv_head * stride_vh + cols[:, None] * stride_vt + dims[None, :],
                        mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m_i = m_new
        out = acc / l_i[:, None] * v_scale
        tl.store(out_ptr + row * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                            lengths: torch.Tensor, slot_index: torch.Tensor | None = None,
                            shared: SharedPrompts | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """The Triton kernels; same contract as `decode_attention_reference` (last dims contiguous). With `shared`,
    each group's shared prompt pages are read once for all its members first. k_scale, v_scale: the scales of an
    fp8 cache holding K / k_scale and V / v_scale (bench/cascade_probe.py times one; the engine's is bf16)."""
    rows, hq, dim = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if slot_index is None:
        slot_index = torch.arange(rows, device=q.device)
    out = torch.empty_like(q)
    sm_scale = k_scale / math.sqrt(dim)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    if shared is not None:
        _shared_prompt_kernel[(shared.members.shape[0], hkv)](
            q, k_cache, v_cache, shared.members, shared.pages, shared.count, shared.row_of, shared.acc, shared.m,
            shared.l, *strides, shared.members.stride(0), shared.pages.stride(0), shared.acc.stride(0),
            shared.acc.stride(1), shared.m.stride(0), sm_scale,
            MEMBERS=shared.members.shape[1], GROUP=group, BLOCK_G=triton.next_power_of_2(group), PAGE=page,
            HEAD_DIM=dim,
            num_warps=8,  # 64-128 rows x 128 of fp32 state (W2, W1): more threads to hold it
        )
    if shared is not None:
        start, acc, m, l_sum = shared.start, shared.acc, shared.m, shared.l
    else:  # without CARRY the kernel reads no state: any tensors stand in for it
        start, acc, m, l_sum = lengths, out, out, out
    _decode_attention_kernel[(rows, hkv)](
        q, k_cache, v_cache, table, lengths, slot_index, start, acc, m, l_sum, out,
        *strides, table.stride(0), acc.stride(0), acc.stride(1), m.stride(0), out.stride(0),
        out.stride(1), sm_scale, v_scale,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE=page, HEAD_DIM=dim,
        CARRY=shared is not None,
    )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     lengths: torch.Tensor, slot_index: torch.Tensor | None = None,
                     shared: SharedPrompts | None = None) -> torch.Tensor:
    """Triton on CUDA when available, SDPA with a length mask otherwise (which reads the shared pages with the
    rest: the same softmax); row r of q reads slot `slot_index[r]`."""
    if q.is_cuda and triton is not None:
        return decode_attention_triton(q, k_cache, v_cache, table, lengths, slot_index, shared)
    return decode_attention_reference(q, k_cache, v_cache, table, lengths, slot_index)
