"""The fast engine's on-device sampling against transformers' own logits processors and warpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grail_pipeline.inference.hf_engine import TargetLengthProcessor
from grail_pipeline.inference.sampler import apply_target_lengths, penalize_repeats, sample_top_k_top_p

EOS = 7


def miner_warpers(temperature: float = 0.7, top_k: int = 50, top_p: float = 0.95) -> LogitsProcessorList:
    """What `generate(do_sample=True)` applies after the processors, in its order."""
    return LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                                TopPLogitsWarper(top_p)])


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of very different shapes: flat, peaked, with a few dominant tokens."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 0.5, 1.0, 2.0, 4.0, 8.0])[torch.arange(rows) % 6]
    logits = torch.randn(rows, vocab, generator=g) * scale[:, None]
    logits[rows // 2:, :3] += 6.0  # a handful of tokens hold most of the mass
    return logits


def test_penalize_repeats_is_transformers_repetition_penalty() -> None:
    g = torch.Generator().manual_seed(0)
    rows, vocab = 16, 1000
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[0, :10] = 0.0  # zero is divided (unchanged): both agree
    seen = torch.rand(rows, vocab, generator=g) < torch.linspace(0.001, 0.5, rows)[:, None]
    seen[:, 0] = True  # every row has a token in its history
    # transformers reads the history as token ids: each row's seen tokens, padded by repeating one of them
    width = int(seen.sum(1).max())
    input_ids = torch.stack([torch.cat([row.nonzero().squeeze(1), row.nonzero()[0].expand(width - int(row.sum()))])
                             for row in seen])
    expected = RepetitionPenaltyLogitsProcessor(1.1)(input_ids, logits.clone())
    got = penalize_repeats(logits, seen, 1.1)
    assert torch.equal(got, expected)
    assert torch.equal(got[~seen], logits[~seen])  # unseen tokens untouched
    assert (got[seen] <= logits[seen]).all()  # seen tokens never gain


def support_of(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[set[int]]:
    """Every token `sample_top_k_top_p` can return, found by steering its noise.

    Noise ~0 at one top-k position makes that position win whenever its probability is not zero;
    otherwise the most likely token wins (it is always in the support). The union over positions is
    the support.
    """
    rows = logits.shape[0]
    found: list[set[int]] = [set() for _ in range(rows)]
    for j in range(top_k):
        noise = torch.ones(rows, top_k)
        noise[:, j] = 1e-30
        for row, token in enumerate(sample_top_k_top_p(logits, temperature, top_k, top_p, noise).tolist()):
            found[row].add(token)
    return found


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 50, 0.95), (1.0, 20, 0.5), (0.3, 50, 1.0)])
def test_sampling_support_is_temperature_top_k_top_p(temperature, top_k, top_p) -> None:
    logits = random_logits(24, 3000, seed=1)
    warped = miner_warpers(temperature, top_k, top_p)(torch.zeros(24, 1, dtype=torch.long), logits.clone())
    expected = [set(torch.isfinite(row).nonzero().squeeze(1).tolist()) for row in warped]
    assert support_of(logits, temperature, top_k, top_p) == expected
    sizes = {len(s) for s in expected}
    if top_p == 1.0:
        assert sizes == {top_k}
    else:
        assert min(sizes) < 10 and max(sizes) >= top_k // 2  # top-p cut some rows hard and others little


def test_exponential_race_samples_the_filtered_softmax() -> None:
    """Empirical frequencies of 400k draws against softmax of the warped logits (chi-square, fixed seed)."""
    vocab, top_k, draws = 24, 12, 400_000
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, vocab, generator=g) * 1.5
    warped = miner_warpers(0.7, top_k, 0.9)(torch.zeros(1, 1, dtype=torch.long), row.clone())[0]
    probs = torch.softmax(warped.double(), dim=-1)
    support = probs > 0
    assert 3 < int(support.sum()) < top_k  # top-p removed part of the top-k

    noise = torch.empty(draws, top_k).exponential_(generator=g)
    tokens = sample_top_k_top_p(row.expand(draws, vocab), 0.7, top_k, 0.9, noise)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~support].sum() == 0
    expected = probs[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # ~5 sigma; a wrong distribution gives thousands
    # a sampler that ignores top-p or the temperature would be caught by the same statistic
    plain = torch.softmax(row[0].double(), dim=-1)
    wrong = plain[support] / plain[support].sum() * draws
    assert float(((counts[support] - wrong) ** 2 / wrong).sum()) > 100 * (dof + 6 * math.sqrt(2 * dof))


def test_apply_target_lengths() -> None:
    vocab = 16
    logits = random_logits(6, vocab, seed=4)
    # row 0: no target; rows 1 and 3: before the target; row 2: at it; rows 4 and 5: past it
    generated = torch.tensor([0, 3, 4, 4, 9, 5])
    targets = torch.tensor([0, 5, 5, 6, 5, 1])
    out = apply_target_lengths(logits, generated, targets, EOS)
    others = torch.arange(vocab) != EOS
    assert torch.equal(out[0], logits[0])  # target 0: untouched
    for row in (1, 3):  # before the target: EOS impossible, nothing else changes
        assert out[row, EOS] == float("-inf") and torch.equal(out[row, others], logits[row, others])
    for row in (2, 4, 5):  # at the target (generated == target - 1) or past it: EOS certain
        assert out[row, EOS] == 0.0 and torch.isinf(out[row, others]).all() and (out[row, others] < 0).all()
    assert torch.equal(logits, random_logits(6, vocab, seed=4))  # the input is not modified


def test_apply_target_lengths_matches_the_reference_processor() -> None:
    """The hf engine's processor (one step for the whole batch) agrees with the per-row version at every step."""
    vocab, prompt_len = 16, 5
    targets = [None, 1, 2, 4, 7]
    logits = random_logits(len(targets), vocab, seed=5)
    for step in range(8):
        input_ids = torch.zeros(len(targets), prompt_len + step, dtype=torch.long)
        expected = TargetLengthProcessor(targets, prompt_len, EOS)(input_ids, logits.clone())
        got = apply_target_lengths(logits, torch.full((len(targets),), step),
                                   torch.tensor([t or 0 for t in targets]), EOS)
        live = [row for row, t in enumerate(targets) if t is None or step <= t - 1]
        assert torch.equal(got[live], expected[live]), step
        # past its target a row is finished (generate pads it); the runner keeps EOS forced there
        past = [row for row, t in enumerate(targets) if t is not None and step > t - 1]
        assert all(got[row, EOS] == 0 and torch.isinf(got[row]).sum() == vocab - 1 for row in past)

