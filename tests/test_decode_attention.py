"""Decode-step attention over the paged KV cache against a naive loop over slots and heads.

`decode_attention` on the CPU is the SDPA reference over the gathered pages. The Triton kernel is run here too,
in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU, in a process of its own since the variable is
read when the kernel is defined), against the same reference: its page addressing is checked before a GPU runs
it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grail_pipeline.inference.decode_attention import decode_attention, decode_attention_reference

PAGE = 4  # small pages in these tests: a slot's keys span several, in the order its table names them


def paged(dense: torch.Tensor, pages: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense cache [S, Hkv, T, D] (T a multiple of PAGE) laid out in shuffled pages: (cache, table)."""
    slots, hkv, t, dim = dense.shape
    per_slot = t // PAGE
    order = torch.randperm(pages - 1, generator=generator)[:slots * per_slot] + 1  # page 0: scratch
    cache = 1e4 * torch.randn(pages, PAGE, hkv, dim, generator=generator)  # what no slot holds is loud
    table = order.view(slots, per_slot).to(torch.int32)
    for s in range(slots):
        for j in range(per_slot):
            cache[table[s, j]] = dense[s, :, j * PAGE:(j + 1) * PAGE].transpose(0, 1)
    return cache, table


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """softmax(q·k/sqrt(d)) over each slot's first `length` keys (dense [S, Hkv, T, D]); query head h reads KV head
    h // group."""
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
    slots, t, dim = 7, 20, 16
    q = torch.randn(slots, hq, dim, generator=g)
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    k_pages, table = paged(k, 40, torch.Generator().manual_seed(1))
    v_pages, _ = paged(v, 40, torch.Generator().manual_seed(1))
    lengths = torch.tensor([1, t, 2, 5, t - 1, 11, 1], dtype=torch.int32)  # one key, the full row, in between
    expected = naive(q, k, v, lengths)
    got = decode_attention_reference(q, k_pages, v_pages, table, lengths)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], v[0, torch.arange(hq) // (hq // hkv), 0])  # one key: its value, exactly
    torch.testing.assert_close(decode_attention(q, k_pages, v_pages, table, lengths), got, atol=0, rtol=0)  # CPU


def test_keys_past_the_length_are_never_read() -> None:
    """Stale entries (a page's previous holder, prefill padding) beyond the length, in the slot's last page or in
    the pages its table names past it, change nothing."""
    g = torch.Generator().manual_seed(1)
    slots, hq, hkv, t, dim = 4, 8, 2, 12, 16
    q = torch.randn(slots, hq, dim, generator=g)
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    lengths = torch.tensor([1, 4, 7, 12], dtype=torch.int32)
    k_pages, table = paged(k, 16, torch.Generator().manual_seed(3))
    v_pages, _ = paged(v, 16, torch.Generator().manual_seed(3))
    before = decode_attention_reference(q, k_pages, v_pages, table, lengths)
    stale = torch.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    k2 = torch.where(stale, 1e4 * torch.randn(k.shape, generator=g), k)
    v2 = torch.where(stale, 1e4 * torch.randn(v.shape, generator=g), v)
    k2_pages, _ = paged(k2, 16, torch.Generator().manual_seed(3))
    v2_pages, _ = paged(v2, 16, torch.Generator().manual_seed(3))
    torch.testing.assert_close(decode_attention_reference(q, k2_pages, v2_pages, table, lengths), before, atol=0,
                               rtol=0)


def test_rows_read_the_slots_their_index_names() -> None:
    """A step on some slots only: query row r reads slot slot_index[r]'s pages, up to row r's length."""
    g = torch.Generator().manual_seed(2)
    slots, hq, hkv, t, dim = 6, 8, 2, 12, 16
    k = torch.randn(slots, hkv, t, dim, generator=g)
    v = torch.randn(slots, hkv, t, dim, generator=g)
    k_pages, table = paged(k, 30, torch.Generator().manual_seed(5))
    v_pages, _ = paged(v, 30, torch.Generator().manual_seed(5))
    index = torch.tensor([4, 1, 5])
    q = torch.randn(len(index), hq, dim, generator=g)
    lengths = torch.tensor([3, 12, 1], dtype=torch.int32)
    expected = naive(q, k[index], v[index], lengths)
    got = decode_attention(q, k_pages, v_pages, table, lengths, index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from grail_pipeline.inference.decode_attention import (SharedPrompts, decode_attention_reference,
                                                           decode_attention_triton)
    from grail_pipeline.inference.kv_cache import PAGE
    g = torch.Generator().manual_seed(0)
    for hq, hkv, dim in [(16, 2, 128), (8, 8, 64), (14, 2, 64)]:  # Qwen2.5-3B's grouping, none, a group of 7
        pages, slots, per_slot = 40, 5, 6
        k = torch.randn(pages, PAGE, hkv, dim, generator=g)
        v = torch.randn(pages, PAGE, hkv, dim, generator=g)
        table = (torch.randperm(pages - 1, generator=g)[:slots * per_slot] + 1).view(slots, per_slot).to(torch.int32)
        lengths = torch.tensor([1, PAGE, PAGE + 1, 300, per_slot * PAGE], dtype=torch.int32)
        index = torch.tensor([3, 0, 4, 1, 2])
        q = torch.randn(5, hq, dim, generator=g)
        ref = decode_attention_reference(q, k, v, table, lengths, index)
        out = decode_attention_triton(q, k, v, table, lengths, index)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # the shared-prompt kernels: slots 3 and 1 share page table[3, 0] (the groups' rows begin alike), slot 2
        # reads alone; rows name slots in another order than their own
        table[1, 0] = table[3, 0]
        lengths = torch.tensor([PAGE + 1, 1, 2 * PAGE + 7, 300, per_slot * PAGE], dtype=torch.int32)
        index = torch.tensor([3, 0, 4, 1, 2])
        members = torch.full((2, 16), -1, dtype=torch.int32)
        members[0, :2] = torch.tensor([3, 1])
        pages = torch.zeros(2, 3, dtype=torch.int32)
        pages[0, 0] = table[3, 0]
        start = torch.zeros(5, dtype=torch.int32)
        start[[3, 1]] = PAGE
        row_of = torch.full((5,), -1, dtype=torch.int32)
        row_of[index] = torch.arange(5, dtype=torch.int32)
        shared = SharedPrompts(members, pages, torch.tensor([1, 0], dtype=torch.int32), start, row_of,
                               torch.zeros(5, hq, dim), torch.zeros(5, hq), torch.zeros(5, hq))
        ref = decode_attention_reference(q, k, v, table, lengths, index)
        out = decode_attention_triton(q, k, v, table, lengths, index, shared)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert (shared.l[[0, 3]] > 0).all() and (shared.l[[1, 2, 4]] == 0).all()  # slots 3 and 1's rows only
    print("kernel = reference")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_triton_kernel_reads_the_pages_the_table_names() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "kernel = reference" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_shared_prefix_probe_kernels_equal_the_reference() -> None:
    """bench/cascade_probe.py's two kernels (a group's shared prompt pages read once, then each row's own) against
    the reference, in Triton's interpreter, before a GPU times them; members shuffled, some retired, a prompt
    with no whole page."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "bench" / "cascade_probe.py"), "--check"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "shared-prefix kernels = reference" in done.stdout, done.stderr[-3000:]


ENGINE_CHECK = textwrap.dedent("""
    import dataclasses
    from grail_pipeline.inference import model_runner
    from grail_pipeline.inference.decode_attention import decode_attention_triton
    from grail_pipeline.inference.engine import GroupRequest, SamplingParams
    from grail_pipeline.inference.fast_engine import FastEngine
    from grail_pipeline.inference.hf_engine import HFEngine
    from grail_pipeline.inference.kv_cache import PAGE
    from grail_pipeline.inference.loading import load_model
    from grail_pipeline.protocol.sat import problem_for_seed
    from grail_pipeline.protocol.tokenizer import builtin_tokenizer, prompt_ids
    shared_pages = []
    def traced(q, k, v, table, lengths, slot_index=None, shared=None):  # the GPU's kernels, in the interpreter
        shared_pages.append(int(shared.count.sum()))
        return decode_attention_triton(q, k, v, table, lengths, slot_index, shared)
    model_runner.decode_attention = traced
    tiny, tok = load_model("dummy:tiny", device="cpu"), builtin_tokenizer()
    params = SamplingParams(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=1, max_new_tokens=6)
    groups = []
    for i in range(5):  # prompts of 1 to 2 whole pages and a bit; 4 rollouts of different lengths each
        ids = (prompt_ids(tok, problem_for_seed(200 + i)) * 3)[:PAGE + 3 + 40 * (i % 3)]
        groups.append(GroupRequest(f"g{i}", ids, [6, 2, 4 + i % 3, 1]))
    ref = {r.request.key: r.completions for r in HFEngine(tiny, params, batch_size=4).generate(groups)}
    engine = FastEngine(tiny, params, slots=8, max_prompt_tokens=192, lag=2, shared_prompt_attention=True)
    assert engine.runner.shared is not None and engine.max_shared == 2
    got = {r.request.key: r.completions for r in engine.generate(groups)}
    assert got == ref, (got, ref)
    assert max(shared_pages) > 0  # the groups did read shared pages
    print("engine with shared prompts = reference")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_engine_with_shared_prompt_attention_gives_the_reference_tokens() -> None:
    """The fast engine with the shared-prompt kernels (its group entries kept as rollouts retire and slots are
    refilled, uploaded before each step) against the reference engine, every token, the kernels in Triton's
    interpreter in place of the GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", ENGINE_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "engine with shared prompts = reference" in done.stdout, done.stderr[-3000:]
