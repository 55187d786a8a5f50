"""What a proof is: the jobs a prover takes, the proofs it gives back, and the interface every prover implements.

Plain data and the helpers that cut read-back tensors into proofs. No torch import at run time (the
annotations name tensors only): the pipeline's messages carry proofs without loading the model stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from grail_pipeline.inference.loading import LoadedModel


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class RolloutProof:
    """What a rollout's commit needs from the model, on the CPU."""

    sketches: torch.Tensor  # int64 [L]
    indices: torch.Tensor  # int64 [L, TOPK], top-k order
    token_logprobs: list[float]  # 0.0 for prompt positions, then one per completion token


@dataclass
class ProofJob:
    """One group to prove: its prompt, its completions and the window's proof randomness."""

    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]
    randomness_hex: str


@dataclass
class ProofRow:
    """One rollout as a whole sequence, and where its proof goes in the answer."""

    job: int
    index: int
    tokens: list[int]
    prompt_len: int


def place_rows(rows: Sequence[ProofRow], flat: Sequence[torch.Tensor], start: tuple[int, int],
               out: list[list[RolloutProof | None]]) -> tuple[int, int]:
    """Cut whole-sequence rows' proofs from read-back (sketches, indices, logprobs), beginning at `start`
    (position, logprob offsets), into `out[job][index]`; returns where the next proof begins."""
    sketches, indices, logprobs = flat
    pos, lp_pos = start
    for row in rows:
        n, c = len(row.tokens), len(row.tokens) - row.prompt_len
        out[row.job][row.index] = RolloutProof(sketches[pos:pos + n], indices[pos:pos + n],
                                               [0.0] * row.prompt_len + logprobs[lp_pos:lp_pos + c].tolist())
        pos += n
        lp_pos += c
    return pos, lp_pos


class Prover(ABC):
    name: str = "base"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @abstractmethod
    def prove_many(self, jobs: Sequence[ProofJob]) -> list[list[RolloutProof]]:
        """Proofs for several groups, each list in the order of that group's completions."""

    def prove(self, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
              randomness_hex: str) -> list[RolloutProof]:
        return self.prove_many([ProofJob(prompt_ids, completions, randomness_hex)])[0]
