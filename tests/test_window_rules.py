"""F's validator rules in `verify`: file order, gaps, swaps, deadline, checkpoint window, name, termination.

The window files are real: rollouts proved with the validator's forward on `dummy:tiny` (CPU), signed
with a real sr25519 key, written with write_window_file. Completions end with EOS, as the length
profile forces it on random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import pytest

from grail_pipeline.cli import main as cli
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import build_rollout_record, grpo_advantages, write_window_file
from grail_pipeline.protocol.sat import problem_for_index, score_completion
from grail_pipeline.protocol.sketches import commit_binding
from grail_pipeline.protocol.tokenizer import decode_completion, prompt_ids
from grail_pipeline.protocol.wallet import Signer, ephemeral_signer, rollout_challenge, sign_commit, sign_rollout
from grail_pipeline.proving.validator import distribution_problem, prove_unbatched, termination_problem
from grail_pipeline.tools.window_check import check_window_file, sample_groups, window_randomness

BLOCK_HASH = "0x496aca80e4d8f29fb8e8cd816c3afb48d3f103970b3a2ee1600c08ca67326dee"
RANDOMNESS = "67ddf5ce5b7cfd4c4081d2a6ce1c1235e4f240e4322c6b1e106a6cec47948f9c"
WINDOW = 60
COMPLETION = 18  # 17 sampled ids, then EOS

Records = list[dict[str, Any]]


def sign(record: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """(Re-)sign a record's commit and challenge, as the miner does."""
    commit = record["commit"]
    binding = commit_binding(commit["tokens"], commit["beacon"]["randomness"], commit["model"]["name"],
                             commit["model"]["layer_index"], commit["commitments"])
    commit["signature"] = sign_commit(signer, binding)
    record["challenge"] = rollout_challenge(record["block_hash"], record["nonce"])
    record["signature"] = sign_rollout(signer, record["challenge"])
    return record


def mine_group(loaded: LoadedModel, tok, signer: Signer, group: int, checkpoint_window: int = 0) -> Records:
    """Problem `group`'s 16 rollouts, proved and signed as the miner would (completions end with EOS)."""
    problem = problem_for_index(signer.ss58_address, BLOCK_HASH, group)
    prompt = prompt_ids(tok, problem)
    rng = random.Random(group)
    completions = [[rng.randrange(1000, 30000) for _ in range(COMPLETION - 1)] + [tok.eos_token_id]
                   for _ in range(PROFILE.rollouts_per_problem)]
    rewards = [score_completion(problem, decode_completion(tok, c)).reward for c in completions]
    records = []
    for index, (completion, reward, advantage) in enumerate(zip(completions, rewards, grpo_advantages(rewards))):
        tokens = prompt + completion
        commitments, logprobs = prove_unbatched(loaded.model, tokens, len(prompt), RANDOMNESS)
        record = build_rollout_record(
            window_start=WINDOW, block=WINDOW + 1, block_hash=BLOCK_HASH, randomness=RANDOMNESS, use_drand=False,
            checkpoint_window=checkpoint_window, rollout_group=group, rollout_index=index,
            total_in_group=PROFILE.rollouts_per_problem, nonce=PROFILE.nonce(group, index), tokens=tokens,
            prompt_length=len(prompt), commitments=commitments, token_logprobs=logprobs, model_name=loaded.name,
            commit_signature="", total_reward=reward, advantage=advantage, success=False, assignment=[],
            hotkey=signer.ss58_address, challenge="", signature="")
        records.append(sign(record, signer))
    return records


@pytest.fixture(scope="module")
def signer() -> Signer:
    return ephemeral_signer()


@pytest.fixture(scope="module")
def groups(tiny: LoadedModel, tok, signer: Signer) -> dict[int, Records]:
    return {g: mine_group(tiny, tok, signer, g) for g in range(4)}


def write(tmp_path: Path, signer: Signer, records: Records, name: str | None = None, **meta: object) -> Path:
    path = tmp_path / (name or PROFILE.window_file_name(signer.ss58_address, WINDOW))
    write_window_file(path, records, {"wallet": signer.ss58_address, "window_start": WINDOW,
                                      "window_length": PROFILE.window_length_blocks, **meta})
    return path


def failing(report, verdict: str) -> set[str]:
    return set(report.verdicts[verdict].failed)


def test_an_honest_file_passes_both_verdicts_apart_from_random_weights(groups, tiny, tok, signer, tmp_path) -> None:
    records = groups[0] + groups[1] + groups[2]
    path = write(tmp_path, signer, records, deadline=time.time() + 600)
    report = check_window_file(path, tok, tiny)
    assert report.passed, {k: v.failed for k, v in report.verdicts.items()}
    # F's sample: 48 rollouts > 20, so max(1, int(0.1 * 3)) = 1 whole group, drawn deterministically
    assert len(report.sample["groups"]) == 1 and report.sample["rollouts"] == 16
    assert report.sample["window_randomness"] == window_randomness(BLOCK_HASH)
    assert report.verdicts["validator"].rollouts_checked == 16 and report.verdicts["strict"].rollouts_checked == 48
    assert report.check("proofs").validator.checked == 16 and report.check("proofs").checked == 48
    assert report.check("groups").checked == 3  # one item per group, no extra rows
    assert report.check("order").passed == report.check("order").checked == 3
    assert report.check("deadline").passed == 1 and report.check("checkpoint").passed == 48
    # the forced EOS: termination and distribution run, fail on every rollout, and are counted apart
    assert report.random_weights
    for name in ("termination", "distribution"):
        check = report.check(name)
        assert check.by_design and check.checked == 48 and check.passed == 0
        assert name in report.verdicts["validator"].by_design and name in report.verdicts["strict"].by_design
    assert "EOS probability" in report.check("termination").problems[0]
    assert "insufficient: 18 completion steps" in report.check("distribution").problems[0]
    # the strict verdict says what it proved: every rollout here, a sample with --proof-sample, none without a model
    assert report.verdicts["strict"].rules == "every rollout, position and logprob, and our own rules"
    sampled = check_window_file(path, tok, tiny, proof_sample=4)
    proved = sampled.check("proofs").checked
    assert 16 <= proved < 48 and sampled.verdicts["strict"].rules.startswith(
        f"every position and logprob of a sample of {proved} of 48 rollouts")
    assert "no rollout proved" in check_window_file(path, tok, None).verdicts["strict"].rules


def test_forced_eos_fails_the_verdict_when_the_weights_are_not_random(groups, tiny, tok, signer, tmp_path) -> None:
    """The same rollouts judged on a model that is not a dummy preset: termination is a hard failure."""
    path = write(tmp_path, signer, groups[0])
    plain = dataclasses.replace(tiny, source=str(tmp_path))  # a directory without a dummy preset's metadata
    report = check_window_file(path, tok, plain)
    assert not report.random_weights and not report.passed
    # 16 rollouts <= 20: F checks them all; 16 soft fails reach the gate of ceil(0.51 * 16) = 9
    assert failing(report, "validator") == failing(report, "strict") == {"termination", "distribution"}
    assert report.verdicts["validator"].rollouts_checked == 16
    why = report.verdicts["validator"].failed["termination"]
    assert "\n" not in why and "EOS probability" in why and "under 0.02" in why
    assert report.verdicts["validator"].failed["distribution"].startswith("16 soft fails of 16, the gate is 9")


def test_a_gap_is_rejected(groups, tiny, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, groups[0] + groups[1] + groups[3])
    report = check_window_file(path, tok, tiny)
    assert failing(report, "strict") == {"order", "prompt", "reward"} or failing(report, "strict") == {"order", "prompt"}
    order = report.verdicts["strict"].failed["order"]
    assert "\n" not in order and "file position 2 holds group 3: group 2 missing (a gap" in order
    assert "group 3 rollout 0 (file position 2): prompt is not problem 2's" in report.check("prompt").problems[0]
    assert report.check("prompt").passed == 32  # groups 0 and 1 are where F expects them
    # F's verdict depends on its draw: it fails exactly when the group after the gap is the one drawn
    assert ("prompt" in failing(report, "validator")) == (3 in report.sample["groups"])
    assert not report.passed


def test_a_swapped_pair_is_rejected(groups, tiny, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, groups[1] + groups[0])
    report = check_window_file(path, tok, tiny, proof_sample=1)
    assert "prompt" in failing(report, "validator") and "order" in failing(report, "strict")
    assert report.check("prompt").passed == 0  # every group is seeded from the other's index
    assert report.check("order").problems[0] == ("file position 0 holds group 1 (out of order; F seeds each group "
                                                 "from its file position)")


def test_a_late_file_is_rejected(groups, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, groups[0], deadline=time.time() - 100)
    report = check_window_file(path, tok, None)
    assert failing(report, "validator") == failing(report, "strict") == {"deadline"}
    why = report.verdicts["validator"].failed["deadline"]
    assert "\n" not in why and "s after the deadline" in why and "deadline metadata" in why


def test_no_deadline_is_not_run_rather_than_passed(groups, tok, signer, tmp_path) -> None:
    report = check_window_file(write(tmp_path, signer, groups[0]), tok, None)
    assert report.check("deadline").skipped and report.check("deadline").checked == 0
    assert "deadline" in report.verdicts["validator"].not_run


def test_a_wrong_checkpoint_window_is_rejected(tiny, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, mine_group(tiny, tok, signer, 0, checkpoint_window=7))
    report = check_window_file(path, tok, tiny)  # the dummy checkpoint states window 0
    assert failing(report, "validator") == {"checkpoint"}
    assert report.check("checkpoint").problems[0].endswith("checkpoint_window 7, the checkpoint's is 0")
    assert check_window_file(path, tok, None, expected_checkpoint_window=7).check("checkpoint").ok


def test_a_wrong_name_is_rejected(groups, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, groups[0], name=f"{signer.ss58_address}-window-{WINDOW}-worker-0.parquet")
    report = check_window_file(path, tok, None)
    assert failing(report, "validator") == {"file"}
    assert f"not {signer.ss58_address}-window-{WINDOW}.parquet" in report.verdicts["validator"].failed["file"]


def test_a_file_under_the_minimum_size_is_rejected(groups, tok, signer, tmp_path) -> None:
    path = write(tmp_path, signer, groups[0])
    report = check_window_file(path, tok, None, profile=dataclasses.replace(PROFILE, min_file_bytes=10**9))
    assert "file" in failing(report, "validator") and "under the validator's minimum" in report.check("file").problems[0]


def test_a_token_outside_the_vocabulary_is_a_failed_tokens_check(groups, tiny, tok, signer, tmp_path) -> None:
    records = copy.deepcopy(groups[0])
    records[4]["commit"]["tokens"][-3] = tiny.vocab_size + 5
    sign(records[4], signer)
    report = check_window_file(write(tmp_path, signer, records), tok, tiny)
    assert failing(report, "validator") == {"tokens"}
    assert report.check("tokens").problems == [f"group 0 rollout 4 (file position 0): 1 ids outside "
                                               f"[0, {tiny.vocab_size}) (first {tiny.vocab_size + 5})"]
    assert report.check("proofs").checked == 15  # the model never saw the bad rollout


def test_sampling_is_deterministic_and_bounded(groups, signer) -> None:
    records = [r for g in range(4) for r in groups[g]]
    rows: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        rows.setdefault(r["rollout_group"], []).append(i)
    rand = window_randomness(BLOCK_HASH)
    drawn = sample_groups(records, rows, signer.ss58_address, rand)
    assert len(drawn) == 1 and drawn == sample_groups(records, rows, signer.ss58_address, rand)
    many = {g: rows[g % 4] for g in range(40)}  # 40 groups: int(0.1 * 40) = 4, capped at 32 // 16 = 2
    assert len(sample_groups(records, many, signer.ss58_address, rand)) == 2
    small = {0: list(range(16))}
    assert sample_groups(records[:16], small, signer.ss58_address, rand) == [0]  # <= 20 rollouts: all


def test_termination_rule() -> None:
    eos = 7
    record = {"commit": {"tokens": [1, 2, eos], "rollout": {"completion_length": 2}}}
    assert termination_problem(record, eos, 0.02) is None
    assert "under 0.02" in termination_problem(record, eos, 0.0199)
    record["commit"]["tokens"][-1] = 8
    assert "not EOS" in termination_problem(record, eos, 0.9)
    record["commit"]["rollout"]["completion_length"] = PROFILE.max_completion_tokens
    assert termination_problem(record, eos, None) is None  # exactly the maximum length: no EOS needed
    record["commit"]["rollout"]["completion_length"] += 1
    assert "longer than the maximum" in termination_problem(record, eos, 1.0)


def test_distribution_rule() -> None:
    assert distribution_problem([0.9] * 30) is None
    assert distribution_problem([0.9] * 29).startswith("insufficient")
    assert "median" in distribution_problem([0.3] * 40)
    assert "min" in distribution_problem([0.9] * 39 + [1e-5])
    early_low = [0.01] * 6 + [0.9] * 44 + [0.9] * 100  # q10 of the first 50 is low, q10 overall is not
    problem = distribution_problem(early_low)
    assert "first 50 steps" in problem and "q10 0" not in problem


def test_status_deadline_on_the_command_line(groups, signer, tmp_path, capsys) -> None:
    import json

    path = write(tmp_path, signer, groups[0])
    status = tmp_path / "status-worker-0.json"
    status.write_text(json.dumps({"state": "mining", "windows": {str(WINDOW): {"file": str(path),
                                                                                "deadline": time.time() - 50}}}))
    assert cli.main(["verify", str(path), "--skip-proofs", "--status", str(status), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["verdicts"]["validator"]["failed"]) == {"deadline"}
    assert f"status file {status}" in report["verdicts"]["validator"]["failed"]["deadline"]
    status.write_text(json.dumps({"state": "mining", "windows": {}}))
    assert cli.main(["verify", str(path), "--skip-proofs", "--status", str(status)]) == 2
    assert f"records no deadline for window {WINDOW}" in capsys.readouterr().err
