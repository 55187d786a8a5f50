"""A window file checked offline as F's validator checks it, and as strictly as we hold ourselves to.

F's validator (grail-protocol.md §5; F `miner_validator.py`) gates the file (at least 200 bytes, the
name `{hotkey}-window-{window_start}.parquet`, modified before the deadline, metadata wallet and
window), then checks a sample of whole groups rollout by rollout: checkpoint window, consistency
(window, block hash, unique nonce), signatures, schema, token ids, the prompt against the canonical
problem, the proof and logprobs at 16 challenged positions, termination, the reward, and the soft
token-distribution check; then the group rules (16 rollouts, advantages). It seeds the k-th group of
the file from problem index k, whatever its rollout_group says: a file with a gap or two groups
swapped fails every group from there on (and the miner is zeroed for 14 windows). So the prompt and
reward checks here index groups by file order, and the `order` check says where the file leaves
0..N-1.

Two verdicts come out of the same per-rollout results:
- `validator`: F's rules on F's sample (<= 20 rollouts: all; else min(max(1, int(0.10·groups)), 2) whole
  groups, drawn with random.Random(int.from_bytes(sha256(f"{hotkey}:{window_rand}")[:8], "big")) over
  the groups sorted by the sha256 of their rows' commits as canonical JSON, U's `_group_digest`; F's
  sheet says "a digest of their commits"), <= 1 logprob mismatch of the 16 challenged, the soft check
  gating at ceil(0.51·checked) fails. window_rand is sha256(block hash) hex: F's no-drand form, the one
  thing a dry run can know (with drand the validator mixes in a round we cannot see).
- `strict`: every rollout, every position, every logprob, plus our own rules (nonce scheme, groups
  0..N-1 in order).

On random weights (a dummy preset) termination and token distribution fail by design: the length
profile forces EOS where the model gives it ~1/vocab, and every chosen token is that unlikely. They are
run, shown and counted apart (`by_design`), and left out of both verdicts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from grail_pipeline.inference.checkpoints import checkpoint_metadata
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile
from grail_pipeline.protocol.records import REQUIRED_METADATA, grpo_advantages, read_window_file
from grail_pipeline.protocol.sat import SatProblem, problem_for_index, score_completion
from grail_pipeline.protocol.tokenizer import decode_completion, prompt_ids
from grail_pipeline.protocol.wallet import rollout_challenge
from grail_pipeline.protocol.window_schema import metadata_problems, metadata_window, row_problem
from grail_pipeline.proving.validator import (
    challenged_problem,
    distribution_problem,
    signature_problems,
    structure_problems,
    termination_problem,
    verify_rollout,
)

MAX_PROBLEMS_SHOWN = 5
ADVANTAGE_SUM_TOL = 0.01  # the validator's |Σ advantages| bound per group
ADVANTAGE_TOL = 1e-3  # each advantage against the recomputed one
REWARD_REL_TOL, REWARD_ABS_TOL = 0.02, 1e-6  # the validator's reward_valid
WINDOW_RANDOMNESS = "sha256(block hash), F's no-drand form"
BY_DESIGN = "fails by design on random weights (EOS is forced; every token is ~1/vocab likely)"

# name, what it checks, one of F's checks (counts in the 'validator' verdict), soft (gates at a fraction)
CHECKS: tuple[tuple[str, str, bool, bool], ...] = (
    ("file", f"at least {PROFILE.min_file_bytes} bytes and one rollout, named {{wallet}}-window-{{window_start}}.parquet", True, False),
    ("deadline", "modified no later than the upload deadline (--status or the file's deadline metadata)", True, False),
    ("metadata", "wallet, window, inference_count present, whole numbers, matching the rows", True, False),
    ("checkpoint", "checkpoint_window = the checkpoint's window (metadata.json or --checkpoint-window)", True, False),
    ("structure", "schema: every field's type, lengths, 10 <= tokens, 16 <= completion <= max, proof version, "
                  "top-k, hex beacon", True, False),
    ("fields", "one window, block hash and hotkey, unique nonces (F); nonce = group×100+index, challenge (ours)",
     True, False),
    ("signatures", "commit and rollout sr25519 signatures", True, False),
    ("tokens", "token ids in [0, vocab size), length <= the model's context", True, False),
    ("prompt", "prompt = canonical problem k for the k-th group in file order", True, False),
    ("reward", "reward recomputed from the completion (rel 2 %)", True, False),
    ("proofs", "sketches and logprobs: F at 16 challenged positions (<= 1 logprob off), strict at all", True, False),
    ("termination", "ends at the maximum length, or with EOS of probability >= 0.02 the step before", True, False),
    ("distribution", "chosen-token probabilities: n >= 30, median, min, q10, early q10 (soft)", True, True),
    ("groups", "16 rollouts per group, advantages sum ~0 and match the rewards", True, False),
    ("order", "groups 0..N-1, each contiguous, in file order (ours; F seeds by file position)", False, False),
)


@dataclass
class Tally:
    """How many items a check looked at under one set of rules, how many passed, the first failures."""

    checked: int = 0
    passed: int = 0
    problems: list[str] = field(default_factory=list)

    def record(self, ok: bool, problem: str) -> None:
        self.checked += 1
        if ok:
            self.passed += 1
        elif len(self.problems) < MAX_PROBLEMS_SHOWN:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "passed": self.passed, "problems": self.problems}


@dataclass
class Check:
    """One kind of check: its strict tally (every item) and, for F's checks, its tally on F's sample."""

    name: str
    what: str
    f_rule: bool = True
    soft: bool = False
    strict: Tally = field(default_factory=Tally)
    validator: Tally = field(default_factory=Tally)
    skipped: str | None = None  # not run, and why
    by_design: str | None = None  # set when failures are expected of these weights: counted apart

    def record(self, ok: bool, problem: str = "", *, sampled: bool = True,
               validator: tuple[bool, str] | None = None) -> None:
        """One item; `sampled`: in F's sample; `validator`: F's own outcome where it differs from strict."""
        self.strict.record(ok, problem)
        if self.f_rule and sampled:
            self.validator.record(*(validator or (ok, problem)))

    # the strict tally under the names the JSON has always had
    @property
    def checked(self) -> int:
        return self.strict.checked

    @property
    def passed(self) -> int:
        return self.strict.passed

    @property
    def problems(self) -> list[str]:
        return self.strict.problems

    @property
    def ok(self) -> bool:
        """Run and every item passed, or not run (a skipped check is no failure; `skipped` says it did not run)."""
        return self.skipped is not None or self.passed == self.checked

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "f_rule": self.f_rule, "soft": self.soft,
                "checked": self.checked, "passed": self.passed, "ok": self.ok, "skipped": self.skipped,
                "by_design": self.by_design, "problems": self.problems,
                "validator": self.validator.as_dict() if self.f_rule else None}


@dataclass
class Verdict:
    """One verdict over the checks: what failed (first problem each), what failed by design, what did not run."""

    name: str
    rules: str
    rollouts_checked: int
    failed: dict[str, str] = field(default_factory=dict)
    by_design: dict[str, str] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": self.rules, "passed": self.passed, "rollouts_checked": self.rollouts_checked,
                "failed": self.failed, "by_design": self.by_design, "not_run": self.not_run}


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
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)  # F's sample: groups, rollouts, the randomness used
    model_path: str | None = None  # the checkpoint the proof check loaded its model from (None: no proof check)
    random_weights: bool = False

    @property
    def partial(self) -> bool:
        return self.metadata.get("partial", "false").lower() == "true"

    @property
    def passed(self) -> bool:
        """Both verdicts pass (failures by design on random weights are counted apart, not here)."""
        return all(v.passed for v in self.verdicts.values())

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "partial": self.partial, "rollouts": self.rollouts,
                "groups": self.groups, "hotkey": self.hotkey, "window_start": self.window_start,
                "model": self.model, "model_path": self.model_path, "random_weights": self.random_weights,
                "metadata": self.metadata, "sample": self.sample,
                "verdicts": {k: v.as_dict() for k, v in self.verdicts.items()},
                "checks": [c.as_dict() for c in self.checks]}


def _where(record: dict[str, Any]) -> str:
    return f"group {record['rollout_group']} rollout {record['rollout_index']}"


def window_randomness(block_hash: str) -> str:
    """The validator's window randomness without drand: sha256 of the block hash string, hex."""
    return hashlib.sha256(block_hash.encode()).hexdigest()


def _group_digest(records: list[dict[str, Any]], rows: list[int]) -> str:
    """sha256 over the sha256 of each row's commit as canonical JSON, rows in file order (U `_group_digest`)."""
    digest = hashlib.sha256()
    for i in sorted(rows):
        text = json.dumps(records[i]["commit"], sort_keys=True, separators=(",", ":"))
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def sample_groups(records: list[dict[str, Any]], rows_by_group: dict[int, list[int]], hotkey: str,
                  window_rand: str, profile: ProtocolProfile = PROFILE) -> list[int]:
    """The groups F's validator checks: all of them for a small file, else a few drawn deterministically."""
    rules = profile.validator
    if len(records) <= rules.check_all_max_rollouts:
        return list(rows_by_group)
    n = len(rows_by_group)
    k = max(1, min(n, int(n * rules.group_sample_rate)))
    k = min(k, rules.max_sampled_rollouts // profile.rollouts_per_problem)
    seed = int.from_bytes(hashlib.sha256(f"{hotkey}:{window_rand}".encode()).digest()[:8], "big")
    keys = sorted(rows_by_group, key=lambda g: _group_digest(records, rows_by_group[g]))
    return random.Random(seed).sample(keys, k)


class _Problems:
    """Canonical problems and prompt ids per problem index, computed once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, str, int], tuple[SatProblem, list[int]]] = {}

    def get(self, hotkey: str, block_hash: str, index: int) -> tuple[SatProblem, list[int]]:
        key = (hotkey, block_hash, index)
        if key not in self._cache:
            problem = problem_for_index(*key)
            self._cache[key] = (problem, prompt_ids(self.tokenizer, problem))
        return self._cache[key]


def _proof_indices(count: int, sample: int) -> list[int]:
    if sample <= 0 or sample >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(1, sample - 1)) for i in range(sample)})


def _check_file(check: Check, path: Path, metadata: dict[str, str], profile: ProtocolProfile) -> None:
    size = path.stat().st_size if path.exists() else None
    check.record(size is not None and size >= profile.min_file_bytes,
                 f"{size} bytes, under the validator's minimum of {profile.min_file_bytes}")
    wallet, window = metadata.get("wallet"), metadata.get("window_start")
    expected = profile.window_file_name(wallet, window) if wallet and window else None
    check.record(path.name == expected, f"named {path.name}, not {expected or '{wallet}-window-{window_start}.parquet'}"
                                        " (the key the validator looks up)")


def _check_deadline(check: Check, path: Path, deadline: tuple[float, str] | None) -> None:
    if deadline is None:
        check.skipped = "no deadline known: pass --status, or a file with 'deadline' metadata"
        return
    when, source = deadline
    mtime = path.stat().st_mtime if path.exists() else math.inf
    check.record(mtime <= when, f"modified {mtime - when:.1f} s after the deadline {when:.1f} (from {source})")


def _check_metadata(check: Check, metadata: dict[str, str], records: list[dict[str, Any]], rows: int) -> None:
    """`records`: the rows that passed the schema; `rows`: every row of the file."""
    for key in REQUIRED_METADATA:
        check.record(key in metadata, f"metadata has no '{key}'")
    for problem in metadata_problems(metadata):
        check.record(False, problem)
    count = metadata.get("inference_count")
    check.record(count == str(rows), f"inference_count {count} but {rows} rows")
    if "window_start" in metadata:
        wrong = [r for r in records if str(r["window_start"]) != metadata["window_start"]]
        check.record(not wrong, f"{len(wrong)} rows not in window {metadata['window_start']}"
                                f"{' (first: ' + _where(wrong[0]) + ')' if wrong else ''}")
    if "wallet" in metadata:
        wrong = [r for r in records if r["hotkey"] != metadata["wallet"]]
        check.record(not wrong, f"{len(wrong)} rows signed by another hotkey than the file's wallet")


def _field_problems(r: dict[str, Any], first: dict[str, Any], block_hash: str, seen: set[int],
                    profile: ProtocolProfile) -> tuple[list[str], list[str]]:
    """(F's consistency problems, our own field problems) of one row."""
    ours, theirs = [], []
    if r["block_hash"] != block_hash:
        theirs.append("block hash differs from the window's")
    if r["window_start"] != first["window_start"] or r["hotkey"] != first["hotkey"]:
        theirs.append("window or hotkey differ from the file's first row")
    if r["nonce"] in seen:
        theirs.append(f"nonce {r['nonce']} seen before")
    seen.add(r["nonce"])
    nonce = profile.nonce(r["rollout_group"], r["rollout_index"])
    if r["nonce"] != nonce:
        ours.append(f"nonce {r['nonce']} is not group × {profile.nonce_stride} + index = {nonce}")
    if r["challenge"] != rollout_challenge(r["block_hash"], r["nonce"]):
        ours.append("challenge is not |block_hash|nonce")
    if r["total_in_group"] != profile.rollouts_per_problem:
        ours.append(f"total_in_group {r['total_in_group']} is not {profile.rollouts_per_problem}")
    if r["randomness"] != r["commit"]["beacon"]["randomness"]:
        ours.append("randomness differs from commit.beacon.randomness")
    if not r["block_hash"].startswith("0x"):
        ours.append("block hash is not 0x-prefixed")
    return theirs, ours


def _group_problems(group: list[dict[str, Any]], profile: ProtocolProfile) -> list[str]:
    problems = []
    indices = sorted(r["rollout_index"] for r in group)
    if indices != list(range(profile.rollouts_per_problem)):
        problems.append(f"{len(group)} rollouts with indices {indices[:20]}, not 0..{profile.rollouts_per_problem - 1}")
    rewards = [r["commit"]["rollout"]["total_reward"] for r in group]
    advantages = [r["commit"]["rollout"]["advantage"] for r in group]
    if abs(sum(advantages)) > ADVANTAGE_SUM_TOL:
        problems.append(f"advantages sum to {sum(advantages):.4g}")
    if any(abs(a - e) > ADVANTAGE_TOL for a, e in zip(advantages, grpo_advantages(rewards))):
        problems.append("advantages do not match (r - mean) / std of the rewards")
    return problems


def _order_problem(position: int, group: int, rows: list[int], present: set[int]) -> str | None:
    """Why the group at this file position breaks 0..N-1 in order (None: it does not)."""
    if rows != list(range(rows[0], rows[0] + len(rows))):
        return f"group {group}'s rows are split (rows {rows[0]}..{rows[-1]}, not contiguous)"
    if group == position:
        return None
    if position not in present:
        following = min((g for g in present if g > position), default=position + 1)
        missing = f"{position}" if following == position + 1 else f"{position}..{following - 1}"
        return (f"file position {position} holds group {group}: group {missing} missing (a gap; "
                f"F seeds this group and every later one from the wrong problem)")
    return f"file position {position} holds group {group} (out of order; F seeds each group from its file position)"


def _verdicts(checks: list[Check], sampled_rollouts: int, total: int, profile: ProtocolProfile,
              proved: int) -> dict[str, Verdict]:
    """F's verdict and ours; ours says how many rollouts it proved (`proved`: every position and logprob)."""
    cutoff = max(1, math.ceil(profile.validator.soft_fail_fraction * max(1, sampled_rollouts)))
    validator = Verdict("validator", "F's rules on F's sample", sampled_rollouts)
    if proved >= total:
        rules = "every rollout, position and logprob, and our own rules"
    elif proved == 0:
        rules = "our own rules on every rollout; no rollout proved (no model)"
    else:
        rules = (f"every position and logprob of a sample of {proved} of {total} rollouts (F's sample and "
                 f"--proof-sample), our own rules on every rollout")
    strict = Verdict("strict", rules, total)
    for c in checks:
        for verdict, tally in ((validator, c.validator), (strict, c.strict)):
            if verdict is validator and not c.f_rule:
                continue
            if c.skipped is not None:
                verdict.not_run[c.name] = c.skipped
                continue
            fails = tally.checked - tally.passed
            if verdict is validator and c.soft:
                failed = fails >= cutoff
                detail = f"{fails} soft fails of {tally.checked}, the gate is {cutoff}"
            else:
                failed = fails > 0
                detail = f"{fails} of {tally.checked} fail"
            if failed:
                first = tally.problems[0] if tally.problems else ""
                (verdict.by_design if c.by_design else verdict.failed)[c.name] = f"{detail}: {first}"
    return {"validator": validator, "strict": strict}


def check_window_file(path: str | Path, tokenizer: PreTrainedTokenizerBase | None, loaded: LoadedModel | None = None,
                      proof_sample: int = 0, profile: ProtocolProfile = PROFILE,
                      contents: tuple[list[dict[str, Any]], dict[str, str]] | None = None, *,
                      expected_checkpoint_window: int | None = None,
                      deadline: tuple[float, str] | None = None,
                      on_row: Callable[[int, int], None] | None = None) -> FileReport:
    """Read a window file (or take its `contents` as read_window_file returned them) and run every check.

    The model checks (tokens, proofs, termination, distribution) need `loaded`, the prompt, reward and
    termination checks `tokenizer`. `expected_checkpoint_window` defaults to the loaded checkpoint's;
    `deadline` (unix seconds, where it came from) to the file's `deadline` metadata. `proof_sample` N > 0
    limits the strict proof check to N rollouts spread over the file (F's sample is always proved). `on_row(i, n)`
    (optional) is called as row i of n is checked: proofs take minutes on a CPU, and a progress line says where.
    A file that is not a readable window file raises WindowFileError (a UserError).
    """
    path = Path(path)
    file_rows, metadata = contents if contents is not None else read_window_file(path)
    checks = {name: Check(name, what, f_rule, soft) for name, what, f_rule, soft in CHECKS}
    records = []  # the rows every later check reads: those that hold the protocol's schema
    for i, r in enumerate(file_rows):  # F cannot read a malformed row of the file, sampled or not
        problem = row_problem(r)
        if problem is None:
            records.append(r)
        else:
            checks["structure"].record(False, f"file row {i}: {problem}")
    first = records[0] if records else None
    hotkey = metadata.get("wallet") or (first["hotkey"] if first else None)
    block_hash = metadata.get("block_hash") or (first["block_hash"] if first else "")
    window_rand = window_randomness(block_hash)

    rows_by_group: dict[int, list[int]] = defaultdict(list)  # insertion order = file order of first appearance
    for i, r in enumerate(records):
        rows_by_group[r["rollout_group"]].append(i)
    position = {g: k for k, g in enumerate(rows_by_group)}  # F's group_index_by_id
    sampled_groups = set(sample_groups(records, rows_by_group, hotkey or "", window_rand, profile)) if records else set()
    sampled_rows = {i for g in sampled_groups for i in rows_by_group[g]}

    if deadline is None and "deadline" in metadata:
        try:
            when = float(metadata["deadline"])
        except ValueError:
            when = math.nan
        if math.isfinite(when):
            deadline = (when, "the file's deadline metadata")
        else:  # 'inf' passed every file, 'nan' failed every one with "nan s after"
            checks["deadline"].record(False, f"deadline metadata {metadata['deadline'][:40]!r} is not a finite number")
    if expected_checkpoint_window is None and loaded is not None:
        expected_checkpoint_window = loaded.checkpoint_window
    _check_file(checks["file"], path, metadata, profile)
    checks["file"].record(bool(records), "no rollout in the file (it scores nothing; a window with none gets no file)")
    if checks["deadline"].checked == 0:
        _check_deadline(checks["deadline"], path, deadline)
    _check_metadata(checks["metadata"], metadata, records, len(file_rows))

    problems = _Problems(tokenizer) if tokenizer is not None else None
    model_rows = set(_proof_indices(len(records), proof_sample)) | sampled_rows if loaded is not None else set()
    config = loaded.model.config if loaded is not None else None
    hidden_size = int(getattr(config, "hidden_size", None) or getattr(config.get_text_config(), "hidden_size")) \
        if config is not None else 0
    eos_id = tokenizer.eos_token_id if tokenizer is not None else None
    random_weights = loaded is not None and "preset" in checkpoint_metadata(loaded.source)
    seen_nonces: set[int] = set()
    for i, r in enumerate(records):
        if on_row is not None:
            on_row(i, len(records))
        sampled = i in sampled_rows
        where = f"{_where(r)} (file position {position[r['rollout_group']]})"
        if expected_checkpoint_window is not None:
            checks["checkpoint"].record(r["checkpoint_window"] == expected_checkpoint_window,
                                        f"{where}: checkpoint_window {r['checkpoint_window']}, the checkpoint's is "
                                        f"{expected_checkpoint_window}", sampled=sampled)
        theirs, ours = _field_problems(r, first, block_hash, seen_nonces, profile)
        checks["fields"].record(not theirs and not ours, f"{where}: {'; '.join(theirs + ours)}", sampled=sampled,
                                validator=(not theirs, f"{where}: {'; '.join(theirs)}"))
        structure = structure_problems(r, profile)
        checks["structure"].record(not structure, f"{where}: {'; '.join(structure)}", sampled=sampled)
        if structure:
            continue  # nothing below can be read sensibly from a malformed row
        signatures = signature_problems(r)
        checks["signatures"].record(not signatures, f"{where}: {'; '.join(signatures)}", sampled=sampled)
        tokens = r["commit"]["tokens"]
        if config is not None:
            bad = [t for t in tokens if not 0 <= t < config.vocab_size]
            context = getattr(config, "max_position_embeddings", None)
            too_long = context is not None and len(tokens) > context
            checks["tokens"].record(not bad and not too_long,
                                    f"{where}: " + (f"{len(bad)} ids outside [0, {config.vocab_size}) (first {bad[0]})"
                                                    if bad else f"{len(tokens)} tokens, over the context {context}"),
                                    sampled=sampled)
            if bad or too_long:
                continue  # F stops here: the model cannot embed these ids
        prompt_length = r["commit"]["rollout"]["prompt_length"]
        if problems is not None:
            index = position[r["rollout_group"]]
            problem, canonical = problems.get(r["hotkey"], r["block_hash"], index)
            checks["prompt"].record(tokens[:prompt_length] == canonical,
                                    f"{where}: prompt is not problem {index}'s ({len(canonical)} tokens; F seeds the "
                                    f"k-th group of the file from problem k)", sampled=sampled)
            expected = score_completion(problem, decode_completion(tokenizer, tokens[prompt_length:])).reward
            claimed = r["commit"]["rollout"]["total_reward"]
            checks["reward"].record(math.isclose(claimed, expected, rel_tol=REWARD_REL_TOL, abs_tol=REWARD_ABS_TOL),
                                    f"{where}: reward {claimed:.4f}, recomputed {expected:.4f} for problem {index}",
                                    sampled=sampled)
        if i not in model_rows:
            continue
        outside = [x for c in r["commit"]["commitments"] for x in c["indices"] if x >= hidden_size]
        if outside:  # the validator's forward cannot gather there: the proof fails without running it
            problem = f"{where}: {len(outside)} commitment indices outside the hidden size {hidden_size} (first {outside[0]})"
            checks["proofs"].record(False, problem, sampled=sampled)
            continue
        res = verify_rollout(loaded.model, r, profile, eos_id)
        strict_ok = res.positions_checked > 0 and res.positions_passed == res.positions_checked \
            and res.logprobs_passed == res.logprobs_checked
        detail = "; ".join(p for p in res.problems if "signature" not in p) or "no positions checked"
        f_problem = challenged_problem(res, r, window_rand, profile)
        checks["proofs"].record(strict_ok, f"{where}: {detail}", sampled=sampled,
                                validator=(f_problem is None, f"{where}: {f_problem}"))
        if eos_id is not None:
            ending = termination_problem(r, eos_id, res.eos_probability, profile)
            checks["termination"].record(ending is None, f"{where}: {ending}", sampled=sampled)
        spread = distribution_problem(res.chosen_probs, profile)
        checks["distribution"].record(spread is None, f"{where}: {spread}", sampled=sampled)

    for k, (g, rows) in enumerate(rows_by_group.items()):
        group_problems = _group_problems([records[i] for i in rows], profile)
        checks["groups"].record(not group_problems, f"group {g} (file position {k}): {'; '.join(group_problems)}",
                                sampled=g in sampled_groups)
        out_of_place = _order_problem(k, g, rows, set(rows_by_group))
        checks["order"].record(out_of_place is None, out_of_place or "")

    none = ("no rollouts in the file" if not file_rows else "no row of the file holds the schema") if not records else None
    if tokenizer is None:
        for name in ("prompt", "reward", "termination"):
            checks[name].skipped = none or "no tokenizer"
    if expected_checkpoint_window is None:
        checks["checkpoint"].skipped = none or "no expected checkpoint window: load the model or pass --checkpoint-window"
    if loaded is None:
        checks["tokens"].skipped = none or "needs the model's vocabulary and context (--skip-proofs)"
        for name in ("proofs", "termination", "distribution"):
            checks[name].skipped = none or "no model (--skip-proofs)"
    elif random_weights:
        for name in ("termination", "distribution"):
            checks[name].by_design = BY_DESIGN
    ordered = list(checks.values())
    return FileReport(
        path=str(path), metadata=metadata, rollouts=len(file_rows), groups=len(rows_by_group),
        hotkey=first["hotkey"] if first else metadata.get("wallet"),
        window_start=first["window_start"] if first else metadata_window(metadata),
        model=first["commit"]["model"]["name"] if first else None,
        checks=ordered, verdicts=_verdicts(ordered, len(sampled_rows), len(file_rows), profile, len(model_rows)),
        sample={"groups": sorted(sampled_groups, key=position.get), "of_groups": len(rows_by_group),
                "rollouts": len(sampled_rows), "window_randomness": window_rand, "randomness_from": WINDOW_RANDOMNESS},
        model_path=loaded.source if loaded is not None else None,
        random_weights=random_weights,
    )
