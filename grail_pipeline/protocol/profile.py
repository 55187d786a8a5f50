"""GRAIL protocol constants, gathered in one profile per protocol version.

Everything the validator checks (proof sketch parameters, window arithmetic, SAT generator bounds,
reward weights, the system prompt) lives here, so that a later protocol version is a new
`ProtocolProfile` rather than an edit scattered over the code base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the window file's window_start, block, nonce, rollout_group and checkpoint_window are int64 columns: a number a
# command takes for one of them (or a seed our generators take) must fit
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

SYSTEM_PROMPT = (
    "You are given a problem.\n"
    "Think about the problem and provide your working out.\n"
    "Place it between <start_working_out> and </end_working_out>.\n"
    "Then, provide your code between <SOLUTION> and </SOLUTION>."
)

SAT_INSTRUCTIONS = (
    "Provide your final assignment between <SOLUTION></SOLUTION> as space-separated 0/1 values "
    "for x1..xN (e.g., <SOLUTION>0 1 0 1</SOLUTION>).\n"
)


@dataclass(frozen=True)
class SatRules:
    """The SAT environment: generator bounds, tags and the reward vector."""

    min_vars: int = 4
    max_vars: int = 15
    min_clauses: int = 5
    max_clauses: int = 20
    clause_length: int = 3
    difficulty_base: float = 0.3
    difficulty_span: float = 250.0  # difficulty = base + (seed % 100) / span
    reasoning_start: str = "<start_working_out>"
    reasoning_end: str = "</end_working_out>"
    solution_start: str = "<SOLUTION>"
    solution_end: str = "</SOLUTION>"
    # weights of r0 correctness, r1 strict format, r2 soft format, r3 shape, r4 no trailing, r5 charset
    reward_weights: tuple[float, ...] = (1.0, 0.15, 0.10, 0.15, 0.10, 0.05)


@dataclass(frozen=True)
class SamplingDefaults:
    """The miner's generation parameters (F `GenerationParams`)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_new_tokens: int = 1024  # MAX_NEW_TOKENS while SAT was the live environment


@dataclass(frozen=True)
class ValidatorRules:
    """How F's validator samples a window file and judges its rollouts beyond the proof
    (F `miner_validator.py`, `validators/schema.py`, `validators/distribution.py`; grail-protocol.md §5)."""

    check_all_max_rollouts: int = 20  # files with at most this many rollouts are checked whole
    group_sample_rate: float = 0.10  # otherwise this fraction of the groups ...
    max_sampled_rollouts: int = 32  # ... but at most this many rollouts' worth of whole groups (2 of 16)
    soft_fail_fraction: float = 0.51  # the miner is gated when soft fails >= ceil(this * checked)
    min_sequence_tokens: int = 10  # the schema's minimum len(tokens)
    distribution_min_steps: int = 30  # fewer chosen-token probabilities: "insufficient" (a soft fail)
    distribution_median_max: float = 0.30  # suspicious if the median is <= this
    distribution_min_prob: float = 1e-5  # suspicious if any probability is <= this
    distribution_q10_max: float = 0.025  # suspicious if the 10th percentile (overall or early) is <= this
    distribution_initial_steps: int = 50  # the early window for the second q10


@dataclass(frozen=True)
class ProtocolProfile:
    """One version of the GRAIL mining protocol."""

    name: str
    proof_version: str
    prime_q: int
    challenge_k: int
    layer_index: int
    proof_topk: int
    proof_num_buckets: int
    proof_coeff_range: int
    sketch_tolerance: int
    position_importance_decay: float
    commit_domain: bytes
    window_length_blocks: int
    block_time_s: float
    rollouts_per_problem: int
    nonce_stride: int
    max_completion_tokens: int
    min_completion_tokens: int
    logprob_abs_tol: float
    logprob_rel_tol: float
    logprob_max_mismatches: int
    min_eos_probability: float
    upload_deadline_slack_s: float  # the deadline is the chain time of block window_start + window length, minus this
    min_file_bytes: int  # the validator skips smaller window files
    unique_rollouts_cap_per_window: int
    superlinear_exponent: float
    weight_rolling_windows: int  # the cap counts a hotkey's unique rollouts over this many windows (360 blocks)
    sat: SatRules = field(default_factory=SatRules)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    validator: ValidatorRules = field(default_factory=ValidatorRules)
    system_prompt: str = SYSTEM_PROMPT
    env_seed_domain: bytes = b"seed|"  # problem seed = sha256(domain + b"hotkey:block_hash:index")[:4 bytes]

    @property
    def window_seconds(self) -> float:
        return self.window_length_blocks * self.block_time_s

    def sketch_tolerance_at(self, position: int) -> int:
        """The validator's position-dependent sketch tolerance."""
        decay = self.position_importance_decay
        return int(self.sketch_tolerance * (2.0 - 1.0 / (1.0 + position / decay)))

    def window_file_name(self, hotkey: str, window_start: int) -> str:
        """The object key's file name the validator looks for: one file per hotkey and window."""
        return f"{hotkey}-window-{window_start}.parquet"

    def nonce(self, problem_index: int, rollout_index: int) -> int:
        return problem_index * self.nonce_stride + rollout_index


V1 = ProtocolProfile(
    name="v1",
    proof_version="v1",
    prime_q=2_147_483_647,
    challenge_k=16,
    layer_index=-1,
    proof_topk=32,
    proof_num_buckets=16,
    proof_coeff_range=127,
    sketch_tolerance=50,
    position_importance_decay=100.0,
    commit_domain=b"grail-commit-v1",
    window_length_blocks=30,
    block_time_s=12.0,
    rollouts_per_problem=16,
    nonce_stride=100,
    max_completion_tokens=2048,
    min_completion_tokens=16,
    logprob_abs_tol=1e-3,
    logprob_rel_tol=0.02,
    logprob_max_mismatches=1,
    min_eos_probability=0.02,
    upload_deadline_slack_s=4.0,
    min_file_bytes=200,
    unique_rollouts_cap_per_window=5120,
    superlinear_exponent=4.0,
    weight_rolling_windows=12,
)

PROFILE = V1
"""The profile this build mines with."""
