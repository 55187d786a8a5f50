"""Llama 2 and 3, and Mistral (Llama's layer under another name): the shared decoder (decoder.py) without
q/k/v biases, often with an untied head (Llama-3-8B) and Llama 3's rope scaling, which transformers' own
rotary module computes (`rope_type` 'llama3'), so the table is the validator's.

Mistral runs here only without a sliding window: with one set, transformers passes it to the attention
and builds its mask another way, so whether the validator's attention would still round as our causal
call does is not measured.
"""

from __future__ import annotations

from grail_pipeline.inference.models.decoder import unsupported_layer

NAME = "Llama"
MODEL_TYPES = ("llama", "mistral")


def unsupported(config) -> str | None:
    """Why this family cannot run a transformers config (None: it can); reads the config only."""
    if config.model_type not in MODEL_TYPES:
        return f"model type '{config.model_type}'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biases on the attention or MLP projections"
    if getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    return unsupported_layer(config)
