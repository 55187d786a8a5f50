"""What a `--model` value names: a random-initialised preset, a local directory, or a hub id.

Kept apart from model loading so that the tokenizer, the model and the PM2 renderer agree on one
parser, and so that a miss is always the same clear line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grail_pipeline.common.errors import UserError

DUMMY_PREFIX = "dummy:"
DUMMY_PRESETS = ("qwen2.5-3b", "qwen2.5-0.5b", "tiny")


@dataclass(frozen=True)
class ModelRef:
    """A parsed `--model` value."""

    raw: str
    kind: str  # "dummy", "local" or "hub"
    preset: str | None = None

    @property
    def is_dummy(self) -> bool:
        return self.kind == "dummy"


def parse_model_ref(value: str) -> ModelRef:
    """Parse a `--model` value; an unknown dummy preset or an empty value is a user error."""
    value = value.strip()
    if not value:
        raise UserError("--model is empty")
    if value.startswith(DUMMY_PREFIX):
        preset = value[len(DUMMY_PREFIX):]
        if preset not in DUMMY_PRESETS:
            known = ", ".join(DUMMY_PREFIX + p for p in DUMMY_PRESETS)
            raise UserError(f"unknown model preset '{value}' (known: {known})")
        return ModelRef(raw=value, kind="dummy", preset=preset)
    if Path(value).expanduser().is_dir():
        return ModelRef(raw=str(Path(value).expanduser()), kind="local")
    if value.startswith((".", "/", "~")):
        raise UserError(f"model directory '{value}' does not exist")
    return ModelRef(raw=value, kind="hub")


def unavailable(ref: ModelRef, exc: BaseException) -> UserError:
    """The one line for a model or tokenizer that cannot be loaded (no network, no cache, typo)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"cannot load model '{ref.raw}' ({reason[:160]}); it must be a local directory or a hub id "
        f"in the local Hugging Face cache; for a network-free run use --model dummy:qwen2.5-3b"
    )
