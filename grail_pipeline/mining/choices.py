"""A run's choices, made in one place before anything slow: the model and its checkpoint, the device, the
engine, the lengths and the workload's limits, as one value that the runtime and the commands read.

Following `mine`'s arguments through the code, they went down from mining/ into inference/ and back up six
times: the model reference was parsed five times (the rules' length default and context check, the engine
choice, the tokenizer, the weights), the device resolved in the preflight, in `Runtime.from_args` and in
`loading`, and the checkpoint's identity (source, commit name, window) was known only once the weights had
loaded, so a fleet refused a worker of another model after 22 s of loading it on the CPU. `resolve_choices`
makes each choice once, reading configs and metadata but no weights (a dummy preset's checkpoint is written
on first use, as its load would); every flag's mistake is one UserError line from here.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass

import torch

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.loading import (
    CheckpointSource,
    checkpoint_source,
    load_config,
    resolve_device,
    wants_multi_gpu,
)
from grail_pipeline.inference.models import family_for, why_not_fast
from grail_pipeline.mining.lengths import LengthProfile
from grail_pipeline.mining.rules import KV_CACHE_AUTO, KV_CACHE_FULL, check_batch_size, check_workload

log = logging.getLogger("grail_pipeline")


@dataclass(frozen=True)
class RunChoices:
    """What a run mines or measures with, resolved from its flags once (`resolve_choices`)."""

    model: str  # the --model value as given (a hub id, a checkpoint directory or a dummy preset)
    checkpoint: CheckpointSource  # what from_pretrained reads, the name every commit carries, its window
    device: torch.device
    engine_kind: str  # "hf" or "fast"
    lengths: LengthProfile
    max_new_tokens: int
    max_prompt_tokens: int
    kv_cache_gb: float | str | None = None  # the fast engine's KV cache: GB, "auto" (its default), "full"; None for hf
    shared_prompt_attention: bool = False  # the fast engine's decode reads a group's shared prompt pages once


def resolve_engine(kind: str, device: torch.device, model: str) -> str:
    """`auto` is the fast engine on a GPU and hf on the CPU; one model over several GPUs is hf only, and so is
    a model no family of the fast engine runs (inference/models/; read from its config, before any weights).
    `--engine fast` for such a model is a user error, `auto` falls back to hf and says why in one line."""
    spread = device.type == "cuda" and wants_multi_gpu()
    if kind == "auto":
        if device.type != "cuda" or spread:
            return "hf"
        why = why_not_fast(load_config(model))
        if why is not None:
            _say_once(f"--engine auto: using the hf engine, since {why}")
            return "hf"
        return "fast"
    if kind == "fast" and spread:
        raise UserError("GRAIL_MULTI_GPU=1 spreads one model over every GPU, and the fast engine runs on one: "
                        "use --engine hf, or one worker per GPU without GRAIL_MULTI_GPU")
    if kind == "fast":
        family_for(load_config(model))
    return kind


@functools.cache
def _say_once(line: str) -> None:
    """A warning logged once per process (a rotation resolves the engine again for each new architecture)."""
    log.warning("%s", line)


def resolve_choices(args: argparse.Namespace, batch_sizes: list[int] | None = None) -> RunChoices:
    """The run's choices from its flags (`model`, `device`, `engine`, `length_profile`, `max_new_tokens`,
    `max_prompt_tokens`), and `batch_sizes` checked against the engine: one UserError line before anything
    slow when any is wrong."""
    device = resolve_device(args.device)
    engine_kind = resolve_engine(args.engine, device, args.model)
    lengths = check_workload(args.model, args.length_profile, args.max_new_tokens, args.max_prompt_tokens)
    for size in batch_sizes or []:
        check_batch_size(engine_kind, size)
    kv_cache_gb = getattr(args, "kv_cache_gb", None)
    if kv_cache_gb is not None:
        check_kv_cache(args.model, device, engine_kind, kv_cache_gb, args.max_prompt_tokens, args.max_new_tokens)
    elif engine_kind == "fast":
        kv_cache_gb = KV_CACHE_AUTO  # the default: no preemption and no cost in speed on W1 or W2 (bench/NOTES.md v18)
    shared_prompt_attention = getattr(args, "shared_prompt_attention", False)
    if shared_prompt_attention and engine_kind != "fast":
        raise UserError("--shared-prompt-attention is the fast engine's decode attention; the hf engine has none")
    return RunChoices(model=args.model, checkpoint=checkpoint_source(args.model), device=device,
                      engine_kind=engine_kind, lengths=lengths, max_new_tokens=args.max_new_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, kv_cache_gb=kv_cache_gb,
                      shared_prompt_attention=shared_prompt_attention)


def check_kv_cache(model: str, device: torch.device, engine_kind: str, kv_cache_gb: float | str, max_prompt_tokens: int,
                   max_new_tokens: int) -> None:
    """`--kv-cache-gb` is the fast engine's, and must hold one group at its longest (from the config and the
    dtype the model will load in, before any weights)."""
    from grail_pipeline.inference.kv_cache import cache_pages, positions_per_slot
    from grail_pipeline.inference.loading import model_dtype
    from grail_pipeline.protocol.profile import PROFILE

    if engine_kind != "fast":
        raise UserError("--kv-cache-gb sizes the fast engine's KV cache; the hf engine has none to size")
    if kv_cache_gb in (KV_CACHE_AUTO, KV_CACHE_FULL):
        return  # auto: sized per batch size, never below one group at its longest (mining/kv_sizing.py)
    slots = PROFILE.rollouts_per_problem  # the check of any batch size: one group in its slots
    cache_pages(load_config(model), model_dtype(device).itemsize, slots,
                positions_per_slot(max_prompt_tokens, max_new_tokens), kv_cache_gb)
