"""The flags and value checks the commands share, kept free of torch so that `--help` answers at once.

Anything two commands accept means the same in both: the runtime flags (model, engine, device, lengths,
prompt limit), the batch-size list and the number types argparse checks.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Callable

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.model_ref import DUMMY_PREFIX, PRESETS
from grail_pipeline.mining.lengths import W1_SPEC
from grail_pipeline.mining.rules import KV_CACHE_AUTO, KV_CACHE_FULL, parse_whole
from grail_pipeline.protocol.profile import INT64_MAX, INT64_MIN, PROFILE

ENGINES = ("auto", "hf", "fast")
DEFAULT_BATCH_SIZES = {"hf": [4], "fast": [256]}
FULL_BATCH_SIZES = {"hf": [1, 2, 4, 8, 16], "fast": [64, 128, 256, 512]}


class HelpFormatter(argparse.HelpFormatter):
    """Help wrapped at spaces only, never inside a flag name, a path or a hyphenated word (argparse's default broke
    `--no-redis-app` and `grail-pipeline` across lines), with the help column a little further right."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                             break_long_words=False)


class RawDescriptionHelpFormatter(HelpFormatter):
    """HelpFormatter with the description and epilog kept as written (verify's table of checks)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


MODEL_HELP = ("hub id, local checkpoint directory, or a random-initialised preset: "
              + ", ".join(DUMMY_PREFIX + name for name in PRESETS))
ENGINE_HELP = ("hf = transformers generate (the reference method); fast = our continuous-batching engine (CUDA "
               "graphs on a GPU; it runs on the CPU too, eagerly); auto = fast on a GPU, hf on the CPU")


def add_runtime_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The flags every command that runs the pipeline shares."""
    parser.add_argument("--model", default=default_model, help=f"{MODEL_HELP} (default {default_model})")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-new-tokens", type=positive_int, default=PROFILE.sampling.max_new_tokens, metavar="N",
                        help=f"longest completion in tokens (default {PROFILE.sampling.max_new_tokens}, the "
                             "protocol's)")
    parser.add_argument("--length-profile", default=None,
                        help=f"lognormal:MEDIAN:SIGMA:MIN:MAX, fixed:N or natural; default {W1_SPEC} "
                             "(the W1 workload) for dummy models, natural for real weights")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=512, metavar="N",
                        help="longest prompt the fast engine reserves KV cache for (default 512)")
    parser.add_argument("--kv-cache-gb", type=kv_cache_size, default=None, metavar="N|auto|full",
                        help="the fast engine's KV cache, held by slots as their sequences grow (pages of 64 "
                             "positions). auto (default): per batch size, what the workload's prompts and lengths "
                             "hold, with a margin (natural lengths: full); full: every slot's longest sequence, "
                             "which never runs out; N: N GB. Less holds more slots in the same memory; a group that "
                             "finds no page is preempted and run again")
    parser.add_argument("--memory-gb", type=positive_float, default=None, metavar="N",
                        help="cap this process's GPU memory at N GB (torch's per-process memory fraction, set before "
                             "anything allocates), so a big card rehearses a smaller one (e.g. 24 on an H100); on the "
                             "CPU nothing is capped (calibrate: the total memory to budget from)")


def apply_memory_cap(args: argparse.Namespace) -> str | None:
    """`--memory-gb` on the GPU: the cap, set now (call it before the model loads). On the CPU there is no
    GPU memory to cap: the flag is ignored and the note to print about it is returned."""
    if args.memory_gb is None:
        return None
    from grail_pipeline.inference.loading import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda":
        return f"--memory-gb {args.memory_gb:g}: no GPU, nothing to cap (ignored on the CPU)"
    from grail_pipeline.inference.devices import cap_process_memory

    cap_process_memory(device, args.memory_gb)
    return None


def whole_int(text: str) -> int:
    """A whole number in ASCII digits within int64 (rules.parse_whole says why); argparse's own `int` accepts
    '١٢' and numbers no Parquet column or seed holds."""
    value = parse_whole(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number")
    if not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"'{text}' is out of range (at most {INT64_MAX})")
    return value


def positive_int(text: str) -> int:
    value = whole_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def nonnegative_int(text: str) -> int:
    value = whole_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' cannot be negative")
    return value


def finite_float(text: str) -> float:
    """A number; inf and nan are refused here (an infinite block time or drain broke the clock and PM2's file)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def kv_cache_size(text: str) -> float | str:
    """--kv-cache-gb: a positive number of GB, `auto` (sized per batch size from the workload, kv_sizing.py) or
    `full` (every slot's longest sequence)."""
    if text in (KV_CACHE_AUTO, KV_CACHE_FULL):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a number of GB, auto or full)") from None


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' cannot be negative")
    return value


def path_or_default(flag: str, default: str) -> Callable[[str], str | None]:
    """The type of a path flag with a default: '' (what `--out-dir "$UNSET"` passes) means the default, said in one
    warning line, instead of falling back (or writing to the current directory) without a word."""
    def parse(text: str) -> str | None:
        if text.strip():
            return text
        print(f"grail-pipeline: warning: {flag} is empty (an unset shell variable?): {default}", file=sys.stderr)
        return None
    return parse


def parse_batch_sizes(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers."""
    sizes = []
    for part in text.split(","):
        value = parse_whole(part)
        if value is None or value < 1:
            raise UserError(f"batch sizes must be positive whole numbers, got '{part.strip() or text}'")
        sizes.append(value)
    return sizes
