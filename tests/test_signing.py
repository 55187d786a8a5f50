"""Signing in worker processes (SigningPool) gives what signing in the pipeline's own threads gives.

Real tokenizer, real sr25519 keys, proofs as views into one big tensor as the prover returns them. One
pool of 2 spawned workers serves the module (a worker takes seconds to start).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from grail_pipeline.mining import runtime as runtime_module
from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.lengths import parse_length_profile
from grail_pipeline.mining.messages import ProvedGroup, make_task
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.signing import GroupSigner, SigningPool
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sketches import commit_binding
from grail_pipeline.protocol.wallet import ephemeral_signer, verify_commit, verify_rollout_signature
from grail_pipeline.proving.proofs import RolloutProof

MODEL = "dummy:tiny"
WINDOW = WindowContext(window_start=4350, block_hash="0x496aca80e4d8f29fb8e8cd816c3afb48d3f103970b3a2ee1600c08ca67326dee",
                       randomness="67ddf5ce5b7cfd4c4081d2a6ce1c1235e4f240e4322c6b1e106a6cec47948f9c",
                       checkpoint_window=4320)
RANDOMISED = ("signature", "timestamp")  # sr25519 signatures are randomised: verified instead of compared


@pytest.fixture(scope="module")
def sign(tok) -> GroupSigner:
    return GroupSigner(tok, ephemeral_signer(), MODEL)


@pytest.fixture(scope="module")
def pool(sign) -> SigningPool:
    with SigningPool(sign, workers=2) as pool:
        yield pool


def proved_group(tok, index: int, rollouts: int = PROFILE.rollouts_per_problem) -> ProvedGroup:
    """A group as the prover hands it over: each proof's tensors are views into one tensor per group."""
    task = make_task(WINDOW, index, "5F-test-hotkey", tok, parse_length_profile("fixed:24"), block=4361)
    rng = random.Random(index)
    completions = [[rng.randrange(1000, 30000) for _ in range(PROFILE.min_completion_tokens + i)] + [tok.eos_token_id]
                   for i in range(rollouts)]
    lengths = [len(task.prompt_ids) + len(c) for c in completions]
    gen = torch.Generator().manual_seed(index)
    sketches = torch.randint(0, PROFILE.prime_q, (rollouts, max(lengths)), generator=gen)
    indices = torch.randint(0, 2048, (rollouts, max(lengths), PROFILE.proof_topk), generator=gen)
    proofs = [RolloutProof(sketches[i, :n], indices[i, :n], [0.0] * len(task.prompt_ids) + [-0.25] * len(c))
              for i, (n, c) in enumerate(zip(lengths, completions))]
    return ProvedGroup(task, completions, proofs, generate_seconds=1.5, proof_seconds=0.5)


def without_randomised(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k not in RANDOMISED}
    record["commit"] = {k: v for k, v in record["commit"].items() if k != "signature"}
    return record


def assert_signatures_verify(record: dict) -> None:
    commit = record["commit"]
    binding = commit_binding(commit["tokens"], commit["beacon"]["randomness"], commit["model"]["name"],
                             commit["model"]["layer_index"], commit["commitments"])
    assert verify_commit(record["hotkey"], binding, commit["signature"])
    assert verify_rollout_signature(record["hotkey"], record["challenge"], record["signature"])


def test_pool_signs_what_the_in_thread_signer_signs(pool, sign, tok) -> None:
    group = proved_group(tok, 3)
    expected = sign(group)
    got = pool(group)
    assert got.task is group.task  # the caller's own task comes back, not the worker's copy
    assert len(got.records) == len(expected.records) == PROFILE.rollouts_per_problem and got.dropped is None
    assert [without_randomised(r) for r in got.records] == [without_randomised(r) for r in expected.records]
    for record in got.records:
        assert record["hotkey"] == sign.signer.ss58_address
        assert_signatures_verify(record)
    for name in ("rewards", "successes", "solved", "completion_tokens", "generate_seconds", "proof_seconds"):
        assert getattr(got, name) == getattr(expected, name)
    assert got.sign_seconds > 0
    assert all(isinstance(p.sketches, torch.Tensor) for p in group.proofs)  # the caller's group is left alone


def test_pool_drops_a_group_as_the_in_thread_signer_does(pool, sign, tok) -> None:
    group = proved_group(tok, 4)
    group.completions[5] = group.completions[5][:PROFILE.min_completion_tokens - 1]
    got, expected = pool(group), sign(group)
    assert got.records == [] and got.dropped == expected.dropped is not None
    assert got.rewards == expected.rewards


def _ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals (bit n-1 is signal n)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for {pid}")


def started_workers(pool: SigningPool) -> list[int]:
    """The pool's worker pids, once every one of them has run its initializer (and ignores the stop signals)."""
    pids = sorted(pool._executor._processes)
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    deadline = time.monotonic() + 120
    while not all(_ignored_signals(pid) & wanted == wanted for pid in pids):
        assert time.monotonic() < deadline, "signing workers did not start"
        time.sleep(0.05)
    return pids


def test_workers_ignore_the_stop_signals_the_process_group_gets(pool, tok) -> None:
    pids = started_workers(pool)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    with ThreadPoolExecutor(4) as threads:
        signed = list(threads.map(pool, [proved_group(tok, i) for i in range(10, 14)]))
    assert [len(s.records) for s in signed] == [PROFILE.rollouts_per_problem] * 4
    assert sorted(pool._executor._processes) == pids
    for pid in pids:
        os.kill(pid, 0)  # still there


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_idle(pids: list[int]) -> None:
    """Until the processes use no CPU for a while (a worker waiting for work, its imports done)."""
    deadline = time.monotonic() + 120
    before = [_cpu_ticks(pid) for pid in pids]
    while True:
        time.sleep(0.5)
        now = [_cpu_ticks(pid) for pid in pids]
        if now == before:
            return
        assert time.monotonic() < deadline, "signing workers never went idle"
        before = now


def within(seconds: float, fn, *args):
    """fn(*args) in a daemon thread: its result, its exception, or a failure if it takes longer (a hang)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def test_a_dead_worker_is_an_error_not_a_hang(sign, tok) -> None:
    broken = SigningPool(sign, workers=2)
    broken.exit_grace_s = 1.0
    try:
        pids = started_workers(broken)
        wait_idle(pids)  # the survivor must be past its start-up: a starting worker can die of SIGTERM
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            within(60, broken, proved_group(tok, 5))
    finally:
        # the survivor ignores the SIGTERM the executor's own clean-up sends: close() must still return
        within(60, broken.close)


class FakePool:
    """Stands in for SigningPool: records what the runtime asked for, starts nothing."""

    made: list[FakePool] = []

    def __init__(self, sign: GroupSigner, workers: int) -> None:
        self.sign, self.workers, self.closed = sign, workers, False
        FakePool.made.append(self)

    def close(self) -> None:
        self.closed = True


def test_runtime_signs_in_processes_only_for_the_fast_engine_on_a_gpu(monkeypatch, tiny, tok) -> None:
    monkeypatch.setattr(runtime_module, "SigningPool", FakePool)
    FakePool.made.clear()
    signer, other = ephemeral_signer(), ephemeral_signer()
    on_gpu = dataclasses.replace(tiny, device=torch.device("cuda", 0))  # a label only: nothing runs on it
    for loaded, kind in ((tiny, "hf"), (tiny, "fast"), (on_gpu, "hf")):
        sign = Runtime(loaded, tok, kind, None, None, 0).group_signer(signer)
        assert type(sign) is GroupSigner and sign.signer is signer and sign.model_name == tiny.name
    runtime = Runtime(on_gpu, tok, "fast", None, None, 0)
    pool = runtime.group_signer(signer)
    assert type(pool) is FakePool and pool.sign.signer is signer
    assert pool.workers == min(4, os.cpu_count() or 1)
    assert runtime.group_signer(signer) is pool  # several pipelines share one pool per hotkey
    assert runtime.group_signer(other) is not pool
    runtime.close()
    assert len(FakePool.made) == 2 and all(p.closed for p in FakePool.made)
    assert runtime.group_signer(signer) is not pool  # a closed pool is not handed out again
