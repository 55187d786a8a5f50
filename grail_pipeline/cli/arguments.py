"""The flags and value checks the commands share, kept free of torch so that `--help` answers at once.

Anything two commands accept means the same in both: the runtime flags (model, engine, device, lengths,
prompt limit), the batch-size list and the number types argparse checks.
"""

from __future__ import annotations

import argparse

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.lengths import W1_SPEC
from grail_pipeline.protocol.profile import PROFILE

ENGINES = ("auto", "hf", "fast")
DEFAULT_BATCH_SIZES = {"hf": [4], "fast": [256]}
FULL_BATCH_SIZES = {"hf": [1, 2, 4, 8, 16], "fast": [64, 128, 256, 512]}


def add_runtime_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The flags every command that runs the pipeline shares."""
    parser.add_argument("--model", default=default_model,
                        help="hub id, local directory, or dummy:qwen2.5-3b / dummy:qwen2.5-0.5b / dummy:tiny")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="hf = transformers generate (the reference method); fast = continuous batching "
                             "with CUDA graphs; auto = fast on a GPU, hf on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-new-tokens", type=positive_int, default=PROFILE.sampling.max_new_tokens)
    parser.add_argument("--length-profile", default=None,
                        help=f"lognormal:MEDIAN:SIGMA:MIN:MAX, fixed:N or natural; default {W1_SPEC} "
                             "(the W1 workload) for dummy models, natural for real weights")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=512,
                        help="longest prompt the fast engine reserves KV cache for")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def parse_batch_sizes(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"batch sizes must be positive whole numbers, got '{part or text}'")
        sizes.append(int(part))
    return sizes
