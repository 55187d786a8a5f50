"""The reference engine: transformers `generate` on batches of identical prompts, one group at a time.

This is how the public miner generates (DESIGN.md §3, the "seed method"), kept as the baseline for
every speed figure.
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from grail_pipeline.inference.engine import GroupRequest, GroupResult, OneGroupEngine, SamplingParams
from grail_pipeline.inference.loading import LoadedModel


class TargetLengthProcessor(LogitsProcessor):
    """Masks EOS before each row's target length and forces it at the target (W1 workload)."""

    def __init__(self, targets: list[int | None], prompt_length: int, eos_token_id: int) -> None:
        self.prompt_length = prompt_length
        self.eos = eos_token_id
        self.targets = targets

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length  # tokens generated so far
        for row, target in enumerate(self.targets):
            if target is None:
                continue
            if step < target - 1:
                scores[row, self.eos] = float("-inf")
            elif step == target - 1:
                scores[row, :] = float("-inf")
                scores[row, self.eos] = 0.0
        return scores


def cut_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """A completion ends at its first EOS (kept) or at max_new_tokens; the rest is padding."""
    try:
        return tokens[: tokens.index(eos_token_id) + 1]
    except ValueError:
        return tokens


class HFEngine(OneGroupEngine):
    """`model.generate` with B identical prompts per call (B = batch size, at most the group size)."""

    name = "hf"

    def __init__(self, loaded: LoadedModel, sampling: SamplingParams, batch_size: int) -> None:
        super().__init__()
        self.loaded = loaded
        self.sampling = sampling
        self.batch_size = batch_size

    def generate_group(self, request: GroupRequest) -> GroupResult:
        start = time.perf_counter()
        completions: list[list[int]] = []
        for first in range(0, request.num_samples, self.batch_size):
            completions.extend(self._generate_batch(request, request.targets[first:first + self.batch_size]))
        return GroupResult(request=request, completions=completions, seconds=time.perf_counter() - start)

    @torch.inference_mode()
    def _generate_batch(self, request: GroupRequest, targets: list[int | None]) -> list[list[int]]:
        s = self.sampling
        device = self.loaded.device
        prompt = torch.tensor([request.prompt_ids] * len(targets), dtype=torch.long, device=device)
        max_new = s.max_new_tokens
        if all(t is not None for t in targets):
            max_new = min(max_new, max(t for t in targets if t is not None))
        processors = LogitsProcessorList([TargetLengthProcessor(targets, prompt.shape[1], s.eos_token_id)])
        t0 = time.perf_counter()
        out = self.loaded.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new,
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            pad_token_id=s.pad_token_id,
            eos_token_id=s.eos_token_id,
            logits_processor=processors,
            return_dict_in_generate=True,
        )
        new = out.sequences[:, prompt.shape[1]:].tolist()
        completions = [cut_at_eos(row, s.eos_token_id) for row in new]
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += len(new[0]) if new else 0
        self.stats.generated_tokens += sum(len(c) for c in completions)
        self.stats.occupied_slot_steps += sum(len(c) for c in completions)
        self.stats.slot_steps += len(new) * (len(new[0]) if new else 0)
        return completions
