"""Proof data for finished rollouts: last-layer sketches at every position and completion logprobs.

Two ways to get them. `ReferenceProver` is the public miner's method (one unbatched forward per rollout,
full logits copied to the CPU), kept as the baseline. `BatchedProver` runs right-padded batches with a
plain causal mask, so every real position sees exactly the context it sees alone, and keeps the logits
on the device; its pass rate against the validator's method is measured, not assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grail_pipeline.model import LoadedModel
from grail_pipeline.proof import r_vec, sketch_hidden
from grail_pipeline.verifier import validator_forward


@dataclass
class RolloutProof:
    """What a rollout's commit needs from the model, on the CPU."""

    sketches: torch.Tensor  # int64 [L]
    indices: torch.Tensor  # int64 [L, TOPK], top-k order
    token_logprobs: list[float]  # 0.0 for prompt positions, then one per completion token


class Prover(ABC):
    name: str = "base"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @abstractmethod
    def prove(self, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
              randomness_hex: str) -> list[RolloutProof]:
        """Proofs for one group, in the order of `completions`."""


class ReferenceProver(Prover):
    """One unbatched forward per rollout, logits copied to the CPU (the public miner's method)."""

    name = "reference"

    @torch.inference_mode()
    def prove(self, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
              randomness_hex: str) -> list[RolloutProof]:
        r = r_vec(randomness_hex).to(self.loaded.device)
        proofs = []
        prompt_len = len(prompt_ids)
        for completion in completions:
            tokens = list(prompt_ids) + list(completion)
            hidden, logits = validator_forward(self.loaded.model, tokens)
            sketches, indices = sketch_hidden(hidden, r)
            cpu_logits = logits.to("cpu")
            logprobs = torch.log_softmax(cpu_logits[prompt_len - 1:-1], dim=-1)
            chosen = torch.tensor(completion, dtype=torch.long).unsqueeze(1)
            lps = logprobs.gather(1, chosen).squeeze(1).float().tolist()
            proofs.append(RolloutProof(sketches.cpu(), indices.cpu(), [0.0] * prompt_len + lps))
        return proofs


class BatchedProver(Prover):
    """Right-padded batches of whole rollouts; commitments and logprobs computed on the device."""

    name = "batched"

    def __init__(self, loaded: LoadedModel, max_batch_tokens: int = 16384, logit_chunk: int = 2048) -> None:
        super().__init__(loaded)
        self.max_batch_tokens = max_batch_tokens
        self.logit_chunk = logit_chunk
        self.decoder = loaded.model.get_decoder()
        self.lm_head = loaded.model.get_output_embeddings()

    @torch.inference_mode()
    def prove(self, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
              randomness_hex: str) -> list[RolloutProof]:
        r = r_vec(randomness_hex).to(self.loaded.device)
        sequences = [list(prompt_ids) + list(c) for c in completions]
        proofs: list[RolloutProof | None] = [None] * len(sequences)
        for batch in self._batches(sequences):
            for i, proof in zip(batch, self._prove_batch([sequences[i] for i in batch], len(prompt_ids), r)):
                proofs[i] = proof
        return [p for p in proofs if p is not None]

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices grouped longest first so that padding stays small and each batch fits the budget."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batches: list[list[int]] = []
        for i in order:
            width = len(sequences[batches[-1][0]]) if batches else 0
            if batches and (len(batches[-1]) + 1) * width <= self.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _prove_batch(self, sequences: list[list[int]], prompt_len: int, r: torch.Tensor) -> list[RolloutProof]:
        device = self.loaded.device
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), 0, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device, non_blocking=True)
        hidden = self.decoder(input_ids=ids).last_hidden_state  # causal only: padding sits after every real token
        valid = torch.zeros((len(sequences), width), dtype=torch.bool)
        for row, n in enumerate(lengths):
            valid[row, :n] = True
        valid = valid.to(device, non_blocking=True)
        sketches, indices = sketch_hidden(hidden[valid], r)
        logprobs = self._completion_logprobs(hidden, ids, lengths, prompt_len)
        sketches, indices, logprobs = sketches.cpu(), indices.cpu(), logprobs.cpu()
        proofs, pos, lp_pos = [], 0, 0
        for n in lengths:
            c = n - prompt_len
            proofs.append(RolloutProof(
                sketches[pos:pos + n], indices[pos:pos + n],
                [0.0] * prompt_len + logprobs[lp_pos:lp_pos + c].tolist(),
            ))
            pos += n
            lp_pos += c
        return proofs

    def _completion_logprobs(self, hidden: torch.Tensor, ids: torch.Tensor, lengths: list[int],
                             prompt_len: int) -> torch.Tensor:
        """log_softmax(logits[p-1])[token_p] for every completion token, in chunks, on the device."""
        rows = torch.cat([torch.full((n - prompt_len,), b, dtype=torch.long) for b, n in enumerate(lengths)])
        cols = torch.cat([torch.arange(prompt_len, n, dtype=torch.long) for n in lengths])
        rows, cols = rows.to(ids.device), cols.to(ids.device)
        states = hidden[rows, cols - 1]
        targets = ids[rows, cols]
        out = torch.empty(len(targets), dtype=torch.float32, device=ids.device)
        for start in range(0, len(targets), self.logit_chunk):
            sl = slice(start, start + self.logit_chunk)
            logits = self.lm_head(states[sl]).float()
            out[sl] = logits.gather(1, targets[sl, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return out
