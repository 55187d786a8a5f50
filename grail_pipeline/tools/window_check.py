"""A window file checked offline as a validator would: every check, each counted with its first failures.

Schema and metadata, every rollout's structure and signatures, the nonce/challenge scheme, the
prompt against the canonical problem for (hotkey, block hash, rollout group), the reward recomputed
with the SAT environment, the group structure (16 rollouts, GRPO advantages that sum to ~0 and match
the rewards) and, with a model, the proof and logprobs at every position with the validator's
unbatched forward. Not checked: the termination rule (it needs the real model's EOS probability;
dummy weights end where the length profile forces them) and the soft token-distribution check.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile
from grail_pipeline.protocol.records import REQUIRED_METADATA, grpo_advantages, read_window_file
from grail_pipeline.protocol.sat import SatProblem, problem_for_index, score_completion
from grail_pipeline.protocol.tokenizer import decode_completion, prompt_ids
from grail_pipeline.protocol.wallet import rollout_challenge
from grail_pipeline.proving.validator import signature_problems, structure_problems, verify_rollout

MAX_PROBLEMS_SHOWN = 5
ADVANTAGE_SUM_TOL = 0.01  # the validator's |Σ advantages| bound per group
ADVANTAGE_TOL = 1e-3  # each advantage against the recomputed one
REWARD_REL_TOL, REWARD_ABS_TOL = 0.02, 1e-6  # the validator's reward_valid


@dataclass
class Check:
    """One kind of check over the file: how many items were checked, how many passed, the first failures."""

    name: str
    what: str
    checked: int = 0
    passed: int = 0
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)

    def record(self, ok: bool, problem: str = "") -> None:
        self.checked += 1
        if ok:
            self.passed += 1
        elif len(self.problems) < MAX_PROBLEMS_SHOWN:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.passed == self.checked

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "checked": self.checked, "passed": self.passed,
                "ok": self.ok, "skipped": self.skipped, "problems": self.problems}


@dataclass
class FileReport:
    """Everything `verify` found out about one window file."""

    path: str
    metadata: dict[str, str]
    rollouts: int
    groups: int
    hotkey: str | None
    window_start: int | None
    model: str | None
    checks: list[Check]
    model_path: str | None = None  # the checkpoint the proof check loaded its model from (None: no proof check)

    @property
    def partial(self) -> bool:
        return self.metadata.get("partial", "false").lower() == "true"

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "partial": self.partial, "rollouts": self.rollouts,
                "groups": self.groups, "hotkey": self.hotkey, "window_start": self.window_start,
                "model": self.model, "model_path": self.model_path, "metadata": self.metadata,
                "checks": [c.as_dict() for c in self.checks]}


def _where(record: dict[str, Any]) -> str:
    return f"group {record['rollout_group']} rollout {record['rollout_index']}"


def _check_metadata(check: Check, metadata: dict[str, str], records: list[dict[str, Any]]) -> None:
    for key in REQUIRED_METADATA:
        check.record(key in metadata, f"metadata has no '{key}'")
    count = metadata.get("inference_count")
    check.record(count == str(len(records)), f"inference_count {count} but {len(records)} rows")
    if "window_start" in metadata:
        wrong = [r for r in records if str(r["window_start"]) != metadata["window_start"]]
        check.record(not wrong, f"{len(wrong)} rows not in window {metadata['window_start']}"
                                f"{' (first: ' + _where(wrong[0]) + ')' if wrong else ''}")
    if "wallet" in metadata:
        wrong = [r for r in records if r["hotkey"] != metadata["wallet"]]
        check.record(not wrong, f"{len(wrong)} rows signed by another hotkey than the file's wallet")


def _check_fields(check: Check, records: list[dict[str, Any]], metadata: dict[str, str],
                  profile: ProtocolProfile) -> None:
    first = records[0] if records else None
    worker = metadata.get("worker_id")
    total = metadata.get("total_workers")
    for r in records:
        problems = []
        nonce = profile.nonce(r["rollout_group"], r["rollout_index"])
        if r["nonce"] != nonce:
            problems.append(f"nonce {r['nonce']} is not group × {profile.nonce_stride} + index = {nonce}")
        if r["challenge"] != rollout_challenge(r["block_hash"], r["nonce"]):
            problems.append("challenge is not |block_hash|nonce")
        if r["total_in_group"] != profile.rollouts_per_problem:
            problems.append(f"total_in_group {r['total_in_group']} is not {profile.rollouts_per_problem}")
        if r["randomness"] != r["commit"]["beacon"]["randomness"]:
            problems.append("randomness differs from commit.beacon.randomness")
        if (r["block_hash"], r["randomness"], r["hotkey"]) != (first["block_hash"], first["randomness"], first["hotkey"]):
            problems.append("block hash, randomness or hotkey differ from the file's first row")
        if not r["block_hash"].startswith("0x"):
            problems.append("block hash is not 0x-prefixed")
        if (worker is not None and total is not None and total.isdigit() and int(total) > 0
                and r["rollout_group"] % int(total) != int(worker or 0)):
            problems.append(f"group {r['rollout_group']} is not worker {worker} of {total}'s")
        check.record(not problems, f"{_where(r)}: {'; '.join(problems)}")


def _check_signatures(check: Check, record: dict[str, Any]) -> None:
    problems = signature_problems(record)
    check.record(not problems, f"{_where(record)}: {'; '.join(problems)}")


def _check_groups(check: Check, records: list[dict[str, Any]], profile: ProtocolProfile) -> None:
    """16 per group, each group contiguous and in ascending order, advantages as the validator recomputes."""
    order: list[int] = []
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        g = r["rollout_group"]
        if not order or order[-1] != g:
            order.append(g)
        rows[g].append(r)
    check.record(len(order) == len(rows), "a group's rollouts are not contiguous in the file")
    check.record(order == sorted(order), "groups are not in ascending index order")
    for g in sorted(rows):
        group = rows[g]
        problems = []
        indices = [r["rollout_index"] for r in group]
        if sorted(indices) != list(range(profile.rollouts_per_problem)):
            problems.append(f"{len(group)} rollouts with indices {sorted(indices)[:20]}, "
                            f"not 0..{profile.rollouts_per_problem - 1}")
        rewards = [r["commit"]["rollout"]["total_reward"] for r in group]
        advantages = [r["commit"]["rollout"]["advantage"] for r in group]
        if abs(sum(advantages)) > ADVANTAGE_SUM_TOL:
            problems.append(f"advantages sum to {sum(advantages):.4g}")
        expected = grpo_advantages(rewards)
        if any(abs(a - e) > ADVANTAGE_TOL for a, e in zip(advantages, expected)):
            problems.append("advantages do not match (r - mean) / std of the rewards")
        check.record(not problems, f"group {g}: {'; '.join(problems)}")


class _Problems:
    """Canonical problems and prompt ids per group, computed once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, str, int], tuple[SatProblem, list[int]]] = {}

    def get(self, record: dict[str, Any]) -> tuple[SatProblem, list[int]]:
        key = (record["hotkey"], record["block_hash"], record["rollout_group"])
        if key not in self._cache:
            problem = problem_for_index(*key)
            self._cache[key] = (problem, prompt_ids(self.tokenizer, problem))
        return self._cache[key]


def _proof_indices(count: int, sample: int) -> list[int]:
    if sample <= 0 or sample >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(1, sample - 1)) for i in range(sample)})


def check_window_file(path: str | Path, tokenizer: PreTrainedTokenizerBase | None, loaded: LoadedModel | None = None,
                      proof_sample: int = 0, profile: ProtocolProfile = PROFILE,
                      contents: tuple[list[dict[str, Any]], dict[str, str]] | None = None) -> FileReport:
    """Read a window file (or take its `contents` as read_window_file returned them) and run every check.

    The proof check needs `loaded`, the prompt and reward checks `tokenizer`. A file that is not a
    readable window file raises WindowFileError (a UserError).
    """
    records, metadata = contents if contents is not None else read_window_file(path)
    checks = {name: Check(name, what) for name, what in (
        ("metadata", "wallet, window, inference_count match the rows"),
        ("structure", "lengths, proof version, top-k, hex beacon (validator schema)"),
        ("fields", "nonce = group×100+index, challenge, one window/hotkey, worker split"),
        ("signatures", "commit and rollout sr25519 signatures"),
        ("tokens", "token ids inside the vocabulary"),
        ("prompt", "prompt = canonical problem for (hotkey, block hash, group)"),
        ("reward", "reward recomputed from the completion (rel 2 %)"),
        ("groups", "16 per group, in order, advantages sum ~0 and match"),
        ("proofs", "sketches and logprobs at every position (validator's forward)"),
    )}
    _check_metadata(checks["metadata"], metadata, records)
    _check_fields(checks["fields"], records, metadata, profile)
    _check_groups(checks["groups"], records, profile)
    problems = _Problems(tokenizer) if tokenizer is not None else None
    vocab = loaded.vocab_size if loaded is not None else None  # the model's embedding rows, not the tokenizer's
    well_formed = []
    for r in records:
        structure = structure_problems(r, profile)
        checks["structure"].record(not structure, f"{_where(r)}: {'; '.join(structure)}")
        if structure:
            continue
        well_formed.append(r)
        _check_signatures(checks["signatures"], r)
        tokens = r["commit"]["tokens"]
        if vocab is not None:
            bad = [t for t in tokens if not 0 <= t < vocab]
            checks["tokens"].record(not bad, f"{_where(r)}: {len(bad)} ids outside [0, {vocab})")
        if problems is None:
            continue
        problem, canonical = problems.get(r)
        prompt_length = r["commit"]["rollout"]["prompt_length"]
        checks["prompt"].record(tokens[:prompt_length] == canonical,
                                f"{_where(r)}: prompt is not the canonical problem's ({len(canonical)} tokens)")
        text = decode_completion(tokenizer, tokens[prompt_length:])
        expected = score_completion(problem, text).reward
        claimed = r["commit"]["rollout"]["total_reward"]
        checks["reward"].record(math.isclose(claimed, expected, rel_tol=REWARD_REL_TOL, abs_tol=REWARD_ABS_TOL),
                                f"{_where(r)}: reward {claimed:.4f}, recomputed {expected:.4f}")
    if tokenizer is None:
        for name in ("prompt", "reward"):
            checks[name].skipped = "no tokenizer"
    if vocab is None:
        checks["tokens"].skipped = "needs the model's vocabulary size"
    proofs = checks["proofs"]
    if loaded is None:
        proofs.skipped = "no model (--skip-proofs)"
    else:
        for i in _proof_indices(len(well_formed), proof_sample):
            r = well_formed[i]
            res = verify_rollout(loaded.model, r, profile)
            ok = res.positions_checked > 0 and res.positions_passed == res.positions_checked \
                and res.logprobs_passed == res.logprobs_checked
            detail = "; ".join(p for p in res.problems if "signature" not in p) or "no positions checked"
            proofs.record(ok, f"{_where(r)}: {detail}")
    first = records[0] if records else None
    return FileReport(
        path=str(path), metadata=metadata, rollouts=len(records),
        groups=len({r["rollout_group"] for r in records}),
        hotkey=first["hotkey"] if first else metadata.get("wallet"),
        window_start=first["window_start"] if first else (int(metadata["window_start"]) if "window_start" in metadata else None),
        model=first["commit"]["model"]["name"] if first else None,
        checks=list(checks.values()),
        model_path=loaded.source if loaded is not None else None,
    )
