"""Token sampling on the device for many sequences at once, as transformers applies the miner's settings.

Order and semantics follow `generate(do_sample=True)`: repetition penalty over every token already in
the sequence (prompt included), then the target-length EOS mask (a custom processor runs before the
warpers), then temperature, top-k, top-p. The draw uses the exponential race (argmax p/E, E ~ Exp(1)),
which samples the same distribution as multinomial without a host synchronisation.
"""

from __future__ import annotations

import torch


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive, multiply negative logits of tokens already seen (transformers' rule)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_target_lengths(logits: torch.Tensor, generated: torch.Tensor, targets: torch.Tensor,
                         eos_token_id: int) -> torch.Tensor:
    """EOS is impossible before a row's target and certain at it; rows with target 0 are left alone."""
    has_target = targets > 0
    mask_eos = has_target & (generated < targets - 1)
    force_eos = has_target & (generated >= targets - 1)
    is_eos = torch.arange(logits.shape[-1], device=logits.device) == eos_token_id
    eos_value = torch.where(force_eos, torch.zeros_like(logits[:, eos_token_id]), logits[:, eos_token_id])
    eos_value = torch.where(mask_eos, torch.full_like(eos_value, float("-inf")), eos_value)
    logits = torch.where(force_eos[:, None], torch.full_like(logits, float("-inf")), logits)
    return torch.where(is_eos[None, :], eos_value[:, None], logits)


def sample_top_k_top_p(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       noise: torch.Tensor) -> torch.Tensor:
    """One token per row from the temperature, top-k then top-p filtered distribution.

    `noise` is Exp(1) of shape [rows, top_k], drawn by the caller so that the random stream lives
    outside compiled code.
    """
    values, indices = torch.topk(logits / temperature, top_k, dim=-1)  # descending (one stage: sampler_probe.py)
    ascending = values.flip(-1)
    cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p)
    remove[:, -1] = False  # the most likely token always stays
    ascending = ascending.masked_fill(remove, float("-inf"))
    probs = torch.softmax(ascending, dim=-1)
    choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
    return indices.flip(-1).gather(1, choice).squeeze(1)
