"""The validator's method on a tiny random-initialised Qwen2: honest rollouts pass, any tampering fails."""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import pytest
import torch

from grail_pipeline.inference.loading import load_model
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import build_rollout_record
from grail_pipeline.protocol.sketches import commit_binding, r_vec, sketch_hidden
from grail_pipeline.protocol.wallet import Signer, ephemeral_signer, rollout_challenge, sign_commit, sign_rollout
from grail_pipeline.proving.validator import VerifyResult, prove_unbatched, validator_forward, verify_rollout

BLOCK_HASH = "0x496aca80e4d8f29fb8e8cd816c3afb48d3f103970b3a2ee1600c08ca67326dee"
RANDOMNESS = "67ddf5ce5b7cfd4c4081d2a6ce1c1235e4f240e4322c6b1e106a6cec47948f9c"
PROMPT_LEN, COMPLETION_LEN = 24, 40


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Qwen2 architecture, hidden 64, 2 layers, real vocabulary, float32 on the CPU, fixed seed."""
    loaded = load_model("dummy:tiny", device="cpu")
    assert loaded.model.config.tie_word_embeddings and loaded.dtype == torch.float32
    return loaded.model


@pytest.fixture(scope="module")
def signer() -> Signer:
    return ephemeral_signer()


def tokens_for(seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(PROMPT_LEN + COMPLETION_LEN)]


def signed_record(signer: Signer, tokens: list[int], commitments: list[dict], logprobs: list[float],
                  model_name: str = "dummy:tiny") -> dict[str, Any]:
    """A record signed as the miner signs it: commit binding and challenge."""
    nonce = PROFILE.nonce(2, 5)
    challenge = rollout_challenge(BLOCK_HASH, nonce)
    binding = commit_binding(tokens, RANDOMNESS, model_name, PROFILE.layer_index, commitments)
    return build_rollout_record(
        window_start=4350, block=4361, block_hash=BLOCK_HASH, randomness=RANDOMNESS, use_drand=True,
        checkpoint_window=4320, rollout_group=2, rollout_index=5, total_in_group=16, nonce=nonce,
        tokens=tokens, prompt_length=PROMPT_LEN, commitments=commitments, token_logprobs=logprobs,
        model_name=model_name, commit_signature=sign_commit(signer, binding), total_reward=0.135, advantage=0.2,
        success=False, assignment=[True, False], hotkey=signer.ss58_address, challenge=challenge,
        signature=sign_rollout(signer, challenge),
    )


def resign(record: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """Re-sign the commit after tampering, so that only the model checks can catch it."""
    commit = record["commit"]
    binding = commit_binding(commit["tokens"], commit["beacon"]["randomness"], commit["model"]["name"],
                             commit["model"]["layer_index"], commit["commitments"])
    commit["signature"] = sign_commit(signer, binding)
    return record


@pytest.fixture(scope="module")
def honest(model, signer) -> dict[str, Any]:
    tokens = tokens_for(0, model.config.vocab_size)
    commitments, logprobs = prove_unbatched(model, tokens, PROMPT_LEN, RANDOMNESS)
    return signed_record(signer, tokens, commitments, logprobs)


def test_validator_forward_is_the_final_normed_hidden_state(model) -> None:
    tokens = tokens_for(1, model.config.vocab_size)
    hidden, logits = validator_forward(model, tokens)
    assert hidden.shape == (len(tokens), model.config.hidden_size)
    assert logits.shape == (len(tokens), model.config.vocab_size)
    assert hidden.device == logits.device == model.device
    with torch.inference_mode():
        ids = torch.tensor([tokens])
        final = model.model(ids).last_hidden_state[0]
        states = model.model(ids, output_hidden_states=True).hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    assert torch.equal(hidden, final)  # the output after the final RMSNorm ...
    assert not torch.allclose(hidden, states[-2][0])  # ... not a decoder layer's raw output
    assert torch.allclose(model.lm_head(final), logits)


def test_prove_unbatched_format(model, honest) -> None:
    commit = honest["commit"]
    commitments, logprobs = commit["commitments"], commit["rollout"]["token_logprobs"]
    assert len(commitments) == len(logprobs) == PROMPT_LEN + COMPLETION_LEN
    assert [c["position"] for c in commitments] == list(range(len(commitments)))
    assert all(len(c["indices"]) == PROFILE.proof_topk and 0 <= c["sketch"] < PROFILE.prime_q for c in commitments)
    assert logprobs[:PROMPT_LEN] == [0.0] * PROMPT_LEN
    assert all(lp < 0 for lp in logprobs[PROMPT_LEN:])
    hidden, _ = validator_forward(model, commit["tokens"])
    sketches, indices = sketch_hidden(hidden, r_vec(RANDOMNESS))
    assert [c["sketch"] for c in commitments] == sketches.tolist()
    assert [c["indices"] for c in commitments] == indices.tolist()


def test_honest_rollout_passes_everywhere(model, honest) -> None:
    result = verify_rollout(model, honest, eos_id=honest["commit"]["tokens"][-1])
    counts = VerifyResult(positions_checked=64, positions_passed=64, logprobs_checked=40, logprobs_passed=40,
                          signature_ok=True, problems=[])
    assert (result.positions_checked, result.positions_passed, result.logprobs_checked, result.logprobs_passed,
            result.signature_ok, result.problems) == (counts.positions_checked, counts.positions_passed,
                                                      counts.logprobs_checked, counts.logprobs_passed,
                                                      counts.signature_ok, counts.problems)
    assert result.passed and result.pass_rate == 1.0
    assert result.sketch_ok == [True] * 64 and result.logprob_ok == [True] * 40
    # what F's termination and distribution checks read: probabilities from the same forward
    lps = honest["commit"]["rollout"]["token_logprobs"][PROMPT_LEN:]
    assert result.chosen_probs == pytest.approx([math.exp(lp) for lp in lps], rel=1e-4)
    assert result.eos_probability == pytest.approx(math.exp(lps[-1]), rel=1e-4)  # softmax(logits[-2])[last]


def test_changed_token_fails(model, honest, signer) -> None:
    record = copy.deepcopy(honest)
    position = PROMPT_LEN + 10
    record["commit"]["tokens"][position] = (record["commit"]["tokens"][position] + 1) % model.config.vocab_size
    unsigned = verify_rollout(model, record)
    assert not unsigned.passed and not unsigned.signature_ok

    result = verify_rollout(model, resign(record, signer))
    assert result.signature_ok and not result.passed
    # Causal attention: positions before the change are untouched, the changed one fails first.
    assert result.positions_passed < result.positions_checked
    assert any(f"first at position {position})" in p for p in result.problems)
    assert result.pass_rate < 1.0
    # (Its logprob need not fail here: a random-initialised model is nearly uniform over the vocabulary.)


@pytest.mark.parametrize("resigned", [False, True])
def test_changed_sketch_fails_at_that_position(model, honest, signer, resigned) -> None:
    record = copy.deepcopy(honest)
    position = 30
    commitment = record["commit"]["commitments"][position]
    commitment["sketch"] = (commitment["sketch"] + PROFILE.sketch_tolerance_at(position) + 1) % PROFILE.prime_q
    if resigned:
        resign(record, signer)
    result = verify_rollout(model, record)
    assert not result.passed and result.signature_ok == resigned
    assert (result.positions_checked, result.positions_passed) == (64, 63)
    assert result.logprobs_passed == 40
    assert any("first at position 30" in p for p in result.problems)
    assert result.pass_rate == pytest.approx(103 / 104)


def test_sketch_within_tolerance_still_passes(model, honest, signer) -> None:
    record = copy.deepcopy(honest)
    commitment = record["commit"]["commitments"][0]
    commitment["sketch"] = (commitment["sketch"] - PROFILE.sketch_tolerance_at(0)) % PROFILE.prime_q  # wraps mod Q
    assert verify_rollout(model, resign(record, signer)).passed


def test_changed_logprob_fails(model, honest) -> None:
    record = copy.deepcopy(honest)  # logprobs are not in the commit binding: the signature still verifies
    logprobs = record["commit"]["rollout"]["token_logprobs"]
    logprobs[PROMPT_LEN + 3] *= 1.05  # beyond 2 % relative and 1e-3 absolute
    logprobs[PROMPT_LEN + 4] += 5e-4  # within the absolute tolerance
    result = verify_rollout(model, record)
    assert result.signature_ok and not result.passed
    assert (result.logprobs_checked, result.logprobs_passed) == (40, 39)
    assert result.positions_passed == result.positions_checked == 64


def test_foreign_signature_fails(model, honest) -> None:
    record = copy.deepcopy(honest)
    impostor = ephemeral_signer()
    commit = record["commit"]
    binding = commit_binding(commit["tokens"], RANDOMNESS, commit["model"]["name"], -1, commit["commitments"])
    commit["signature"] = sign_commit(impostor, binding)
    result = verify_rollout(model, record)
    assert not result.signature_ok and not result.passed
    assert result.pass_rate == 1.0  # the model checks pass: only the signature is wrong

    record = copy.deepcopy(honest)
    record["signature"] = sign_rollout(impostor, record["challenge"])
    assert not verify_rollout(model, record).signature_ok


def test_model_name_is_bound_by_the_signature(model, honest) -> None:
    record = copy.deepcopy(honest)
    record["commit"]["model"]["name"] = "Qwen/Qwen3-4B-Instruct-2507"
    assert not verify_rollout(model, record).signature_ok


@pytest.mark.parametrize("change", ["proof_version", "layer_index", "short completion", "missing commitment",
                                    "0x beacon"])
def test_structural_problems_fail_without_a_forward(model, honest, signer, change) -> None:
    record = copy.deepcopy(honest)
    commit = record["commit"]
    if change == "proof_version":
        commit["proof_version"] = "v5"
    elif change == "layer_index":
        commit["model"]["layer_index"] = 0
    elif change == "short completion":
        keep = PROMPT_LEN + PROFILE.min_completion_tokens - 1
        commit["tokens"] = commit["tokens"][:keep]
        commit["commitments"] = commit["commitments"][:keep]
        commit["rollout"]["token_logprobs"] = commit["rollout"]["token_logprobs"][:keep]
        commit["rollout"]["completion_length"] = keep - PROMPT_LEN
    elif change == "0x beacon":
        commit["beacon"]["randomness"] = "0x" + RANDOMNESS  # what --no-drand sends; the schema refuses it
    else:
        commit["commitments"].pop()
    result = verify_rollout(model, resign(record, signer))
    assert not result.passed and result.positions_checked == 0 and result.problems
