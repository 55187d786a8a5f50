"""`--kv-cache-gb auto`: the pages a batch size gets from the workload (mining/kv_sizing.py), on the CPU."""

from __future__ import annotations

import argparse

import pytest

from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.kv_cache import PAGE, full_pages, page_bytes
from grail_pipeline.mining.choices import resolve_choices
from grail_pipeline.mining.kv_sizing import MARGIN, KVDemand, kv_cache_gb, kv_demand
from grail_pipeline.mining.lengths import W1_SPEC, parse_length_profile
from grail_pipeline.mining.runtime import Runtime


def test_demand_counts_each_slots_own_pages_and_its_share_of_the_prompt() -> None:
    # a prompt of PAGE + 1 tokens: its last token at position PAGE, one page before it shared by the group;
    # completions of PAGE tokens write positions PAGE..2*PAGE-1: one page of their own throughout
    demand = kv_demand([PAGE + 1], parse_length_profile(f"fixed:{PAGE}"))
    assert demand.pages_per_slot == pytest.approx((16 * PAGE + PAGE) / (16 * PAGE))  # 1 own + 1/16 shared
    # a prompt ending at position 0 of its page, 2*PAGE tokens: own pages 1 for the first PAGE steps, then 2
    demand = kv_demand([1], parse_length_profile(f"fixed:{2 * PAGE}"))
    assert demand.pages_per_slot == pytest.approx(1.5)
    assert kv_demand([100], parse_length_profile("natural")) is None  # nothing to size from


def test_pages_take_the_margin_between_one_group_and_every_slots_longest() -> None:
    demand = KVDemand(5.0)
    assert demand.pages(512, 1535) == int(MARGIN * 512 * 5.0) + 1 < full_pages(512, 1535)
    assert demand.pages(16, 1535) == 16 * 24 + 1  # one group at its longest, whatever the demand
    assert KVDemand(30.0).pages(512, 1535) == full_pages(512, 1535)  # never more than every slot's longest


def test_auto_sizes_each_batch_size_from_the_prompts_and_lengths(tiny, tok) -> None:
    sampling = SamplingParams(tok.eos_token_id, tok.pad_token_id, max_new_tokens=1024)
    runtime = Runtime(tiny, tok, "fast", sampling, parse_length_profile(W1_SPEC), 512, "auto")
    config = tiny.model.config
    page = page_bytes(config.num_hidden_layers, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads, tiny.dtype.itemsize)
    demand = runtime._kv_demand
    assert 5 < demand.pages_per_slot < 7  # W1: prompts of ~240 tokens, completions of median 400
    gb = runtime.kv_cache_gb_for(512)
    assert gb == kv_cache_gb(demand, config, tiny.dtype.itemsize, 512, 1535)
    assert int(gb * 1e9 // page) == demand.pages(512, 1535) < full_pages(512, 1535) / 3  # whole pages back
    engine = runtime.engine(64)  # the engine holds auto's pages for its own size
    assert engine.kv_pages == demand.pages(64, 1535) and not engine.full_kv
    natural = Runtime(tiny, tok, "fast", sampling, parse_length_profile("natural"), 512, "auto")
    assert natural.kv_cache_gb_for(512) is None  # real weights' lengths: every slot's longest
    fixed = Runtime(tiny, tok, "fast", sampling, parse_length_profile(W1_SPEC), 512, 0.5)
    assert fixed.kv_cache_gb_for(512) == 0.5  # a number is taken as given
    full = Runtime(tiny, tok, "fast", sampling, parse_length_profile(W1_SPEC), 512, "full")
    assert full.kv_cache_gb_for(512) is None and full.engine(64).full_kv  # --kv-cache-gb full: every slot's longest


@pytest.mark.parametrize(("engine", "given", "resolved"), [("fast", None, "auto"), ("fast", "full", "full"),
                                                          ("fast", 2.5, 2.5), ("hf", None, None)])
def test_the_fast_engine_sizes_its_cache_from_the_workload_unless_told(engine, given, resolved) -> None:
    """auto is the default (no preemption, no cost in speed on the H200: bench/NOTES.md v18); hf has no cache."""
    args = argparse.Namespace(model="dummy:tiny", device="cpu", engine=engine, length_profile=None,
                              max_new_tokens=1024, max_prompt_tokens=512, kv_cache_gb=given)
    assert resolve_choices(args).kv_cache_gb == resolved
