"""Qwen2 (Qwen2.5): the shared decoder (decoder.py) with biases on the q/k/v projections, read from the
modules; the Qwen2.5 checkpoints tie the head to the embeddings."""

from __future__ import annotations

from grail_pipeline.inference.models.decoder import unsupported_layer

NAME = "Qwen2"
MODEL_TYPES = ("qwen2",)


def unsupported(config) -> str | None:
    """Why this family cannot run a transformers config (None: it can); reads the config only."""
    if config.model_type not in MODEL_TYPES:
        return f"model type '{config.model_type}'"
    return unsupported_layer(config)
