"""Decode attention that reads a group's shared prompt pages once: a probe before the engine takes it (issue #21).

Why. A decode step's attention reads every occupied slot's live KV, and at W1's shapes that is bandwidth-bound:
0.102 ms per layer at 512 slots, 3.27 TB/s of live KV (results/h200-2026-12-02/paged-w1/probe.log), ~3.7 ms of a
15-ms step over 36 layers. W2's KV per token is 4x W1's (8 KV heads of 128, 36 layers: 147 KB), so there
attention is about half of a full step, and W2 is 30.4 roll/s against the 45 issue #21 asks. A group's 16
rollouts share their prompt's whole pages (inference/kv_pages.py: 3 of a ~240-token W1 prompt, ~200 positions,
~38 % of a mean context of ~530), yet each of its 16 rows reads them again; the GPU's L2 caught only 15 % of
that (0.087 ms with shared pages against 0.102 private).

How (inference/decode_attention.py, `SharedPrompts`). Two kernels, as cascade attention does (FlashInfer's
name for it): the first runs one program per (group, KV head) over the group's shared pages, with all its
members' query heads as the rows of one matrix product (16 members x the heads per KV head: 128 rows on W1, 64
on W2; tensor cores instead of 16 separate reads), and leaves each row's unnormalised softmax state (running
max, sum, weighted values, fp32) in a buffer; the second is the engine's per-row kernel starting from that state
at the first position after the shared pages instead of at 0. The same softmax in another summation order
(decode's numerics are free: the proof recomputes from tokens). The engine runs it with
`benchmark --shared-prompt-attention` (not yet its default).

What this prints: for W1 and W2 shapes at several slot counts, time per layer and the error against SDPA in
fp32 over the same pages of: the engine's kernel; the two kernels; and each over an fp8 (e4m3) copy of the
cache, one scale per tensor (half the bytes: the lever after this one, decode's numerics only; the engine's
cache is bf16). If the two kernels are faster, `--shared-prompt-attention` becomes the default; then
`fast_vs_hf.py --shared-prompt-attention` measures the pipeline.

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

from grail_pipeline.inference.decode_attention import (
    SharedPrompts,
    decode_attention_reference,
    decode_attention_triton,
)
from grail_pipeline.inference.kv_cache import PAGE
from grail_pipeline.protocol.profile import PROFILE

MEMBERS = PROFILE.rollouts_per_problem  # rows of a group: its rollouts


def shared_prompts(q: torch.Tensor, table: torch.Tensor, members: torch.Tensor, group_pages: torch.Tensor,
                   ) -> SharedPrompts:
    """The engine's shared-prompt tables for `members` [G, MEMBERS] (rows, which are slots here) whose table rows
    begin with `group_pages` [G] shared pages, and the softmax state's buffers."""
    rows, hq, dim = q.shape
    start = torch.zeros(rows + 1, dtype=torch.int32, device=q.device)
    first = torch.where(members >= 0, members, members.new_full((), rows)).long()  # -1 → a row that is not there
    start[first.flatten()] = (group_pages[:, None] * PAGE).expand_as(members).flatten().to(torch.int32)
    most = max(1, int(group_pages.max()))
    pages = table[members.max(dim=1).values.long(), :most].clone()  # a member's row: they begin alike
    to = dict(dtype=torch.float32, device=q.device)
    return SharedPrompts(members, pages, group_pages, start[:rows], torch.arange(rows, dtype=torch.int32, device=q.device),
                         torch.zeros(rows, hq, dim, **to), torch.zeros(rows, hq, **to), torch.zeros(rows, hq, **to))


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
    """Small shapes in Triton's interpreter (CPU): the kernels against the SDPA reference, fp32."""
    for hq, hkv, dim, shuffle in ((16, 2, 32, False), (8, 8, 16, True), (14, 2, 16, True)):
        q, k, v, table, lengths, members, shared = workload(32, hq, hkv, dim, "cpu", torch.float32, seed=hq,
                                                            shuffle_members=shuffle, max_context=1024)
        ref = decode_attention_reference(q, k, v, table, lengths)
        groups = shared_prompts(q, table, members, shared)
        torch.testing.assert_close(decode_attention_triton(q, k, v, table, lengths, shared=groups), ref,
                                   atol=1e-4, rtol=1e-4)
    (k8, ks), (v8, vs) = fp8(k), fp8(v)  # e4m3 keeps ~2 significant digits: a few per cent, not the scales' 100s
    out = decode_attention_triton(q, k8, v8, table, lengths, shared=groups, k_scale=ks, v_scale=vs)
    assert relative_error(out, ref) < 0.08
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
            groups = shared_prompts(q, table, members, shared)
            variants = dict(  # name: the call; the engine's kernel first
                engine=lambda: decode_attention_triton(q, k, v, table, lengths),
                cascade=lambda: decode_attention_triton(q, k, v, table, lengths, shared=groups),
                fp8=lambda: decode_attention_triton(q, k8, v8, table, lengths, k_scale=ks, v_scale=vs),
                cascade_fp8=lambda: decode_attention_triton(q, k8, v8, table, lengths, shared=groups, k_scale=ks,
                                                            v_scale=vs))
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
