"""The SAT environment against the reference's golden data, the fact sheet's §9 vectors and adversarial text."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from grail_pipeline.protocol.profile import PROFILE, SAT_INSTRUCTIONS
from grail_pipeline.protocol.sat import (
    ParsedCompletion,
    SatProblem,
    answer_solves,
    derive_env_seed,
    difficulty_for_seed,
    generate_problem,
    parse_completion,
    problem_for_index,
    problem_for_seed,
    score_completion,
    strip_end_of_text,
)

GOLDEN_DIR = Path(__file__).parent / "golden"  # committed copies: CI clones lack ../shared
GOLDEN = json.loads((GOLDEN_DIR / "sat.json").read_text())
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
BLOCK_HASH = "0x" + hashlib.sha256(b"block").hexdigest()
SEED0 = 919595806


def _shared_golden_dir() -> Path:
    return Path(os.environ.get("GRAIL_GOLDEN_DIR") or Path(__file__).resolve().parents[2] / "shared" / "golden")


@pytest.mark.parametrize("name", ["sat.json", "proof.json"])
def test_committed_golden_copy_is_current(name: str) -> None:
    shared = _shared_golden_dir() / name
    if not shared.is_file():
        pytest.skip(f"no shared golden data at {shared}")
    assert (GOLDEN_DIR / name).read_bytes() == shared.read_bytes()


@pytest.mark.parametrize("case", GOLDEN["sat_problems"], ids=lambda case: f"{case['seed'][:16]}@{case['difficulty']}")
def test_golden_problem(case: dict) -> None:
    problem = generate_problem(case["seed"], case["difficulty"])
    assert problem.num_vars == case["num_vars"]
    assert [list(clause) for clause in problem.clauses] == case["clauses"]
    assert problem.prompt() == case["prompt"]
    assert problem.messages() == [{"role": "user", "content": case["prompt"]}]


@pytest.mark.parametrize("case", GOLDEN["rewards"], ids=lambda case: f"{case['seed'][:8]}:{case['completion'][:40]!r}")
def test_golden_reward(case: dict) -> None:
    result = score_completion(generate_problem(case["seed"], case["difficulty"]), case["completion"])
    assert result.reward == pytest.approx(case["reward"], abs=1e-9)
    assert list(result.components) == pytest.approx(case["components"], abs=1e-12)
    assert result.success is case["success"]


# --- §9 vectors ------------------------------------------------------------------------------------------------


def test_section9_seeds_and_problems() -> None:
    expected = [  # seed, difficulty, vars, clauses, first clause
        (SEED0, 0.324, 5, 7, (-4, -5, -1)),
        (2713577492, 0.6679999999999999, 11, 10, (6, -4, 3)),
        (1081643666, 0.5640000000000001, 7, 10, (-3, 1, 4)),
    ]
    for index, (seed, difficulty, num_vars, num_clauses, first) in enumerate(expected):
        assert derive_env_seed(HOTKEY, BLOCK_HASH, index) == seed
        assert difficulty_for_seed(seed) == difficulty
        problem = problem_for_index(HOTKEY, BLOCK_HASH, index)
        assert problem == problem_for_seed(seed) == generate_problem(str(seed), difficulty)
        assert (problem.num_vars, len(problem.clauses), problem.clauses[0]) == (num_vars, num_clauses, first)


def test_section9_problem0_in_full() -> None:
    problem = problem_for_seed(SEED0)
    assert problem.clauses == ((-4, -5, -1), (5, 4, 1), (4, 1, 5), (-2, 5, -4), (-2, 1, -4), (2, -3, -5), (-4, 3, -5))
    assert problem.prompt().startswith(
        "SAT Problem:\nSAT Problem (seed: 91959580...):\nVariables: 5\nClauses:\n  (NOT x4 OR NOT x5 OR NOT x1)\n"
    )
    assert problem.prompt().endswith("  (NOT x4 OR x3 OR NOT x5)\n\n" + SAT_INSTRUCTIONS)


def _satisfying_answer(problem: SatProblem) -> str:
    for bits in itertools.product((0, 1), repeat=problem.num_vars):
        if problem.satisfied_clauses(tuple(bool(b) for b in bits)) == len(problem.clauses):
            return "<SOLUTION>" + " ".join(map(str, bits)) + "</SOLUTION>"
    raise AssertionError("unsatisfiable")


def test_section9_rewards_and_the_eos_gotcha() -> None:
    problem = problem_for_seed(SEED0)
    ones = score_completion(problem, "<start_working_out>thinking</end_working_out>\n<SOLUTION>1 1 1 1 1</SOLUTION>")
    assert ones.reward == pytest.approx(0.135, abs=1e-9)
    assert ones.components == pytest.approx((0.0, 0.3, 0.2, 0.3, 0.2, 0.1))
    assert not ones.success

    answer = _satisfying_answer(problem)
    solved = score_completion(problem, answer)
    assert solved.reward == pytest.approx(1.135, abs=1e-9) and solved.success
    assert solved.satisfied_clauses == solved.total_clauses == 7

    with_eos = score_completion(problem, answer + "<|im_end|>")  # what the validator scores
    assert with_eos.reward == pytest.approx(-0.111, abs=1e-9)
    assert not with_eos.success
    assert with_eos.satisfied_clauses == 7  # the assignment itself is still right
    assert answer_solves(problem, answer + "<|im_end|>")  # the human-facing Success%
    assert answer_solves(problem, answer)


def test_answer_solves_ignores_only_trailing_end_of_text() -> None:
    problem = problem_for_seed(SEED0)
    answer = _satisfying_answer(problem)
    assert answer_solves(problem, answer + "<|im_end|>\n<|endoftext|><|endoftext|> \n")
    assert not answer_solves(problem, answer + " trailing words<|im_end|>")
    assert not answer_solves(problem, answer + "\n<|im_end|>")  # the model's own newline is trailing text
    assert not answer_solves(problem, "<|im_end|>")
    assert not answer_solves(problem, "")
    assert strip_end_of_text("a <|im_end|> \n<|endoftext|>\t") == "a "
    assert strip_end_of_text("<|im_end|>x") == "<|im_end|>x"
    assert strip_end_of_text("keep  ") == "keep  "


def test_reward_info_fields() -> None:
    problem = problem_for_seed(SEED0)
    result = score_completion(problem, "<SOLUTION>1 1 1 1 1</SOLUTION>")
    assert result.assignment == (True,) * 5
    assert result.total_clauses == 7
    assert result.satisfied_clauses == problem.satisfied_clauses((True,) * 5) == 6
    short = score_completion(problem, "<SOLUTION>1 0</SOLUTION>")  # padded with 0, as the reference
    assert short.assignment == (True, False, False, False, False)
    assert score_completion(problem, "no answer").assignment == ()
    assert score_completion(problem, "no answer").satisfied_clauses == 0


def test_think_then_answer_ordering() -> None:
    text = "<SOLUTION>1 1</SOLUTION><start_working_out>x</end_working_out><SOLUTION>0 0 0 0 0</SOLUTION>"
    parsed = parse_completion(text, 5)
    assert parsed.has_thinking and parsed.answer_text == "0 0 0 0 0" and parsed.trailing_after_answer == 0
    assert not parsed.strict_format_ok  # two answer blocks
    unclosed = parse_completion("<start_working_out>x<SOLUTION>1</SOLUTION>", 1)
    assert not unclosed.has_thinking and unclosed.strict_format_ok


# --- adversarial text: the reference's regexes as the oracle ----------------------------------------------------

_FLAGS = re.IGNORECASE | re.DOTALL
_REF_THINK = re.compile(r"<start_working_out>.*?</end_working_out>", _FLAGS)
_REF_ANSWER = re.compile(r"<SOLUTION>(?P<content>.*?)</SOLUTION>", _FLAGS)
_REF_THINK_THEN_ANSWER = re.compile(
    r"<start_working_out>.*?</end_working_out>.*?<SOLUTION>(?P<content>.*?)</SOLUTION>", _FLAGS
)


def _reference_parse(text: str, num_vars: int) -> ParsedCompletion:
    """SATParser.parse as grail-protocol.md §1 states it, regexes and all."""
    has_thinking = bool(_REF_THINK.search(text))
    match = (_REF_THINK_THEN_ANSWER.search(text) if has_thinking else None) or _REF_ANSWER.search(text)
    answer = match.group("content") if match else ""
    trailing = len(text) - match.end() if match else 0
    only_bits = bool(re.fullmatch(r"[\s01]*", answer))
    bits = re.findall(r"[01]", answer)
    opens = len(re.findall("<SOLUTION>", text, re.IGNORECASE))
    closes = len(re.findall("</SOLUTION>", text, re.IGNORECASE))
    strict = bool(match) and opens == 1 and closes == 1 and trailing == 0 and only_bits and len(bits) == num_vars
    assignment: tuple[bool, ...] = ()
    if match and answer:
        values = [b == "1" for b in bits[:num_vars]]
        assignment = tuple(values + [False] * (num_vars - len(values)))
    return ParsedCompletion(answer, trailing, only_bits, strict, assignment, has_thinking, bool(match), len(bits))


FRAGMENTS = [
    "<SOLUTION>", "</SOLUTION>", "<solution>", "</Solution>", "<ſolution>", "<SOLUTION", "SOLUTION>", "</",
    "<start_working_out>", "</end_working_out>", "<START_WORKING_OUT>", "</END_WORKING_OUT>",
    "<start_wor\u212aing_out>",  # KELVIN SIGN: matches "k" under re.IGNORECASE, as in the reference
    "0", "1", "0 1 1 0 1", "01101", " ", "\n", "\t", "\u00a0", "\u2003", "\x1c", "x", "2", "x1=1", "１",
    "<|im_end|>", "<|endoftext|>", "<|im_start|>", "é", "中文", "🙂", "\x00", "\ud800", "\u0301", "<", ">", "/",
]  # fmt: skip


def _adversarial_texts(count: int) -> list[str]:
    rng = random.Random(20251015)
    texts = ["", " ", "<SOLUTION>", "</SOLUTION>", "<SOLUTION></SOLUTION>" * 3]
    def fragments(most: int) -> str:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, most)))

    for _ in range(count):
        kind = rng.random()
        if kind < 0.5:
            texts.append(fragments(40))
        elif kind < 0.8:  # a plausible answer amid noise, often clean enough to be strict or correct
            bits = rng.choice([" ", "", "  "]).join(rng.choice("01") for _ in range(rng.randint(3, 7)))
            noise = [fragments(3) if rng.random() < 0.4 else "" for _ in range(2)]
            texts.append(noise[0] + "<SOLUTION>" + bits + "</SOLUTION>" + noise[1])
        else:  # arbitrary code points, surrogates included
            texts.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 80))))
    return texts


def test_parser_matches_reference_regexes_on_adversarial_text() -> None:
    problem = problem_for_seed(SEED0)
    for text in _adversarial_texts(4000):
        for num_vars in (1, problem.num_vars):
            assert parse_completion(text, num_vars) == _reference_parse(text, num_vars), repr(text)
        result = score_completion(problem, text)
        assert -0.2 - 1e-12 <= result.reward <= 1.135 + 1e-12
        assert len(result.components) == len(PROFILE.sat.reward_weights)
        answer_solves(problem, text)


def test_huge_and_pathological_texts_are_fast() -> None:
    problem = problem_for_seed(SEED0)
    texts = [
        # many thinking blocks, answer openers without closers: cubic backtracking for the lazy regexes
        "<SOLUTION>1</SOLUTION>" + "<start_working_out></end_working_out><SOLUTION>" * 20_000,
        "<SOLUTION>" * 100_000,
        "<start_working_out>" * 50_000 + "</end_working_out>" * 50_000,
        "<SOLUTION>" + "0 1 " * 500_000 + "</SOLUTION>",
        "<|im_end|>" * 100_000 + "x",
        "<SOLUTION>1 0 0 0 0</SOLUTION>" + "<|im_end|> " * 100_000,
        "".join(chr(random.Random(1).randrange(0x110000)) for _ in range(200_000)),
    ]
    for text in texts:
        started = time.perf_counter()
        score_completion(problem, text)
        answer_solves(problem, text)
        assert time.perf_counter() - started < 5.0  # the reference regexes take minutes on the first one
