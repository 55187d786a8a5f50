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


def vocab_topk(x: torch.Tensor, k: int, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` over the last dimension (values descending, their indices), in two stages where the
    row splits into `chunks` equal pieces: the top k of each piece, then the top k of those.

    The k largest of a row are among the k largest of the piece each lies in, so the values are
    torch.topk's (which of several equal values is taken may differ; sampling does not care). One
    top-k over a 151,936-wide row is a multi-block radix select: at 512 rows it took 1.0 ms of a
    7.7-ms decode step on an H200 (bench/results/h200-2026-12-02/), and pieces of a few thousand are
    each one block's work.
    """
    n = x.shape[-1]
    if chunks is None:
        chunks = vocab_topk_chunks(n, k)
    if chunks <= 1:
        return torch.topk(x, k, dim=-1)
    rows = x.shape[:-1]
    piece = n // chunks
    values, indices = torch.topk(x.reshape(*rows, chunks, piece), k, dim=-1, sorted=False)
    offsets = torch.arange(chunks, device=x.device).mul_(piece)[:, None]
    values, best = torch.topk(values.reshape(*rows, chunks * k), k, dim=-1)
    indices = (indices + offsets).reshape(*rows, chunks * k).gather(-1, best)
    return values, indices


TOPK_PIECE = 4096  # the piece length aimed at: most of the two-stage gain with few candidates (sampler_probe.py)


def vocab_topk_chunks(n: int, k: int) -> int:
    """How many equal pieces a row of `n` is cut into for `vocab_topk`: the divisor of n whose pieces come closest to
    TOPK_PIECE while each holds at least 8k values (1: no cut, where no divisor fits)."""
    fits = [c for c in range(2, n // (8 * k) + 1) if n % c == 0]
    return min(fits, key=lambda c: abs(n // c - TOPK_PIECE)) if fits else 1


def sample_top_k_top_p(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       noise: torch.Tensor) -> torch.Tensor:
    """One token per row from the temperature, top-k then top-p filtered distribution.

    `noise` is Exp(1) of shape [rows, top_k], drawn by the caller so that the random stream lives
    outside compiled code.
    """
    values, indices = vocab_topk(logits / temperature, top_k)  # descending
    ascending = values.flip(-1)
    cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p)
    remove[:, -1] = False  # the most likely token always stays
    ascending = ascending.masked_fill(remove, float("-inf"))
    probs = torch.softmax(ascending, dim=-1)
    choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
    return indices.flip(-1).gather(1, choice).squeeze(1)
