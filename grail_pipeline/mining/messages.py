"""The units of work that travel through the pipeline, one per SAT problem, stage by stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.lengths import LengthProfile
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sat import SatProblem, derive_env_seed, problem_for_seed
from grail_pipeline.protocol.tokenizer import prompt_ids
from grail_pipeline.proving.proofs import RolloutProof


@dataclass
class ProblemTask:
    """One problem to mine: its seed, prompt tokens and the target length of each rollout."""

    window: WindowContext
    index: int
    seed: int
    problem: SatProblem
    prompt_ids: list[int]
    targets: list[int | None]
    block: int = 0  # the block at which the problem was issued
    attempt: int = 0  # 1, 2, …: new samples of a dropped group's prompt, for the same index
    hotkey: str = ""  # the ss58 address it is mined for: its seed's, its signer's and its file's (mining/hotkeys.py)

    @property
    def key(self) -> tuple[int, int, int]:
        """(window start, index, attempt): one admission of this problem."""
        return (self.window.window_start, self.index, self.attempt)


def make_task(window: WindowContext, index: int, hotkey: str, tokenizer: PreTrainedTokenizerBase,
              lengths: LengthProfile, block: int = 0, attempt: int = 0) -> ProblemTask:
    """The protocol's problem `index` of a window for this hotkey, rendered and ready to generate."""
    seed = derive_env_seed(hotkey, window.block_hash, index)
    problem = problem_for_seed(seed)
    return ProblemTask(
        window=window,
        index=index,
        seed=seed,
        problem=problem,
        prompt_ids=prompt_ids(tokenizer, problem),
        targets=lengths.targets(seed, PROFILE.rollouts_per_problem),
        block=block,
        attempt=attempt,
        hotkey=hotkey,
    )


@dataclass
class ProvedGroup:
    """A group after generation and the proof forward."""

    task: ProblemTask
    completions: list[list[int]]
    proofs: list[RolloutProof]
    generate_seconds: float
    proof_seconds: float


@dataclass
class SignedGroup:
    """A group ready for the window file, or dropped (records empty) with the reason."""

    task: ProblemTask
    records: list[dict]
    rewards: list[float]
    successes: list[bool]  # the validator's `success` (EOS included in the scored text)
    solved: list[bool]  # the answer satisfies the formula (EOS stripped): what a person calls success
    completion_tokens: int
    generate_seconds: float
    proof_seconds: float
    sign_seconds: float
    dropped: str | None = None
    done: float = field(default_factory=time.perf_counter)

    @property
    def rollouts(self) -> int:
        return len(self.records)
