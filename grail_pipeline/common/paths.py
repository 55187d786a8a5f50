"""Where grail-pipeline keeps what outlives a process: built tokenizers, compiled kernels, window files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_CACHE = "GRAIL_PIPELINE_CACHE"


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """`$GRAIL_PIPELINE_CACHE`, or ~/.cache/grail-pipeline."""
    return Path(env.get(ENV_CACHE, "").strip() or "~/.cache/grail-pipeline").expanduser()
