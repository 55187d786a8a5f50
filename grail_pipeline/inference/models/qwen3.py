"""Qwen3 (Qwen3-4B-Instruct-2507, the fork's benchmark default): the shared decoder (decoder.py) with an
RMSNorm over each head's queries and keys before the rotary embedding, no q/k/v biases, and a head_dim of
its own (128 where hidden / heads is 80). All three are read from the modules and the config."""

from __future__ import annotations

from grail_pipeline.inference.models.decoder import unsupported_layer

NAME = "Qwen3"
MODEL_TYPES = ("qwen3",)


def unsupported(config) -> str | None:
    """Why this family cannot run a transformers config (None: it can); reads the config only."""
    if config.model_type not in MODEL_TYPES:
        return f"model type '{config.model_type}'"
    if getattr(config, "attention_bias", False):
        return "biases on the attention projections"  # the o projection's too, which the engine does not add
    return unsupported_layer(config)
