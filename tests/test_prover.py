"""The batched prover against the public miner's method (one unbatched forward per rollout) on the tiny model."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.proving.batched import BatchedProver, row_exact_linears
from grail_pipeline.proving.prefix import PrefixProver
from grail_pipeline.proving.proofs import ProofJob, RolloutProof
from grail_pipeline.proving.reference import ReferenceProver
from grail_pipeline.proving.row_invariance import RowInvariance, row_functions

# (prompt length, completion lengths): a one-token completion, long and short rows, equal lengths
GROUPS = [(3, [16, 30, 17, 29]), (11, [40, 1, 22]), (25, [33, 34, 20, 8, 33]), (1, [12])]


@pytest.fixture(scope="module")
def jobs(tiny) -> list[ProofJob]:
    rng = random.Random(1)
    vocab = tiny.vocab_size
    out = []
    for g, (prompt_len, lengths) in enumerate(GROUPS):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        completions = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        out.append(ProofJob(prompt, completions, hashlib.sha256(f"window {g}".encode()).hexdigest()))
    return out


@pytest.fixture(scope="module")
def reference(tiny, jobs) -> list[list[RolloutProof]]:
    return ReferenceProver(tiny).prove_many(jobs)


def assert_same(got: list[list[RolloutProof]], expected: list[list[RolloutProof]], jobs: list[ProofJob]) -> None:
    assert len(got) == len(expected) == len(jobs)
    for group_got, group_expected, job in zip(got, expected, jobs, strict=True):
        assert len(group_got) == len(group_expected) == len(job.completions)
        for a, b, completion in zip(group_got, group_expected, job.completions, strict=True):
            n = len(job.prompt_ids) + len(completion)
            assert a.sketches.shape == (n,) and a.indices.shape == (n, PROFILE.proof_topk)
            assert a.sketches.device.type == a.indices.device.type == "cpu"
            assert torch.equal(a.sketches, b.sketches)
            assert torch.equal(a.indices, b.indices)
            assert len(a.token_logprobs) == len(b.token_logprobs) == n
            assert a.token_logprobs[:len(job.prompt_ids)] == [0.0] * len(job.prompt_ids)
            assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-4


def test_reference_prover_shape(reference, jobs) -> None:
    """Different randomness per group gives different sketches for the same hidden states."""
    assert all(lp < 0 for group in reference for proof in group for lp in proof.token_logprobs[32:])
    first = reference[0][0]
    assert first.sketches.dtype == first.indices.dtype == torch.int64
    assert ((first.sketches >= 0) & (first.sketches < PROFILE.prime_q)).all()


@pytest.mark.parametrize("settings", [
    dict(),  # the defaults: 16384 tokens, 12 % waste
    dict(max_batch_tokens=64, max_waste=0.0),  # only equal lengths share a batch
    dict(max_batch_tokens=10**6, max_waste=1.0, logit_chunk=7),  # one batch of everything, logits in chunks of 7
    dict(max_batch_tokens=1),  # one row per batch
    dict(max_batch_tokens=200, max_waste=0.3, logit_chunk=1),
], ids=["default", "no-waste", "one-batch", "one-row", "mixed"])
def test_batched_prover_matches_reference(tiny, jobs, reference, settings) -> None:
    prover = BatchedProver(tiny, **settings)
    assert_same(prover.prove_many(jobs), reference, jobs)


def test_prove_is_prove_many_of_one(tiny, jobs, reference) -> None:
    prover = BatchedProver(tiny, max_batch_tokens=128)
    for job, expected in zip(jobs, reference):
        assert_same([prover.prove(job.prompt_ids, job.completions, job.randomness_hex)], [expected], [job])
    reference_prover = ReferenceProver(tiny)
    job = jobs[1]
    assert_same([reference_prover.prove(job.prompt_ids, job.completions, job.randomness_hex)], [reference[1]], [job])


def test_groups_sharing_a_batch_keep_their_own_randomness(tiny, jobs) -> None:
    """The same rollout under two randomness values: same indices, different sketches, each matching its own."""
    job = jobs[0]
    other = ProofJob(job.prompt_ids, job.completions, hashlib.sha256(b"another window").hexdigest())
    both = BatchedProver(tiny, max_batch_tokens=10**6, max_waste=1.0).prove_many([job, other])
    alone = ReferenceProver(tiny).prove_many([job, other])
    assert_same(both, alone, [job, other])
    assert torch.equal(both[0][0].indices, both[1][0].indices)
    assert not torch.equal(both[0][0].sketches, both[1][0].sketches)


def test_nothing_to_prove(tiny) -> None:
    empty = ProofJob([1, 2, 3], [], "ab" * 32)
    for prover in (BatchedProver(tiny), ReferenceProver(tiny)):
        assert prover.prove_many([]) == []
        assert prover.prove_many([empty, empty]) == [[], []]


@pytest.mark.parametrize("max_batch_tokens, max_waste", [(1, 0.12), (64, 0.0), (300, 0.12), (1000, 0.5),
                                                          (16384, 0.12), (10**9, 1.0)])
def test_batches_respect_budget_and_padding_and_cover_every_row(tiny, max_batch_tokens, max_waste) -> None:
    prover = BatchedProver(tiny, max_batch_tokens=max_batch_tokens, max_waste=max_waste)
    rng = random.Random(max_batch_tokens)
    for trial in range(50):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(0, 60))]
        if trial % 5 == 0:
            lengths = [rng.choice([17, 17, 200]) for _ in lengths]  # many equal lengths
        batches = prover.batches(lengths)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
        widths = [max(lengths[i] for i in batch) for batch in batches]
        assert widths == sorted(widths, reverse=True)  # longest first
        for batch, width in zip(batches, widths):
            assert batch and lengths[batch[0]] == width
            assert len(batch) == 1 or len(batch) * width <= max_batch_tokens
            assert min(lengths[i] for i in batch) >= (1.0 - max_waste) * width
    assert prover.batches([]) == []
    assert prover.batches([5000]) == [[0]]  # a row over the budget is a batch of its own


def test_batches_fill_up_to_the_budget(tiny) -> None:
    prover = BatchedProver(tiny, max_batch_tokens=100, max_waste=0.5)
    assert prover.batches([10] * 25) == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert prover.batches([10, 6, 4]) == [[0, 1], [2]]  # 4 < (1 - 0.5) * 10


def _linears(n: int = 3) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(6, 5) for _ in range(n)]


def test_row_exact_linears_computes_each_row_alone_and_restores_forward() -> None:
    linears = _linears()
    lengths = [4, 2, 3]
    x = torch.randn(3, 4, 6)
    with row_exact_linears(linears, lengths):
        for m in linears:
            assert "forward" in vars(m)
            out = m(x)
            for b, n in enumerate(lengths):
                assert torch.equal(out[b, :n], F.linear(x[b, :n], m.weight, m.bias))
                assert (out[b, n:] == 0).all()  # padding is not computed
    for m in linears:
        assert "forward" not in vars(m)
        assert torch.equal(m(x), F.linear(x, m.weight, m.bias))


def test_row_exact_linears_restores_forward_after_an_exception() -> None:
    linears = _linears()
    with pytest.raises(RuntimeError, match="boom"):
        with row_exact_linears(linears, [1, 2]):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in linears)


def test_row_exact_linears_keeps_an_existing_instance_forward() -> None:
    """A forward already set on the instance (a hook wrapper, as accelerate installs) is put back, not dropped."""
    linears = _linears(2)
    wrapped = linears[0].forward
    calls = []

    def hooked(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return wrapped(x)

    linears[0].forward = hooked
    with row_exact_linears(linears, [1, 2]):
        assert linears[0].forward is not hooked
    assert linears[0].forward is hooked and "forward" not in vars(linears[1])
    linears[0](torch.randn(2, 6))
    assert calls == [(2, 6)]


def test_row_exact_linears_single_row_changes_nothing() -> None:
    linears = _linears(1)
    with row_exact_linears(linears, [4]):
        assert "forward" not in vars(linears[0])  # one row is already the validator's shape


def test_batched_prover_patches_only_the_down_projection(tiny) -> None:
    prover = BatchedProver(tiny)
    hidden = tiny.model.config.hidden_size
    names = {name.rsplit(".", 1)[-1] for name, m in tiny.model.named_modules() if any(m is x for x in prover.linears)}
    assert names == {"down_proj"}
    assert len(prover.linears) == tiny.model.config.num_hidden_layers
    assert all(m.in_features > hidden for m in prover.linears)


@pytest.mark.parametrize("settings", [
    dict(),  # every row count exact (off the GPU), each group one run
    dict(max_rows=40),  # groups cut into runs of at most 40 completion rows; a 40-row rollout alone
    dict(inexact=(12, 28, 46), max_rows=48),  # a 12-token sequence proved whole; runs of 28 and 46 rows padded
], ids=["default", "runs", "inexact-lengths"])
def test_prefix_prover_matches_reference(tiny, jobs, reference, settings) -> None:
    settings = dict(settings)
    inexact = settings.pop("inexact", ())
    invariance = None
    if inexact:
        exact = np.ones(200, dtype=bool)
        exact[list(inexact)] = False
        invariance = RowInvariance(exact, max_length=100)
    prover = PrefixProver(tiny, invariance=invariance, **settings)
    assert_same(prover.prove_many(jobs), reference, jobs)


def test_prefix_prover_sends_inexact_lengths_whole(tiny, jobs) -> None:
    exact = np.ones(200, dtype=bool)
    exact[[33, 58]] = False  # three sequences of 33 tokens and two of 58 in GROUPS
    prover = PrefixProver(tiny, invariance=RowInvariance(exact, max_length=100))
    shared, whole = prover._plan(jobs)
    assert sorted(len(row.tokens) for row in whole) == [33, 33, 33, 58, 58]
    assert sum(len(run.members) for p in shared for run in p.runs) + len(whole) == sum(len(j.completions) for j in jobs)


def test_row_invariance_padding_and_lengths() -> None:
    exact = np.array([False, True, True, False, False, True, False, True])
    invariance = RowInvariance(exact, max_length=5)
    assert invariance.inexact_lengths == [3, 4]
    assert [invariance.padded(n) for n in (1, 3, 4, 6, 7)] == [1, 5, 5, 7, 7]
    assert RowInvariance(exact[:7], max_length=5).padded(6) is None
    assert [invariance.padded(n, multiple=2) for n in (1, 2, 3)] == [2, 2, None]  # 4 and 6 are inexact
    assert invariance.sequence_is_exact(5) and not invariance.sequence_is_exact(4)
    assert not invariance.sequence_is_exact(7)  # exact rows, but longer than any measured sequence


def test_row_invariance_measures_every_length_and_each_step(tiny) -> None:
    invariance = RowInvariance.measure(tiny.model.get_decoder(), max_length=20, max_rows=64, step=16)
    measured = set(range(1, 21)) | {32, 48, 64}
    assert len(invariance.exact) == 65
    unmeasured = [m for m in range(65) if m not in measured]
    assert not invariance.exact[unmeasured].any()
    # what `exact` means, checked again with other random rows: a count is exact if and only if every
    # per-row function of layer 0 gives its rows the bits they get inside the 64-row product
    generator = torch.Generator().manual_seed(7)
    for m in sorted(measured):
        same = []
        with torch.inference_mode():
            for fn, row_shape in row_functions(tiny.model.get_decoder()):
                x = torch.randn(64, *row_shape, generator=generator)
                same.append(torch.equal(fn(x[:m]), fn(x)[:m]))
        assert all(same) == bool(invariance.exact[m]), (m, same)


def test_runtime_makes_one_prover_per_engine_kind(tiny) -> None:
    """Qwen2 on the fast engine proves on shared prompts; the reference method keeps the public miner's prover."""
    from grail_pipeline.inference.engine import SamplingParams
    from grail_pipeline.mining.runtime import Runtime

    sampling = SamplingParams(eos_token_id=1, pad_token_id=0, max_new_tokens=64)
    runtime = Runtime(tiny, None, "fast", sampling, None, 32)
    prover = runtime.prover()
    assert isinstance(prover, PrefixProver) and runtime.prover() is prover
    assert prover.invariance.max_length == 32 + 64
    runtime.engine_kind = "hf"
    assert type(runtime.prover()) is ReferenceProver
    runtime.engine_kind = "fast"
    assert runtime.prover() is prover


def test_row_invariance_is_cached_per_stack_and_shapes(tiny, tmp_path, monkeypatch) -> None:
    decoder = tiny.model.get_decoder()
    first = RowInvariance.cached(decoder, max_length=20, max_rows=64, step=16, root=tmp_path)
    files = list((tmp_path / "row-invariance").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    with monkeypatch.context() as patch:
        patch.setattr(RowInvariance, "measure", classmethod(fail))
        again = RowInvariance.cached(decoder, max_length=20, max_rows=64, step=16, root=tmp_path)
    assert np.array_equal(again.exact, first.exact) and again.max_length == 20
    other = RowInvariance.cached(decoder, max_length=24, max_rows=64, step=16, root=tmp_path)  # other shapes
    assert len(other.exact) == 65 and len(list((tmp_path / "row-invariance").iterdir())) == 2
    files[0].write_bytes(b"not an array")  # a corrupt entry is measured again and rewritten
    assert np.array_equal(RowInvariance.cached(decoder, 20, 64, 16, root=tmp_path).exact, first.exact)
    assert np.load(files[0]).dtype == np.bool_


def test_prefix_prover_workspace_budget_cuts_groups_and_keeps_the_bits(tiny, jobs, reference) -> None:
    """A budget of 40 completion rows and one logit row: groups are proved in several runs, bits unchanged."""
    from grail_pipeline.proving.prefix import completion_row_bytes, logit_row_bytes

    dtype_bytes = tiny.dtype.itemsize
    row, logit = completion_row_bytes(tiny.model.config, dtype_bytes), logit_row_bytes(tiny.model.config.vocab_size,
                                                                                          dtype_bytes)
    prover = PrefixProver(tiny, workspace_bytes=40 * row + logit)
    assert (prover.max_rows, prover.logit_chunk) == (40, 1)
    shared, _ = prover._plan(jobs)
    runs = [run for p in shared for run in p.runs if run.job == 0]
    assert len(runs) > 1 and all(sum(len(jobs[0].completions[i]) for i in run.members) <= 40 for run in runs)
    assert all(sum(run.rows for run in p.runs) <= 40 for p in shared)
    assert_same(prover.prove_many(jobs), reference, jobs)
    workspace = next(c for c in prover.memory() if c.name == "prover_workspace")
    assert workspace.bytes == 40 * row + logit <= prover.workspace_bytes


@pytest.mark.parametrize("settings", [
    dict(),  # every group in one pass: four prompts of 3, 11, 25 and 1 tokens in a [4, 64] prompt batch
    dict(max_rows=60),  # passes of one or two groups, groups cut into runs
    dict(inexact=(12, 28, 46, 256), max_rows=96),  # a lone-sequence length, run and prompt-batch counts padded
], ids=["one-pass", "runs", "inexact-counts"])
def test_groups_of_one_randomness_share_passes_and_keep_the_bits(tiny, jobs, settings) -> None:
    """Groups of one window are proved in passes of several groups (prompts batched, completions packed
    together): every sketch and index equals the reference prover's, group by group."""
    same = [ProofJob(job.prompt_ids, job.completions, jobs[0].randomness_hex) for job in jobs]
    settings = dict(settings)
    inexact = settings.pop("inexact", ())
    invariance = None
    if inexact:
        exact = np.ones(400, dtype=bool)
        exact[list(inexact)] = False
        invariance = RowInvariance(exact, max_length=100)
    prover = PrefixProver(tiny, invariance=invariance, **settings)
    passes, _ = prover._plan(same)
    assert any(len(p.jobs) > 1 for p in passes)
    for p in passes:
        assert prover.invariance.exact[p.rows] and prover.invariance.exact[p.prompt_rows]
        assert p.prompt_rows >= len(p.jobs) * p.prompt_width and sum(run.rows for run in p.runs) <= prover.max_rows
    assert_same(prover.prove_many(same), ReferenceProver(tiny).prove_many(same), same)
