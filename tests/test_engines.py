"""The fast engine against the reference engine (transformers `generate`) on the tiny model, CPU, eager.

With top_k=1 both engines sample deterministically (the argmax after the repetition penalty and the
target-length mask), so for the same prompts and targets they must produce the same tokens. The
fast engine's continuous batching (more groups than slots, refilled slots, a lag of 1 or 3 steps
between launch and read-back) must not change a single token.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.engine import EngineStats, GroupRequest, GroupResult, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine, switch_interval
from grail_pipeline.inference.hf_engine import HFEngine, cut_at_eos
from grail_pipeline.inference.kv_cache import PAGE, KVCache, full_pages, kv_cache_bytes, page_bytes, pages_for
from grail_pipeline.inference.kv_pages import PagePool
from grail_pipeline.inference.model_runner import decode_widths, prefill_width
from grail_pipeline.protocol.sat import problem_for_seed
from grail_pipeline.protocol.tokenizer import prompt_ids

MAX_NEW = 8
SLOTS = 6
TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog.", " ".join(f"word{i}" for i in range(30))]


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    """Prompts of 1, 10, 80 (over one 64-token prefill block) and ~200 tokens (a real SAT chat)."""
    out = [tok(text).input_ids for text in TEXTS] + [prompt_ids(tok, problem_for_seed(7))]
    assert [len(p) for p in out[:3]] == [1, 10, 80] and len(out[3]) > 128
    return out


def sampling(tok, **changes) -> SamplingParams:
    """The miner's settings (temperature 0.7, top-p 0.95, repetition penalty 1.1) with top_k=1: deterministic."""
    return dataclasses.replace(SamplingParams(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                              top_k=1, max_new_tokens=MAX_NEW), **changes)


def requests(prompts: list[list[int]]) -> list[GroupRequest]:
    """Five groups, 14 rollouts in all, for 6 slots: groups wait for free slots and slots are refilled."""
    return [
        GroupRequest("one-token prompt", prompts[0], [1, 4, 5]),
        GroupRequest("sentence", prompts[1], [5, 2, 6, 3]),
        GroupRequest("two blocks", prompts[2], [6, 6]),
        GroupRequest("sat", prompts[3], [3, 5, 4, 6]),
        GroupRequest("short", prompts[1][:3], [4]),
    ]


def by_key(results: list[GroupResult]) -> dict[str, list[list[int]]]:
    keys = [r.request.key for r in results]
    assert len(keys) == len(set(keys)), "a group was emitted twice"
    return {r.request.key: r.completions for r in results}


def check_stats(stats: EngineStats, results: list[GroupResult]) -> None:
    assert stats.generated_tokens == sum(len(c) for r in results for c in r.completions)
    assert stats.occupied_slot_steps == stats.generated_tokens + stats.preempted_tokens  # the hf engine: none
    assert stats.decode_steps > 0 and 0 < stats.occupancy <= 1
    assert stats.slot_steps >= stats.occupied_slot_steps
    report = stats.as_dict()
    assert report["generated_tokens"] == stats.generated_tokens and 0 < report["batch_occupancy"] <= 1


_reference_cache: dict[float, tuple[list[GroupResult], EngineStats]] = {}


def reference(tiny, tok, prompts, penalty: float) -> tuple[list[GroupResult], EngineStats]:
    """The hf engine's results (one `generate` call per group), computed once per penalty."""
    if penalty not in _reference_cache:
        engine = HFEngine(tiny, sampling(tok, repetition_penalty=penalty), batch_size=4)
        _reference_cache[penalty] = (engine.generate(requests(prompts)), engine.stats)
    return _reference_cache[penalty]


@pytest.mark.parametrize("penalty", [1.1, 2.0])  # 2.0: the argmax changes from step to step
@pytest.mark.parametrize("lag", [1, 3])
def test_fast_engine_matches_reference_with_forced_lengths(tiny, tok, prompts, lag, penalty) -> None:
    ref_results, ref_stats = reference(tiny, tok, prompts, penalty)
    engine = FastEngine(tiny, sampling(tok, repetition_penalty=penalty), slots=SLOTS, max_prompt_tokens=256, lag=lag)
    assert not len(engine.runner.graphs) and engine.runner._kernels_at(SLOTS)[0].__name__ == "pre_attention"  # eager
    results = engine.generate(requests(prompts))

    expected, got = by_key(ref_results), by_key(results)
    assert got == expected
    eos = tok.eos_token_id
    for result in results:
        for completion, target in zip(result.completions, result.request.targets, strict=True):
            assert len(completion) == target
            assert completion[-1] == eos and eos not in completion[:-1]
        assert result.seconds >= 0
    if penalty == 2.0:
        assert any(len(set(c[:-1])) > 2 for r in results for c in r.completions)  # not one repeated token

    check_stats(ref_stats, ref_results)
    check_stats(engine.stats, results)
    stats = engine.stats
    assert stats.slot_steps == stats.decode_steps * SLOTS
    assert stats.prefill_seconds > 0 and stats.context_tokens > stats.generated_tokens
    # groups overlapped: fewer steps than running them one after another
    assert stats.decode_steps < sum(max(r.targets) for r in requests(prompts))


def test_natural_lengths_stop_at_eos_or_max_new_tokens(tiny, tok, prompts) -> None:
    """No targets: a completion ends at the model's own EOS, or after max_new_tokens.

    A random model never picks the real <|im_end|>, so the EOS here is a token the model is known to
    produce: the third token it generates greedily after prompt 0 (penalty 2.0 varies the tokens).
    """
    base = sampling(tok, repetition_penalty=2.0)
    probe = FastEngine(tiny, base, slots=SLOTS, max_prompt_tokens=256)
    first = probe.generate([GroupRequest("a", prompts[0], [None])])[0].completions[0]
    assert len(first) == MAX_NEW and tok.eos_token_id not in first
    stop = first[2]
    assert stop not in first[:2]
    params = dataclasses.replace(base, eos_token_id=stop)
    groups = [GroupRequest("stops", prompts[0], [None, None]), GroupRequest("mixed", prompts[1], [None, 3]),
              GroupRequest("sat", prompts[3], [None])]

    hf = HFEngine(tiny, params, batch_size=4)
    ref = by_key(hf.generate(groups))
    for lag in (1, 3):
        fast = FastEngine(tiny, params, slots=SLOTS, max_prompt_tokens=256, lag=lag)
        results = fast.generate(groups)
        assert by_key(results) == ref
        check_stats(fast.stats, results)
    assert ref["stops"] == [first[:3], first[:3]]
    assert len(ref["mixed"][1]) == 3 and ref["mixed"][1][-1] == stop
    natural = [ref["mixed"][0], ref["sat"][0]]
    for completion in natural:
        assert completion == cut_at_eos(completion, stop)
        assert (completion[-1] == stop) or len(completion) == MAX_NEW
    assert any(len(c) == MAX_NEW and stop not in c for c in natural)  # at least one ran to the limit


def test_requests_the_fast_engine_cannot_hold_are_user_errors(tiny, tok, prompts) -> None:
    engine = FastEngine(tiny, sampling(tok), slots=4, max_prompt_tokens=64)
    with pytest.raises(UserError, match="a group of 5 rollouts needs at least that many slots"):
        engine.generate([GroupRequest("big", prompts[1], [3] * 5)])
    with pytest.raises(UserError, match="a prompt of 80 tokens exceeds the fast engine's limit of 64"):
        engine.generate([GroupRequest("long", prompts[2], [3] * 4)])
    # exactly the limit is fine, and so is a group as large as the slots
    engine = FastEngine(tiny, sampling(tok), slots=4, max_prompt_tokens=80)
    (result,) = engine.generate([GroupRequest("fits", prompts[2], [2] * 4)])
    assert [len(c) for c in result.completions] == [2] * 4


def test_targets_beyond_max_new_tokens_stop_at_the_limit(tiny, tok, prompts) -> None:
    """Both engines cut a rollout at max_new_tokens, target or not (the runtime refuses such profiles)."""
    group = [GroupRequest("g", prompts[1], [MAX_NEW + 3, 2])]
    fast = FastEngine(tiny, sampling(tok), slots=SLOTS, max_prompt_tokens=64).generate(group)
    hf = HFEngine(tiny, sampling(tok), batch_size=4).generate(group)
    assert by_key(fast) == by_key(hf)
    assert [len(c) for c in fast[0].completions] == [MAX_NEW, 2]


def test_engine_stats_reset(tiny, tok, prompts) -> None:
    engine = FastEngine(tiny, sampling(tok), slots=SLOTS, max_prompt_tokens=64)
    engine.generate([GroupRequest("g", prompts[1], [2, 3])])
    assert engine.stats.generated_tokens == 5
    engine.reset_stats()
    assert engine.stats == EngineStats() and engine.stats.occupancy == 0.0
    assert EngineStats().as_dict()["step_ms"] == 0.0


def test_switch_interval_is_set_for_the_run_and_put_back() -> None:
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with switch_interval(1e-4):
            assert sys.getswitchinterval() == pytest.approx(1e-4)
            raise RuntimeError("engine failed")
    assert sys.getswitchinterval() == before


def test_prefill_widths_are_multiples_of_64_capped_by_the_cache() -> None:
    assert [prefill_width(n, 1536) for n in (1, 63, 64, 65, 270, 511)] == [64, 64, 64, 128, 320, 512]
    assert prefill_width(700, 600) == 599  # a prompt near the cache's end fills it
    # capture_graphs' set: every width a prompt of up to 512 tokens can need
    assert sorted({prefill_width(n, 1536) for n in range(1, 512)}) == list(range(64, 513, 64))


def test_kv_cache_pages_hold_a_prompt_and_decode_writes() -> None:
    """Writes land in the pages the table names (a prompt into every slot of its group, a step at each slot's own
    position); a slot's entries it does not hold name the scratch page, which takes what free rows write."""
    layers, slots, pages, kv_heads, max_len, head_dim = 2, 3, 8, 2, 3 * PAGE, 3
    cache = KVCache(layers, slots, pages, kv_heads, max_len, head_dim, torch.float32, torch.device("cpu"))
    assert cache.k.shape == cache.v.shape == (layers, pages, PAGE, kv_heads, head_dim)
    assert cache.table.shape == (slots, 3) and not cache.table.any()  # every entry the scratch page
    assert cache.nbytes == kv_cache_bytes(layers, pages, kv_heads, head_dim, 4) == 2 * layers * pages * PAGE * 6 * 4
    pool = PagePool(pages, slots, 3)
    changes = pool.grow(np.array([2, 0]), np.array([PAGE, PAGE]))  # two pages each: positions 0..PAGE
    cache.set_pages(*(torch.from_numpy(a) for a in (changes.slots, changes.columns, changes.pages)))
    assert cache.table.tolist() == pool.table.tolist() and sorted(pool.table[[0, 2], :2].ravel()) == [1, 2, 3, 4]
    width = PAGE + 5
    prompt_k, prompt_v = torch.randn(width, kv_heads, head_dim), torch.randn(width, kv_heads, head_dim)
    group = torch.tensor([2, 0])
    cache.write(1, cache.rows(group[:, None], torch.arange(width)[None, :]), prompt_k, prompt_v)

    def at(layer: int, slot: int, position: int) -> torch.Tensor:
        return cache.k[layer, pool.table[slot, position // PAGE], position % PAGE]

    for slot in (0, 2):
        assert all(torch.equal(at(1, slot, p), prompt_k[p]) for p in range(width))
    assert not cache.k[0].any() and not cache.k[1, 5:].any()  # no other layer, no page nobody holds
    step_k, step_v = torch.randn(slots, kv_heads, head_dim), torch.randn(slots, kv_heads, head_dim)
    positions = torch.tensor([width, 7, PAGE + 1])
    cache.write(1, cache.rows(torch.arange(slots), positions), step_k, step_v)
    assert torch.equal(at(1, 0, width), step_k[0]) and torch.equal(at(1, 2, PAGE + 1), step_k[2])
    assert torch.equal(cache.k[1, 0, 7], step_k[1])  # slot 1 holds no page: its row went to the scratch page
    assert torch.equal(at(1, 2, PAGE), prompt_k[PAGE])  # the prompt before the written position is kept


def test_page_pool_hands_out_pages_by_use_and_takes_them_back() -> None:
    pool = PagePool(pages=7, slots=3, pages_per_slot=4)
    assert pool.available == 6  # page 0 is the scratch page
    first = pool.grow(np.array([0, 1]), np.array([0, PAGE]))  # one page, then two
    assert (first.slots.tolist(), first.columns.tolist(), first.pages.tolist()) == ([0, 1, 1], [0, 0, 1], [1, 2, 3])
    assert len(pool.grow(np.array([0, 1]), np.array([PAGE - 1, PAGE + 9]))) == 0  # held already: no change
    assert pool.grow(np.array([2]), np.array([4 * PAGE - 1])) is None and pool.available == 3  # 4 > 3: nothing
    back = pool.release([1])
    assert (back.slots.tolist(), back.columns.tolist(), back.pages.tolist()) == ([1, 1], [0, 1], [0, 0])
    assert pool.available == 5 and not pool.table[1].any() and pool.held.tolist() == [1, 0, 0]
    again = pool.grow(np.array([2]), np.array([10 * PAGE]))  # past the row's end: a slot holds its row at most
    assert again.columns.tolist() == [0, 1, 2, 3] and again.pages.tolist()[:2] == [2, 3]  # the lowest first
    assert pool.available == 1


def test_a_group_shares_the_pages_its_prompt_fills_and_each_slot_owns_the_one_it_ends_in() -> None:
    pool = PagePool(pages=12, slots=4, pages_per_slot=5)
    tokens = 2 * PAGE + 10  # positions 0..2*PAGE+8 before the last token: two whole pages, and a third begun
    assert pool.prompt_pages(tokens) == (2, 1) and pool.admission_pages(3, tokens) == 2 + 3
    assert pool.prompt_pages(PAGE) == (0, 1) and pool.prompt_pages(PAGE + 1) == (1, 1)  # the last token: decode's
    changes = pool.admit([3, 0, 2], tokens)
    assert pool.table[[3, 0, 2], :2].tolist() == [[1, 2]] * 3 and sorted(pool.table[[3, 0, 2], 2]) == [3, 4, 5]
    assert pool.refs[[1, 2]].tolist() == [3, 3] and pool.refs[[3, 4, 5]].tolist() == [1, 1, 1]
    assert len(changes) == 9 and pool.held.tolist() == [3, 0, 3, 3] and pool.available == 6
    assert pool.admit([1], 9 * PAGE) is None and pool.available == 6  # 9 pages > 6: nothing taken
    pool.release([3, 0])
    assert pool.available == 8 and pool.refs[[1, 2]].tolist() == [1, 1]  # the shared pages stay: slot 2 reads them
    pool.release([2])
    assert pool.available == 11 and not pool.refs.any() and not pool.table.any()


def long_prompts(tok, n: int) -> list[GroupRequest]:
    """n groups of 4 rollouts whose prompts (123 tokens) fill two pages; a rollout crosses into a third at its sixth
    token, once the engine has read back a few of its tokens (the lag is 3 steps)."""
    out = []
    for i in range(n):
        ids = prompt_ids(tok, problem_for_seed(100 + i))
        ids = (ids * 2)[:2 * PAGE - 5]
        out.append(GroupRequest(f"g{i}", ids, [MAX_NEW - (i % 3), MAX_NEW, 3 + i % 4, MAX_NEW]))
    return out


def test_a_kv_cache_smaller_than_the_slots_need_preempts_and_changes_no_token(tiny, tok) -> None:
    """64 slots over the least cache a 16-rollout group needs at its longest (81 pages, against 321 for every slot):
    sixteen groups fill the slots with their prompts' pages (5 each, the first shared by the group's 4 rollouts),
    their growth runs the pages out, the youngest groups are preempted and run again from their prompts, and every
    token is the reference engine's."""
    groups = long_prompts(tok, 16)
    params = sampling(tok, repetition_penalty=2.0)
    ref = by_key(HFEngine(tiny, params, batch_size=4).generate(groups))
    config = tiny.model.config
    page = page_bytes(config.num_hidden_layers, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads, 4)
    engine = FastEngine(tiny, params, slots=64, max_prompt_tokens=256, lag=3, kv_cache_gb=81.5 * page / 1e9)
    assert engine.kv_pages == 16 * pages_for(256 + MAX_NEW - 1) + 1 == 81 and not engine.full_kv
    results = engine.generate(groups)
    assert by_key(results) == ref
    stats = engine.stats
    check_stats(stats, results)
    assert stats.preemptions > 0 and stats.preempted_tokens > 0
    assert 0 < stats.peak_kv_pages <= 80
    kv = next(c for c in engine.memory if c.name == "kv_cache")
    assert kv.bytes == 81 * page and "81 pages" in kv.what


def test_the_default_cache_holds_every_slot_at_its_longest_and_never_preempts(tiny, tok) -> None:
    groups = long_prompts(tok, 12)
    engine = FastEngine(tiny, sampling(tok), slots=32, max_prompt_tokens=256)
    assert engine.full_kv and engine.kv_pages == full_pages(32, 256 + MAX_NEW - 1) == 32 * 5 + 1
    results = engine.generate(groups)
    assert len(results) == 12 and engine.stats.preemptions == 0 and engine.stats.peak_kv_pages > 0


def test_a_kv_cache_too_small_for_one_group_is_one_line(tiny, tok) -> None:
    with pytest.raises(UserError, match=r"--kv-cache-gb 0.0001 holds \d+ KV pages; 16 rollouts at their longest need"):
        FastEngine(tiny, sampling(tok), slots=32, max_prompt_tokens=256, kv_cache_gb=0.0001)


def test_decode_widths_step_by_an_eighth_in_multiples_of_16() -> None:
    assert decode_widths(512) == [64, 128, 192, 256, 320, 384, 448, 512]
    assert decode_widths(1024) == [128 * k for k in range(1, 9)]
    assert decode_widths(200) == [32, 64, 96, 128, 160, 192, 200]
    assert decode_widths(6) == [6] and decode_widths(32) == [16, 32]


def test_narrow_decode_widths_give_the_same_tokens(tiny, tok, prompts) -> None:
    """32 slots (widths 16 and 32) for groups of at most 4 rollouts: most steps run at width 16 on whichever slots
    are occupied, topped up with free ones, and every token is the reference engine's."""
    ref_results, _ = reference(tiny, tok, prompts, 1.1)
    engine = FastEngine(tiny, sampling(tok), slots=32, max_prompt_tokens=256, lag=3)
    results = engine.generate(requests(prompts))
    assert by_key(results) == by_key(ref_results)
    stats = engine.stats
    check_stats(stats, results)
    assert stats.slot_steps == 32 * stats.decode_steps
    assert 16 * stats.decode_steps <= stats.computed_slot_steps < 32 * stats.decode_steps
    assert stats.as_dict()["computed_rows_share"] < 1
