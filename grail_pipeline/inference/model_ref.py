"""What a `--model` value names: a random-initialised preset, a local directory, or a hub id.

Kept apart from model loading so that the tokenizer, the model and the PM2 renderer agree on one
parser, and so that a miss is always the same clear line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grail_pipeline.common.errors import UserError

DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class Preset:
    """A random-initialised model: its transformers model type and config fields (inference/loading.py
    builds the config). Each carries the exact architecture of the model it stands in for, so that speed
    and memory measured on it hold for the real weights."""

    model_type: str
    config: Mapping[str, object]


# what every Qwen2.5 checkpoint shares: the vocabulary (the real one, so the real tokenizer fits), the tied
# head, the norm epsilon, rotary base and the special tokens
_QWEN2_5 = dict(vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, use_sliding_window=False,
                bos_token_id=151643, eos_token_id=151645)

# Qwen3-4B-Instruct-2507's shared settings: the same vocabulary and special tokens as Qwen2.5, tied head,
# rotary base 5e6
_QWEN3 = dict(_QWEN2_5, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0}, attention_bias=False)

# Llama 3's layer settings (norm epsilon, rotary base 500000 with the llama3 rope scaling of Llama-3.1/3.2);
# the vocabulary and special token ids are Qwen's, not Llama's 128256, so that the project's built-in Qwen
# tokenizer fits: a stand-in for speed and memory, whose embedding and head are 151936 rows, not 128256
_LLAMA3 = dict(vocab_size=151936, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
               bos_token_id=151643, eos_token_id=151645)

PRESETS: dict[str, Preset] = {
    # Qwen2.5-3B-Instruct's architecture (the standard benchmark workload W1)
    "qwen2.5-3b": Preset("qwen2", dict(_QWEN2_5, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                       num_attention_heads=16, num_key_value_heads=2,
                                       max_position_embeddings=32768)),
    "qwen2.5-0.5b": Preset("qwen2", dict(_QWEN2_5, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768)),
    # Qwen3-4B-Instruct-2507's architecture (the fork's benchmark default): q/k norms, no q/k/v bias, head_dim
    # 128 where hidden / heads is 80
    "qwen3-4b": Preset("qwen3", dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     max_position_embeddings=262144)),
    # Llama-3.2-1B's architecture (tied head, as the 1B has) with Qwen's vocabulary (see _LLAMA3)
    "llama3-1b": Preset("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                      tie_word_embeddings=True, max_position_embeddings=131072)),
    # small enough for CPU tests
    "tiny": Preset("qwen2", dict(_QWEN2_5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
    # Qwen3's parts: q/k norms, and a head_dim (32) other than hidden / heads (16)
    "tiny-qwen3": Preset("qwen3", dict(_QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=4096)),
    # Llama 3's parts with the untied head of Llama-3-8B (llama3-1b ties it) and the llama3 rope scaling
    "tiny-llama": Preset("llama", dict(_LLAMA3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                       max_position_embeddings=131072)),
}


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
        if preset not in PRESETS:
            known = ", ".join(DUMMY_PREFIX + p for p in PRESETS)
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
    if ref.kind == "local":
        return UserError(f"cannot load the checkpoint '{ref.raw}' ({reason[:160]})")
    return UserError(
        f"cannot load model '{ref.raw}' ({reason[:160]}); it must be a local directory or a hub id "
        f"in the local Hugging Face cache; for a network-free run use --model dummy:qwen2.5-3b"
    )
