"""The validator's method, run by us: recompute a rollout's proof and check it at every position.

The validator (F `validators/proof.py`, `logprobs_valid`) runs one unbatched, unpadded forward pass
per rollout and compares its own last hidden layer, at the miner's top-k indices, with the miner's
sketches at 16 random completion positions. We check every position and every completion logprob,
so a fast prover's output can be measured against exactly this method before a validator sees it.
The same forward also gives what F's other model checks read (`validators/termination.py`,
`distribution.py`): the EOS probability at the step before the last token and the chosen-token
probabilities; `termination_problem`, `distribution_problem` and `challenged_problem` apply F's rules
to them, so `verify` can judge a rollout both as F does (16 challenged positions) and at every position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile
from grail_pipeline.protocol.sketches import (
    commit_binding,
    commitments_to_dicts,
    indices_from_root,
    r_vec,
    sketch_at_indices,
    sketch_distance,
    sketch_hidden,
)
from grail_pipeline.protocol.wallet import verify_commit, verify_rollout_signature

_HEX = re.compile(r"[0-9a-fA-F]+")  # the validator's schema regex for beacon.randomness


@torch.inference_mode()
def validator_forward(model: PreTrainedModel, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [L, H], logits [L, V]) from the validator's forward: batch of one, no mask, no position ids.

    h is `hidden_states[-1][0]`, which transformers 5.x ties to `last_hidden_state`, i.e. the output
    after the final norm (the reference's meaning on 4.57 too); tests/test_verifier.py checks it.
    Both stay on the model's device.
    """
    input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=model.device)
    out = model(input_ids, output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def completion_logprobs(logits: torch.Tensor, tokens: Sequence[int], prompt_length: int) -> torch.Tensor:
    """log_softmax(logits[p−1])[tokens[p]] for every completion position p (float32, on the logits' device).

    Only the completion rows are upcast; the full logits never leave the device.
    """
    rows = logits[prompt_length - 1 : len(tokens) - 1].float()
    targets = torch.tensor(list(tokens[prompt_length:]), dtype=torch.long, device=logits.device)
    return rows.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)


def prove_unbatched(model: PreTrainedModel, tokens: Sequence[int], prompt_length: int,
                    randomness_hex: str) -> tuple[list[dict[str, Any]], list[float]]:
    """Commitments and token logprobs made with the validator's own forward (the slow, exact method).

    token_logprobs = [0.0] * prompt_length + completion logprobs, one entry per token.
    """
    hidden, logits = validator_forward(model, tokens)
    sketches, indices = sketch_hidden(hidden, r_vec(randomness_hex))
    logprobs = completion_logprobs(logits, tokens, prompt_length)
    return commitments_to_dicts(sketches, indices), [0.0] * prompt_length + logprobs.tolist()


@dataclass
class VerifyResult:
    """Outcome of verify_rollout; `problems` says in words what failed."""

    positions_checked: int = 0
    positions_passed: int = 0
    logprobs_checked: int = 0
    logprobs_passed: int = 0
    signature_ok: bool = False
    problems: list[str] = field(default_factory=list)
    sketch_ok: list[bool] = field(default_factory=list)  # per position, prompt included
    logprob_ok: list[bool] = field(default_factory=list)  # per completion position (index 0 = prompt_length)
    eos_probability: float | None = None  # softmax(logits[-2])[eos] at T = 1, when an EOS id was given
    chosen_probs: list[float] = field(default_factory=list)  # softmax(logits[t-1])[tokens[t]] over the completion

    @property
    def passed(self) -> bool:
        return not self.problems and self.positions_checked > 0

    @property
    def pass_rate(self) -> float:
        """Fraction of the per-position checks (sketches and logprobs) that passed."""
        checked = self.positions_checked + self.logprobs_checked
        return (self.positions_passed + self.logprobs_passed) / checked if checked else 0.0


def structure_problems(record: dict[str, Any], profile: ProtocolProfile) -> list[str]:
    """The schema-level conditions the proof check relies on."""
    commit = record["commit"]
    rollout = commit["rollout"]
    n = len(commit["tokens"])
    problems = []
    if commit["proof_version"] != profile.proof_version:
        problems.append(f"proof_version {commit['proof_version']!r} is not {profile.proof_version!r}")
    if commit["model"]["layer_index"] != profile.layer_index:
        problems.append(f"layer_index {commit['model']['layer_index']} is not {profile.layer_index}")
    if len(commit["commitments"]) != n or len(rollout["token_logprobs"]) != n:
        problems.append(f"{len(commit['commitments'])} commitments and {len(rollout['token_logprobs'])} "
                        f"logprobs for {n} tokens")
    if rollout["prompt_length"] + rollout["completion_length"] != n or rollout["prompt_length"] < 1:
        problems.append(f"prompt {rollout['prompt_length']} + completion {rollout['completion_length']} != {n} tokens")
    if rollout["completion_length"] < profile.min_completion_tokens:
        problems.append(f"completion of {rollout['completion_length']} tokens is shorter than "
                        f"{profile.min_completion_tokens}")
    if rollout["completion_length"] > profile.max_completion_tokens:
        problems.append(f"completion of {rollout['completion_length']} tokens is longer than the maximum "
                        f"{profile.max_completion_tokens}")
    if n < profile.validator.min_sequence_tokens:
        problems.append(f"{n} tokens, fewer than the schema's {profile.validator.min_sequence_tokens}")
    if any(len(c["indices"]) != profile.proof_topk for c in commit["commitments"]):
        problems.append(f"commitments without {profile.proof_topk} indices")
    if not _HEX.fullmatch(commit["beacon"]["randomness"]):
        problems.append("beacon randomness is not plain hex")
    return problems


def signature_problems(record: dict[str, Any]) -> list[str]:
    commit = record["commit"]
    binding = commit_binding(commit["tokens"], commit["beacon"]["randomness"], commit["model"]["name"],
                             commit["model"]["layer_index"], commit["commitments"])
    problems = []
    if not verify_commit(record["hotkey"], binding, commit["signature"]):
        problems.append("commit signature does not verify over the commit binding")
    if not verify_rollout_signature(record["hotkey"], record["challenge"], record["signature"]):
        problems.append("rollout signature does not verify over the challenge")
    return problems


def verify_rollout(model: PreTrainedModel, record: dict[str, Any], profile: ProtocolProfile = PROFILE,
                   eos_id: int | None = None) -> VerifyResult:
    """Check a rollout record as the validator's proof and logprob checks do, at every position.

    The token ids must lie in [0, vocab size) (F's tokens_valid, which runs first): the forward
    cannot embed others. With `eos_id`, the EOS probability for the termination check is kept too.
    """
    structure = structure_problems(record, profile)
    if structure:
        return VerifyResult(problems=structure)  # malformed: nothing sensible to recompute or verify
    signatures = signature_problems(record)
    result = VerifyResult(signature_ok=not signatures, problems=signatures)

    commit = record["commit"]
    tokens, commitments = commit["tokens"], commit["commitments"]
    prompt_length = commit["rollout"]["prompt_length"]
    hidden, logits = validator_forward(model, tokens)
    device = hidden.device

    miner_sketches = torch.tensor([c["sketch"] for c in commitments], dtype=torch.int64, device=device)
    miner_indices = torch.tensor([c["indices"] for c in commitments], dtype=torch.int64, device=device)
    if miner_indices.min() < 0 or miner_indices.max() >= hidden.shape[-1]:
        result.problems.append(f"commitment indices outside the hidden size {hidden.shape[-1]}")
        return result
    ours = sketch_at_indices(hidden, miner_indices, r_vec(commit["beacon"]["randomness"]))
    tolerance = torch.tensor([profile.sketch_tolerance_at(c["position"]) for c in commitments], device=device)
    sketch_ok = sketch_distance(ours, miner_sketches) <= tolerance
    result.positions_checked = len(tokens)
    result.positions_passed = int(sketch_ok.sum())

    expected = completion_logprobs(logits, tokens, prompt_length).double()
    claimed = torch.tensor(commit["rollout"]["token_logprobs"][prompt_length:], dtype=torch.float64, device=device)
    delta = (claimed - expected).abs()
    logprob_ok = (delta <= profile.logprob_abs_tol) | (delta <= profile.logprob_rel_tol * expected.abs())
    result.logprobs_checked = len(expected)
    result.logprobs_passed = int(logprob_ok.sum())
    result.sketch_ok = sketch_ok.tolist()
    result.logprob_ok = logprob_ok.tolist()
    result.chosen_probs = expected.exp().tolist()
    if eos_id is not None and len(tokens) >= 2:
        result.eos_probability = float(torch.softmax(logits[-2].float(), dim=-1)[eos_id])

    if result.positions_passed < result.positions_checked:
        first = int((~sketch_ok).nonzero()[0])
        result.problems.append(f"{result.positions_checked - result.positions_passed} of {result.positions_checked} "
                               f"sketches outside tolerance (first at position {first})")
    if result.logprobs_passed < result.logprobs_checked:
        first = prompt_length + int((~logprob_ok).nonzero()[0])
        result.problems.append(f"{result.logprobs_checked - result.logprobs_passed} of {result.logprobs_checked} "
                               f"logprobs outside tolerance (first at position {first})")
    return result


def challenged_problem(result: VerifyResult, record: dict[str, Any], challenge_randomness: str,
                       profile: ProtocolProfile = PROFILE) -> str | None:
    """F's verdict on a verified rollout: the sketches at its 16 challenged completion positions all within
    tolerance, and at most `logprob_max_mismatches` of the logprobs there outside it (None: it passes).

    The positions come from `challenge_randomness` (the validator's window randomness) and the tokens.
    """
    if not result.sketch_ok:
        return "; ".join(result.problems) or "not verified"
    commit = record["commit"]
    tokens, prompt_length = commit["tokens"], commit["rollout"]["prompt_length"]
    positions = indices_from_root(tokens, challenge_randomness, prompt_length, len(tokens), profile.challenge_k)
    sketches = [p for p in positions if not result.sketch_ok[p]]
    logprobs = [p for p in positions if not result.logprob_ok[p - prompt_length]]
    problems = []
    if sketches:
        problems.append(f"{len(sketches)} of {len(positions)} challenged sketches outside tolerance "
                        f"(first at position {sketches[0]})")
    if len(logprobs) > profile.logprob_max_mismatches:
        problems.append(f"{len(logprobs)} of {len(positions)} challenged logprobs outside tolerance "
                        f"(at most {profile.logprob_max_mismatches} allowed)")
    return "; ".join(problems) or None


def termination_problem(record: dict[str, Any], eos_id: int, eos_probability: float | None,
                        profile: ProtocolProfile = PROFILE) -> str | None:
    """F's termination_valid: a completion of exactly the maximum length, or one whose last token is EOS
    with a raw (T = 1) probability of at least `min_eos_probability` at the step before (None: it passes)."""
    commit = record["commit"]
    length, maximum = commit["rollout"]["completion_length"], profile.max_completion_tokens
    if length > maximum:
        return f"completion of {length} tokens is longer than the maximum {maximum}"
    if length == maximum:
        return None
    if commit["tokens"][-1] != eos_id:
        return f"ends with token {commit['tokens'][-1]}, not EOS ({eos_id}), before the maximum length {maximum}"
    if eos_probability is None or eos_probability < profile.min_eos_probability:
        shown = "unknown" if eos_probability is None else f"{eos_probability:.3g}"
        return f"EOS probability {shown} at the step before, under {profile.min_eos_probability}"
    return None


def _quantile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear) quantile, as F computes it."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution_problem(chosen_probs: Sequence[float], profile: ProtocolProfile = PROFILE) -> str | None:
    """F's soft token_distribution_valid over the chosen-token probabilities of a completion (None: it passes).

    Suspicious when there are too few steps, or the median, the minimum, the 10th percentile or the
    10th percentile of the first steps is at or under F's threshold; the reason names every one that is.
    """
    rules = profile.validator
    n = len(chosen_probs)
    if n < rules.distribution_min_steps:
        return f"insufficient: {n} completion steps, fewer than {rules.distribution_min_steps}"
    median, low = _quantile(chosen_probs, 0.5), min(chosen_probs)
    q10 = _quantile(chosen_probs, 0.10)
    q10_initial = _quantile(chosen_probs[:rules.distribution_initial_steps], 0.10)
    reasons = []
    if median <= rules.distribution_median_max:
        reasons.append(f"median {median:.3g} <= {rules.distribution_median_max}")
    if low <= rules.distribution_min_prob:
        reasons.append(f"min {low:.3g} <= {rules.distribution_min_prob}")
    if q10 <= rules.distribution_q10_max:
        reasons.append(f"q10 {q10:.3g} <= {rules.distribution_q10_max}")
    if q10_initial <= rules.distribution_q10_max:
        reasons.append(f"q10 of the first {rules.distribution_initial_steps} steps {q10_initial:.3g} "
                       f"<= {rules.distribution_q10_max}")
    return ("suspicious: " + ", ".join(reasons)) if reasons else None


def verify_sample(model: PreTrainedModel, records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """`verify_rollout` over sampled records, totalled: rollouts, positions and logprobs checked and passed."""
    totals = dict(rollouts_checked=0, rollouts_passed=0, positions_checked=0, positions_passed=0,
                  logprobs_checked=0, logprobs_passed=0)
    for record in records:
        res = verify_rollout(model, record)
        totals["rollouts_checked"] += 1
        totals["rollouts_passed"] += int(res.passed)
        totals["positions_checked"] += res.positions_checked
        totals["positions_passed"] += res.positions_passed
        totals["logprobs_checked"] += res.logprobs_checked
        totals["logprobs_passed"] += res.logprobs_passed
    return totals
