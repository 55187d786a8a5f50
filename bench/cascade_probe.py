"""Decode attention that reads a group's shared prompt pages once: a probe before the engine takes it (issue #21).

Why. A decode step's attention reads every occupied slot's live KV, and at W1's shapes that is bandwidth-bound:
0.102 ms per layer at 512 slots, 3.27 TB/s of live KV (results/h200-2026-12-02/paged-w1/probe.log), ~3.7 ms of a
15-ms step over 36 layers. W2's KV per token is 4x W1's (8 KV heads of 128, 36 layers: 147 KB), so there
attention is about half of a full step, and W2 is 30.4 roll/s against the 45 issue #21 asks. A group's 16
rollouts share their prompt's whole pages (inference/kv_pages.py: 3 of a ~240-token W1 prompt, ~200 positions,
~38 % of a mean context of ~530), yet each of its 16 rows reads them again; the GPU's L2 caught only 15 % of
that (0.087 ms with shared pages against 0.102 private).

How. Two kernels, as cascade attention does (FlashInfer's name for it): the first runs one program per
(group, KV head) over the group's shared pages, with all its members' query heads as the rows of one matrix
product (16 members x the heads per KV head: 128 rows on W1, 64 on W2; tensor cores instead of 16 separate
reads), and leaves each row's unnormalised softmax state (running max, sum, weighted values, fp32) in a buffer;
the second is the engine's per-row kernel (inference/decode_attention.py) starting from that state at the
first position after the shared pages instead of at 0. The result is the same softmax in another summation
order (decode's numerics are free: the proof recomputes from tokens).

What this prints: for W1 and W2 shapes at several slot counts, time per layer and the error against SDPA in
fp32 over the same pages of: the engine's kernel; this file's second kernel alone (the engine's, plus the state
it may begin from: it must time alike); the two kernels; and each of the last two over an fp8 (e4m3) copy of the
cache, one scale per tensor (half the bytes: the lever after this one, decode's numerics only). If a variant is
faster, the engine takes it (a members table per step beside the page table, kept by the scheduler as groups
come and go; an fp8 cache written with its scale).

    python3 bench/cascade_probe.py                           # GPU: the table, JSON to $OUT/cascade_probe.json
    TRITON_INTERPRET=1 python3 bench/cascade_probe.py --check  # CPU: the kernels against the reference, small
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton
import triton.language as tl

from grail_pipeline.inference.decode_attention import decode_attention_reference, decode_attention_triton
from grail_pipeline.inference.kv_cache import PAGE
from grail_pipeline.protocol.profile import PROFILE

MEMBERS = PROFILE.rollouts_per_problem  # rows of a group: its rollouts


@triton.jit
def _shared_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, members_ptr, group_slot_ptr, group_pages_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ts,
    stride_ar, stride_ah, stride_mr, sm_scale,
    MEMBERS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (g, KV head): the group's members' query heads against its shared pages; each member row's
    softmax state to the buffers (rows of groups without shared pages get the empty state)."""
    g = tl.program_id(0)
    kv_head = tl.program_id(1)
    i = tl.arange(0, MEMBERS * BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, PAGE)
    row = tl.load(members_ptr + g * MEMBERS + i // BLOCK_G)  # -1: no member in this place
    head = kv_head * GROUP + i % BLOCK_G
    ok = (row >= 0) & (i % BLOCK_G < GROUP)
    q = tl.load(q_ptr + row[:, None] * stride_qs + head[:, None] * stride_qh + dims[None, :], mask=ok[:, None],
                other=0.0)
    pages = table_ptr + tl.load(group_slot_ptr + g) * stride_ts  # any member's row: they begin alike
    m_i = tl.full([MEMBERS * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([MEMBERS * BLOCK_G], tl.float32)
    acc = tl.zeros([MEMBERS * BLOCK_G, HEAD_DIM], tl.float32)
    for j in range(0, tl.load(group_pages_ptr + g)):
        page = tl.load(pages + j).to(tl.int64)
        k = tl.load(k_ptr + page * stride_kp + kv_head * stride_kh + cols[:, None] * stride_kt + dims[None, :])
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + page * stride_vp + kv_head * stride_vh + cols[:, None] * stride_vt + dims[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    tl.store(acc_ptr + row[:, None] * stride_ar + head[:, None] * stride_ah + dims[None, :], acc, mask=ok[:, None])
    tl.store(m_ptr + row * stride_mr + head, m_i, mask=ok)
    tl.store(l_ptr + row * stride_mr + head, l_i, mask=ok)


@triton.jit
def _private_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, idx_ptr, start_ptr, acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ts,
    stride_ar, stride_ah, stride_mr, stride_os, stride_oh, sm_scale, v_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """The engine's kernel from position start[row] on, its softmax state begun where the shared kernel left it
    (with start 0 everywhere: the engine's kernel). An fp8 cache is read in the query's dtype: its keys' scale is
    in sm_scale, its values' is v_scale."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(idx_ptr + row)
    length = tl.load(len_ptr + row)
    first = tl.load(start_ptr + row)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, PAGE)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + row * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    carried = row_ok & (tl.zeros([BLOCK_G], tl.int32) + first > 0)  # a block mask: the scalar spread over the rows
    m_i = tl.load(m_ptr + row * stride_mr + heads, mask=carried, other=float("-inf"))
    l_i = tl.load(l_ptr + row * stride_mr + heads, mask=carried, other=0.0)
    acc = tl.load(acc_ptr + row * stride_ar + heads[:, None] * stride_ah + dims[None, :], mask=carried[:, None],
                  other=0.0)
    pages = table_ptr + slot * stride_ts
    for start in range(first, length, PAGE):
        page = tl.load(pages + start // PAGE).to(tl.int64)
        valid = start + cols < length
        k = tl.load(k_ptr + page * stride_kp + kv_head * stride_kh + cols[:, None] * stride_kt + dims[None, :],
                    mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + page * stride_vp + kv_head * stride_vh + cols[:, None] * stride_vt + dims[None, :],
                    mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    out = acc / l_i[:, None] * v_scale
    tl.store(out_ptr + row * stride_os + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def shared_prefix_attention(q, k_cache, v_cache, table, lengths, members=None, group_pages=None, k_scale=1.0,
                            v_scale=1.0):
    """`decode_attention_triton`'s contract (every slot a row, R = S), plus `members` [G, MEMBERS] (the rows of
    each group, -1 where none) and `group_pages` [G] (the shared pages its members' table rows begin with); every
    row belongs to one group. Without members, the second kernel alone reads everything (the engine's kernel).
    k_scale, v_scale: an fp8 cache's scales (the cache holds K / k_scale)."""
    rows, hq, dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    start = torch.zeros(rows + 1, dtype=torch.int32, device=q.device)
    acc = torch.empty(rows, hq, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    scale = k_scale / math.sqrt(dim)
    if members is not None:
        first = torch.where(members >= 0, members, members.new_full((), rows))  # -1 → a row that is not there
        start[first.flatten().long()] = (group_pages[:, None] * PAGE).expand_as(members).flatten().to(torch.int32)
        _shared(q, k_cache, v_cache, table, members, group_pages, acc, m, l_sum, scale)
    start = start[:rows]
    out = torch.empty_like(q)
    index = torch.arange(rows, device=q.device)
    _private_kernel[(rows, hkv)](
        q, k_cache, v_cache, table, lengths, index, start, acc, m, l_sum, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0),
        acc.stride(0), acc.stride(1), m.stride(0), out.stride(0), out.stride(1), scale, v_scale,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE=PAGE, HEAD_DIM=dim,
    )
    return out


def _shared(q, k_cache, v_cache, table, members, group_pages, acc, m, l_sum, scale) -> None:
    """The first kernel: each group's shared pages into the rows' softmax state."""
    hkv, dim = k_cache.shape[2], q.shape[2]
    group = q.shape[1] // hkv
    group_slot = members.max(dim=1).values.to(torch.int32)  # a member's row = its slot here
    shared_block_g = triton.next_power_of_2(group)  # the shared product's rows: members x heads, >= 16 already
    _shared_kernel[(members.shape[0], hkv)](
        q, k_cache, v_cache, table, members, group_slot, group_pages, acc, m, l_sum,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0),
        acc.stride(0), acc.stride(1), m.stride(0), scale,
        MEMBERS=MEMBERS, GROUP=group, BLOCK_G=shared_block_g, PAGE=PAGE, HEAD_DIM=dim,
        num_warps=8,  # 64-128 rows x 128 of fp32 state: more threads to hold it
    )


def workload(slots: int, hq: int, hkv: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0,
             shuffle_members: bool = False, max_context: int = 1536):
    """Groups of 16 slots sharing their prompt's whole pages, W1's prompt and context lengths (prompts 208..283,
    contexts prompt + 1..800: mean ~640), pages shuffled in the cache; a few groups short of members (their
    rollouts retired) and one whose prompt fills no page whole."""
    g = torch.Generator().manual_seed(seed)
    per_slot = max_context // PAGE
    pages = slots * per_slot + 1
    k = torch.randn(pages, PAGE, hkv, dim, generator=g).to(device, dtype)
    v = torch.randn(pages, PAGE, hkv, dim, generator=g).to(device, dtype)
    table = (1 + torch.randperm(pages - 1, generator=g)).view(slots, per_slot).to(torch.int32)
    groups = slots // MEMBERS
    prompts = torch.randint(208, 284, (groups,), generator=g)
    prompts[0] = min(PAGE, 40)  # a prompt inside one page: nothing shared
    shared = ((prompts - 1) // PAGE).to(torch.int32)
    order = torch.randperm(slots, generator=g) if shuffle_members else torch.arange(slots)
    members = order.view(groups, MEMBERS).clone()
    lengths = torch.zeros(slots, dtype=torch.int32)
    for gi in range(groups):
        rows = members[gi]
        table[rows, :shared[gi]] = table[rows[0], :shared[gi]]
        lengths[rows] = (prompts[gi] + torch.randint(1, 800, (MEMBERS,), generator=g)).clamp(max=max_context).to(
            torch.int32)
    for gi in range(1, groups, 5):  # retired members: their rows read their own pages only
        members[gi, MEMBERS - 1 - gi % MEMBERS:] = -1
    alone = torch.ones(slots, dtype=torch.bool)
    alone[members[members >= 0]] = False
    spare = torch.nonzero(alone).flatten()
    if len(spare):  # the retired members' rows: groups of their own, nothing shared
        extra = torch.full((math.ceil(len(spare) / MEMBERS), MEMBERS), -1, dtype=torch.long)
        extra.view(-1)[:len(spare)] = spare
        members = torch.cat([members, extra])
        shared = torch.cat([shared, torch.zeros(len(extra), dtype=torch.int32)])
    q = torch.randn(slots, hq, dim, generator=g).to(device, dtype)
    to = dict(device=device)
    return q, k, v, table.to(**to), lengths.to(**to), members.to(torch.int32).to(**to), shared.to(**to)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def fp8(cache: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The cache in float8 e4m3 with one scale for the tensor (its largest value at e4m3's 448): (cache, scale)."""
    scale = cache.float().abs().amax().item() / 448.0
    return (cache.float() / scale).to(torch.float8_e4m3fn), scale


def check() -> None:
    """Small shapes in Triton's interpreter (CPU): both kernels against the SDPA reference, fp32."""
    for hq, hkv, dim, shuffle in ((16, 2, 32, False), (8, 8, 16, True), (14, 2, 16, True)):
        q, k, v, table, lengths, members, shared = workload(32, hq, hkv, dim, "cpu", torch.float32, seed=hq,
                                                            shuffle_members=shuffle, max_context=1024)
        ref = decode_attention_reference(q, k, v, table, lengths)
        torch.testing.assert_close(shared_prefix_attention(q, k, v, table, lengths, members, shared), ref,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(shared_prefix_attention(q, k, v, table, lengths), ref, atol=1e-4, rtol=1e-4)
    (k8, ks), (v8, vs) = fp8(k), fp8(v)  # e4m3 keeps ~2 significant digits: a few per cent, not the scales' 100s
    assert relative_error(shared_prefix_attention(q, k8, v8, table, lengths, members, shared, ks, vs), ref) < 0.08
    print("shared-prefix kernels = reference")


def probe(slot_counts: list[int]) -> dict:
    from grail_pipeline.tools.roofline import timed_ms

    report: dict = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                        page=PAGE, rows=[])
    for name, hq, hkv in (("W1", 16, 2), ("W2", 32, 8)):
        for slots in slot_counts:
            q, k, v, table, lengths, members, shared = workload(slots, hq, hkv, 128, "cuda", torch.bfloat16,
                                                                shuffle_members=True)
            ref = decode_attention_reference(q.float(), k.float(), v.float(), table, lengths)
            (k8, ks), (v8, vs) = fp8(k), fp8(v)
            variants = dict(  # name: the call; the engine's kernel first
                engine=lambda: decode_attention_triton(q, k, v, table, lengths),
                probe_alone=lambda: shared_prefix_attention(q, k, v, table, lengths),
                cascade=lambda: shared_prefix_attention(q, k, v, table, lengths, members, shared),
                fp8=lambda: shared_prefix_attention(q, k8, v8, table, lengths, k_scale=ks, v_scale=vs),
                cascade_fp8=lambda: shared_prefix_attention(q, k8, v8, table, lengths, members, shared, ks, vs))
            live = lengths.sum().item() * hkv * 128 * 2 * 2 / 1e9
            row = dict(workload=name, slots=slots, live_gb=round(live, 3),
                       shared_share=round((shared.sum().item() * PAGE * MEMBERS) / lengths.sum().item(), 3))
            for key, call in variants.items():
                row[f"{key}_rel_err"] = relative_error(call(), ref)
                row[f"{key}_ms"] = timed_ms(call)
                row[f"{key}_speedup"] = round(row["engine_ms"] / row[f"{key}_ms"], 3)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="CPU: small shapes against the reference (interpreter)")
    parser.add_argument("--slots", default="256,512,1024")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.check:
        check()
        return
    report = probe([int(s) for s in args.slots.split(",")])
    path = os.path.join(args.out, "cascade_probe.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
