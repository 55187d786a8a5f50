"""The SAT environment exactly as the public GRAIL reference has it: problems, prompt, parser, reward.

Miner and validator must agree bit for bit: the same seed gives the same clauses and prompt, and
the same completion text gives the same reward, down to the float. Everything here mirrors F's
`grail/environments/sat_env.py`, `providers.py` and `signatures.py:derive_env_seed` (grail-protocol.md
§1-§2); the constants come from `protocol.PROFILE`.

One deliberate difference of method, not of result: the reference finds tag blocks with lazy regexes
(`<A>.*?</A>`), which backtrack cubically on texts with many unclosed tags (a 9 kB one takes them
45 s). We locate the same matches with plain tag searches in linear time; tests check both agree.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from grail_pipeline.protocol.profile import PROFILE, SAT_INSTRUCTIONS

RULES = PROFILE.sat
_FLAGS = re.IGNORECASE | re.DOTALL


def _tag(text: str) -> re.Pattern[str]:
    return re.compile(re.escape(text), _FLAGS)


_THINK_OPEN = _tag(RULES.reasoning_start)
_THINK_CLOSE = _tag(RULES.reasoning_end)
_ANSWER_OPEN = _tag(RULES.solution_start)
_ANSWER_CLOSE = _tag(RULES.solution_end)
_BITS_AND_SPACES = re.compile(r"[\s01]*")
_BIT = re.compile(r"[01]")
# What an EOS-terminated completion carries when decoded with special tokens kept.
_END_OF_TEXT_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class SatProblem:
    """One 3-SAT instance; clauses hold signed 1-based literals in the generator's order."""

    seed: str
    difficulty: float
    num_vars: int
    clauses: tuple[tuple[int, ...], ...]

    def to_text(self) -> str:
        """The reference's `_SATProblem.to_text()`."""
        lines = [f"SAT Problem (seed: {self.seed[:8]}...):", f"Variables: {self.num_vars}", "Clauses:"]
        for clause in self.clauses:
            literals = " OR ".join(f"{'NOT ' if lit < 0 else ''}x{abs(lit)}" for lit in clause)
            lines.append(f"  ({literals})")
        return "\n".join(lines) + "\n"

    def prompt(self) -> str:
        """The user prompt (`_create_sat_prompt`)."""
        return f"SAT Problem:\n{self.to_text()}\n{SAT_INSTRUCTIONS}"

    def messages(self) -> list[dict[str, str]]:
        """The environment's observation: one user message; the chat template adds the system turn."""
        return [{"role": "user", "content": self.prompt()}]

    def satisfied_clauses(self, assignment: tuple[bool, ...]) -> int:
        """How many clauses a full assignment satisfies (0 for one of the wrong length, as the reference)."""
        if len(assignment) != self.num_vars:
            return 0
        return sum(any(assignment[abs(lit) - 1] == (lit > 0) for lit in clause) for clause in self.clauses)


def _range(low: int, high: int, difficulty: float) -> tuple[int, int]:
    """The generator's inclusive bounds; float order `(span * d) * 0.5` as in the reference."""
    span = high - low
    return low + int(span * difficulty * 0.5), low + int(span * difficulty)


def generate_problem(seed: str, difficulty: float) -> SatProblem:
    """`_generate_sat_problem`: Random seeded with the sha256 digest bytes, then a fixed call order."""
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    num_vars = rng.randint(*_range(RULES.min_vars, RULES.max_vars, difficulty))
    num_clauses = rng.randint(*_range(RULES.min_clauses, RULES.max_clauses, difficulty))
    clauses = []
    for _ in range(num_clauses):
        variables = rng.sample(range(1, num_vars + 1), min(RULES.clause_length, num_vars))
        clauses.append(tuple(-var if rng.random() < 0.5 else var for var in variables))
    return SatProblem(seed=seed, difficulty=difficulty, num_vars=num_vars, clauses=tuple(clauses))


def derive_env_seed(hotkey_ss58: str, block_hash: str, problem_index: int) -> int:
    """The 32-bit problem seed for a miner, window and file position (the block hash is used verbatim)."""
    material = f"{hotkey_ss58}:{block_hash}:{problem_index}".encode()
    return int(hashlib.sha256(PROFILE.env_seed_domain + material).hexdigest()[:8], 16)


def difficulty_for_seed(seed: int) -> float:
    """`SATTaskSource.next`: difficulty comes from the seed, in [0.3, 0.696]."""
    return RULES.difficulty_base + (seed % 100) / RULES.difficulty_span


def problem_for_seed(seed: int) -> SatProblem:
    """The problem `SATEnv.reset(seed=seed)` poses: the decimal string is what gets hashed."""
    return generate_problem(str(seed), difficulty_for_seed(seed))


def problem_for_index(hotkey_ss58: str, block_hash: str, problem_index: int) -> SatProblem:
    """The problem at a file position of a miner's window."""
    return problem_for_seed(derive_env_seed(hotkey_ss58, block_hash, problem_index))


@dataclass(frozen=True)
class ParsedCompletion:
    """`SATParser.parse` output, plus the bit count the reward functions recompute."""

    answer_text: str
    trailing_after_answer: int
    answer_has_only_bits_spaces: bool
    strict_format_ok: bool
    assignment: tuple[bool, ...]
    has_thinking: bool
    has_answer: bool
    num_bits: int


def _block(
    text: str, opener: re.Pattern[str], closer: re.Pattern[str], start: int = 0
) -> tuple[int, int, int] | None:
    """(content start, content end, match end) of what `opener(.*?)closer` searched from `start` finds.

    Only the leftmost opener can match: a later one sees no closer the first one does not.
    """
    opened = opener.search(text, start)
    closed = closer.search(text, opened.end()) if opened else None
    return (opened.end(), closed.start(), closed.end()) if opened and closed else None


def _answer_span(text: str, has_thinking: bool) -> tuple[int, int, int] | None:
    """The answer block the reference picks.

    With a thinking block it first tries `think.*?</think>.*?<SOLUTION>(.*?)</SOLUTION>`, i.e. the
    first answer block after the first complete thinking block; otherwise the first answer block.
    """
    think = _block(text, _THINK_OPEN, _THINK_CLOSE) if has_thinking else None
    after_think = _block(text, _ANSWER_OPEN, _ANSWER_CLOSE, think[2]) if think else None
    return after_think or _block(text, _ANSWER_OPEN, _ANSWER_CLOSE)


def parse_completion(text: str, num_vars: int) -> ParsedCompletion:
    """Parse a completion as the reference's SATParser; never raises."""
    text = text or ""
    has_thinking = _block(text, _THINK_OPEN, _THINK_CLOSE) is not None
    span = _answer_span(text, has_thinking)
    answer_text, trailing, strict = "", 0, False
    if span is not None:
        answer_text, trailing = text[span[0] : span[1]], len(text) - span[2]
    only_bits = _BITS_AND_SPACES.fullmatch(answer_text) is not None
    bits = _BIT.findall(answer_text)
    if span is not None:
        strict = (
            len(_ANSWER_OPEN.findall(text)) == 1
            and len(_ANSWER_CLOSE.findall(text)) == 1
            and trailing == 0
            and only_bits
            and len(bits) == num_vars
        )
    assignment: tuple[bool, ...] = ()
    if span is not None and answer_text:
        values = [bit == "1" for bit in bits[:num_vars]]
        assignment = tuple(values + [False] * (num_vars - len(values)))
    return ParsedCompletion(
        answer_text=answer_text,
        trailing_after_answer=trailing,
        answer_has_only_bits_spaces=only_bits,
        strict_format_ok=strict,
        assignment=assignment,
        has_thinking=has_thinking,
        has_answer=span is not None,
        num_bits=len(bits),
    )


@dataclass(frozen=True)
class SatReward:
    """The validator's view of one completion (`SATEnv._do_step` reward and info)."""

    reward: float
    components: tuple[float, ...]  # r0 correctness, r1 strict, r2 soft, r3 shape, r4 no trailing, r5 charset
    success: bool
    satisfied_clauses: int
    total_clauses: int
    assignment: tuple[bool, ...]


def _components(problem: SatProblem, parsed: ParsedCompletion) -> tuple[float, ...]:
    """The six raw reward components of `_create_sat_reward_vector`, in order."""
    right_shape = parsed.num_bits == problem.num_vars
    well_formed = (
        parsed.has_answer and parsed.answer_has_only_bits_spaces and parsed.trailing_after_answer == 0 and right_shape
    )
    if well_formed:
        correctness = 1.0 if problem.satisfied_clauses(parsed.assignment) == len(problem.clauses) else 0.0
    else:
        correctness = -0.2
    return (
        correctness,
        0.3 if parsed.strict_format_ok else 0.0,
        0.2 if parsed.has_answer else 0.0,
        0.3 if right_shape else 0.0,
        max(0.0, 0.2 - 0.001 * parsed.trailing_after_answer) if parsed.has_answer else 0.0,
        0.1 if parsed.has_answer and parsed.answer_has_only_bits_spaces else 0.0,
    )


def score_completion(problem: SatProblem, completion_text: str) -> SatReward:
    """The validator's reward for the text exactly as given.

    Pass the completion decoded with special tokens kept: an EOS-terminated answer then ends in
    `<|im_end|>`, counts 10 trailing characters and scores -0.111, not a success. That is what the
    validator computes, so it is what we must report.
    """
    parsed = parse_completion(completion_text, problem.num_vars)
    components = _components(problem, parsed)
    total = 0.0
    for weight, value in zip(RULES.reward_weights, components, strict=True):  # the reference's order of sums
        total += weight * value
    return SatReward(
        reward=total,
        components=components,
        success=components[0] == 1.0,
        satisfied_clauses=problem.satisfied_clauses(parsed.assignment),
        total_clauses=len(problem.clauses),
        assignment=parsed.assignment,
    )


def strip_end_of_text(text: str) -> str:
    """`text` without trailing end-of-text special tokens and the whitespace between or after them.

    Index arithmetic, not slicing or an end-anchored regex, keeps it linear on huge inputs.
    """
    end = len(text)
    while True:
        stop = end
        while stop and text[stop - 1].isspace():
            stop -= 1
        token = next((token for token in _END_OF_TEXT_TOKENS if text.endswith(token, 0, stop)), None)
        if token is None:
            return text[:end]
        end = stop - len(token)


def answer_solves(problem: SatProblem, completion_text: str) -> bool:
    """Whether the answer satisfies the formula: the human-facing Success%, EOS markers ignored."""
    return score_completion(problem, strip_end_of_text(completion_text)).success
