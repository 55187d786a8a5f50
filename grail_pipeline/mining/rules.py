"""The values the commands share, each checked by one function, so that what `emit-pm2` writes is what `mine` accepts.

Why one place: a new operator's 170 bad inputs (issue #16) found emit-pm2 rendering apps that `mine`
refused at start (PM2 then crash-looped them), and values nobody bounded (an infinite block time, a
genesis in milliseconds, a batch of 10^12, 10^8 new tokens) ending in tracebacks or running silently
wrong. Flags, environment variables and calibration fields all go through these functions; a miss is
one UserError line naming the value. Free of torch: `--help` and `emit-pm2` import it.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path

from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import not_a_regular_file
from grail_pipeline.inference.model_ref import PRESETS, parse_model_ref
from grail_pipeline.mining.lengths import W1_SPEC, LengthProfile, parse_length_profile
from grail_pipeline.protocol.profile import INT64_MAX, INT64_MIN, PROFILE

# a block shorter than this turns the clock's block numbers into noise; longer than an hour is a typo
# (a 30-block window would take more than a day)
MIN_BLOCK_TIME_S = 0.01
MAX_BLOCK_TIME_S = 3600.0
MAX_DRAIN_S = 3600.0  # ten windows; PM2's kill_timeout is this plus a margin, in milliseconds
MAX_GENESIS_AHEAD_S = 86400.0  # more than a day ahead is a mistake (milliseconds for seconds, say)
HF_MAX_BATCH = PROFILE.rollouts_per_problem  # hf generates one problem's rollouts per call (the upstream miner caps it too)
FAST_MIN_SLOTS = PROFILE.rollouts_per_problem  # a slot per rollout of one problem at least
FAST_MAX_SLOTS = 4096
MAX_WINDOW_BLOCKS = 7200  # a day of 12-s blocks; the protocol's window is 30
KV_CACHE_AUTO = "auto"  # --kv-cache-gb sized per batch size from the workload (mining/kv_sizing.py); the fast engine's default
KV_CACHE_FULL = "full"  # --kv-cache-gb for every slot's longest sequence (never runs out, never preempts)
_WHOLE = re.compile(r"[+-]?[0-9]+")


def parse_whole(text: str) -> int | None:
    """`text` as a whole number in ASCII digits (spaces around allowed), else None.

    The one rule for every whole number a user types (flags, environment, lists): `str.isdigit()` accepts
    '²' and '①', which int() then refuses with a traceback; int() itself accepts other scripts' digits and
    '1_000'. Neither is what anyone means by a GPU index or a batch size. More than 40 digits read as ±10^40,
    beyond every range here (int() itself refuses more than 4300 digits with a ValueError)."""
    text = text.strip()
    if not _WHOLE.fullmatch(text):
        return None
    if len(text.lstrip("+-")) > 40:
        return -(10**40) if text.startswith("-") else 10**40
    return int(text)


def whole_number(text: str, name: str, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int:
    """A whole number in [minimum, maximum] (int64 unless said otherwise), or one UserError line naming it."""
    value = parse_whole(text)
    if value is None:
        raise UserError(f"{name}={text!r} is not a whole number")
    if not minimum <= value <= maximum:
        raise UserError(f"{name} {value} must be between {minimum} and {maximum}")
    return value


def check_window_blocks(value: int, name: str = "--window-blocks") -> int:
    """Blocks per simulated window: 1 up to a day of blocks (10^12 is a typo; no window would ever end)."""
    if not 1 <= value <= MAX_WINDOW_BLOCKS:
        raise UserError(f"{name} {value} must be between 1 and {MAX_WINDOW_BLOCKS} (the protocol's window is "
                        f"{PROFILE.window_length_blocks} blocks)")
    return value


def check_upload_allowance(value: float | None, window_blocks: int, block_time_s: float) -> float | None:
    """Seconds reserved before a window's deadline to upload its file: less than the window itself, or no
    problem could ever be admitted and every window would be empty without a word."""
    window_s = window_blocks * block_time_s
    if value is not None and value >= window_s:
        raise UserError(f"--upload-allowance {value:g} s is not less than the window's {window_s:g} s "
                        f"({window_blocks} blocks x {block_time_s:g} s): no problem could ever be admitted")
    return value


def check_block_time(value: float, name: str = "--block-time") -> float:
    """Seconds per simulated block; an infinite one keeps the chain at block 0 for ever."""
    if not (math.isfinite(value) and MIN_BLOCK_TIME_S <= value <= MAX_BLOCK_TIME_S):
        raise UserError(f"{name} {value:g} must be between {MIN_BLOCK_TIME_S:g} and {MAX_BLOCK_TIME_S:g} seconds")
    return value


def check_drain_timeout(value: float, name: str = "--drain-timeout") -> float:
    if not (math.isfinite(value) and 0 < value <= MAX_DRAIN_S):
        raise UserError(f"{name} {value:g} must be more than 0 and at most {MAX_DRAIN_S:g} seconds")
    return value


def check_genesis(value: float, now: float, name: str = "--genesis") -> float:
    """Unix time of simulated block 0: a finite time in seconds, not more than a day ahead of `now`."""
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name} {value:g} must be a unix time in seconds (e.g. $(date +%s))")
    if value > now + MAX_GENESIS_AHEAD_S:
        raise UserError(f"{name} {value:.0f} is {(value - now) / 86400:.3g} days ahead of now ({now:.0f}); "
                        f"it takes seconds, not milliseconds (e.g. $(date +%s))")
    return value


def genesis_warning(value: float, now: float, name: str = "--genesis") -> str | None:
    """What to tell the operator when block 0 is still ahead: the chain stays at block 0 until then."""
    if value <= now:
        return None
    return f"{name} is {value - now:.0f} s ahead of now: the simulated chain stays at block 0 (window 0) until then"


def check_safety_blocks(value: int, window_blocks: int, name: str = "--safety-blocks") -> int:
    """Blocks before a window's end at which no new problem starts: 0 (none) up to the window less one."""
    if not 0 <= value < window_blocks:
        raise UserError(f"{name} {value} must be at least 0 and below the window's {window_blocks} blocks")
    return value


def check_batch_size(engine_kind: str, batch_size: int, name: str = "batch size") -> int:
    """hf: prompts per generate call, one problem's rollouts at most; fast: decode slots, at least that many."""
    if engine_kind == "hf" and not 1 <= batch_size <= HF_MAX_BATCH:
        raise UserError(f"the hf engine's {name} is its generate batch, 1 to {HF_MAX_BATCH} (one problem's "
                        f"rollouts); got {batch_size}")
    if engine_kind == "fast" and not FAST_MIN_SLOTS <= batch_size <= FAST_MAX_SLOTS:
        raise UserError(f"the fast engine's {name} is its number of decode slots and must be at least "
                        f"{FAST_MIN_SLOTS} (one problem's rollouts) and at most {FAST_MAX_SLOTS}; got {batch_size}")
    return batch_size


def length_profile_for(model: str, spec: str | None) -> LengthProfile:
    """W1 lengths for dummy models (they never stop by themselves), the model's own otherwise."""
    if spec is None:
        spec = W1_SPEC if parse_model_ref(model).is_dummy else "natural"
    return parse_length_profile(spec)


def checked_length_profile(model: str, spec: str | None, max_new_tokens: int) -> LengthProfile:
    """The run's length profile; one that draws more tokens than --max-new-tokens allows is a user error."""
    lengths = length_profile_for(model, spec)
    longest = lengths.longest
    if longest is not None and longest > max_new_tokens:
        raise UserError(f"length profile '{lengths.spec}' draws up to {longest} tokens, "
                        f"more than --max-new-tokens {max_new_tokens}")
    most = min(longest or max_new_tokens, max_new_tokens)
    if most < PROFILE.min_completion_tokens:  # each would be dropped and redrawn, and no window would hold a group
        source = f"length profile '{lengths.spec}'" if most == longest else "--max-new-tokens"
        raise UserError(f"{source} allows at most {most} tokens: every completion would be under the protocol's "
                        f"minimum of {PROFILE.min_completion_tokens}, and dropped")
    return lengths


def model_context(model: str) -> int | None:
    """The model's positions (max_position_embeddings), read without loading weights: a dummy preset's table,
    a checkpoint directory's config.json. None where it cannot be told here (a hub id: its loader says)."""
    ref = parse_model_ref(model)
    if ref.is_dummy:
        config: object = dict(PRESETS[ref.preset].config)
    elif ref.kind == "local":
        file = Path(ref.raw) / "config.json"
        try:
            if not_a_regular_file(file):  # a FIFO would block here for ever
                return None
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None  # not a checkpoint: the loader says so in its own line
    else:
        return None
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")  # a string there is the checkpoint rule's to refuse, not a crash here
    value = config.get("max_position_embeddings",
                       (text_config if isinstance(text_config, dict) else {}).get("max_position_embeddings"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_workload(model: str, spec: str | None, max_new_tokens: int, max_prompt_tokens: int) -> LengthProfile:
    """The model exists, the lengths parse and fit --max-new-tokens, and prompt plus completion fit its context."""
    lengths = checked_length_profile(model, spec, max_new_tokens)
    context = model_context(model)
    if context is not None and max_prompt_tokens + max_new_tokens > context:
        raise UserError(f"--max-prompt-tokens {max_prompt_tokens} + --max-new-tokens {max_new_tokens} do not fit "
                        f"the {context} positions of {model}")
    return lengths


def check_writable(path: str | os.PathLike[str], name: str) -> Path:
    """A file a command writes at its end is tried at its start: its folder is made and a probe written there (a
    byte, so that a full disk is found now, not after the run)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{name} {file} is a directory; give a file name")
    probe = file.parent / f".{file.name}.{uuid.uuid4().hex[:12]}.probe"
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(b"\0")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {name} {file} ({exc.strerror or exc})") from None
    return file
