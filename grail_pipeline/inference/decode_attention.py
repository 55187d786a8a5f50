"""Attention for one decode step over the paged KV cache, reading each slot's keys only up to its length.

On a GPU a Triton kernel handles one (row, KV head) per program and treats that head's query heads
(grouped-query attention) as rows of one small matrix product, so the bytes read are the live KV and no
more: at 512 slots the cache is mostly empty tail, and reading it whole would double the step time. It reads
one page (kv_cache.PAGE positions) per block, the page's number from the slot's row of the page table.
Elsewhere (CPU tests) the same function is computed with SDPA and a length mask over the gathered pages. A step
may run on some of the slots only (the engine's decode width, model_runner.py): query row r then reads slot
`slot_index[r]`.
"""

from __future__ import annotations

import math

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


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, idx_ptr, out_ptr,
        stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ts,
        stride_os, stride_oh, sm_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
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
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for start in range(0, length, PAGE):
            page = tl.load(pages + start // PAGE).to(tl.int64)
            ok = start + cols < length
            k = tl.load(k_ptr + page * stride_kp + kv_head * stride_kh + cols[:, None] * stride_kt + dims[None, :],
                        mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + page * stride_vp + kv_head * stride_vh + cols[:, None] * stride_vt + dims[None, :],
                        mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                            lengths: torch.Tensor, slot_index: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel; same contract as `decode_attention_reference` (last dims contiguous)."""
    rows, hq, dim = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if slot_index is None:
        slot_index = torch.arange(rows, device=q.device)
    out = torch.empty_like(q)
    _decode_attention_kernel[(rows, hkv)](
        q, k_cache, v_cache, table, lengths, slot_index, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0), out.stride(0), out.stride(1),
        1.0 / math.sqrt(dim),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE=page, HEAD_DIM=dim,
    )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     lengths: torch.Tensor, slot_index: torch.Tensor | None = None) -> torch.Tensor:
    """Triton on CUDA when available, SDPA with a length mask otherwise; row r of q reads slot `slot_index[r]`."""
    if q.is_cuda and triton is not None:
        return decode_attention_triton(q, k_cache, v_cache, table, lengths, slot_index)
    return decode_attention_reference(q, k_cache, v_cache, table, lengths, slot_index)
