"""What the daemon is told besides the model: the worker's slot, the chain's timing, where files go, limits.

Plain data, resolved and checked from flags and environment by the command line before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grail_pipeline.mining.chain import WorkerSlot

ENV_HOTKEYS = "GRAIL_HOTKEYS"  # several hotkeys from one engine: cold/hot,cold/hot (mining/hotkeys.py)


def wallet_names(hotkeys: str | None, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """`--hotkeys`, else GRAIL_HOTKEYS, as (cold, hot) names; [] for the one wallet of BT_WALLET_COLD/HOT. `mine`
    reads the hotkeys it mines here, and `fleet-status` the hotkeys whose fleets it shows, so the two agree."""
    text, name = hotkeys, "--hotkeys"
    if text is None:
        text, name = env.get(ENV_HOTKEYS, "").strip() or None, ENV_HOTKEYS
    from grail_pipeline.protocol.wallet import parse_wallet_names  # bittensor_wallet: not for --help

    return [] if text is None else parse_wallet_names(text, name)


@dataclass(frozen=True)
class MineSettings:
    """Everything the daemon needs besides the model, resolved from flags and environment."""

    worker: WorkerSlot
    block_time_s: float
    window_blocks: int
    safety_blocks: int
    run_seed: int
    genesis: float | None
    out_dir: Path
    status_file: Path
    drain_timeout_s: float
    verify_sample: int
    max_windows: int | None
    batch_size: int | None  # None: the engine's default
    warmup_problems: int
    pipeline_overrides: dict[str, int]
    upload_allowance_s: float | None = None  # None: the expected file's upload time (mining/deadline.py)
    redis_url: str | None = None  # GRAIL_REDIS_URL: a fleet of workers of one hotkey (mining/fleet_worker.py)
    target_rollouts: int | None = None  # per hotkey and window, at most (mining/fill.py); None: while the plan admits
    wallets: tuple[tuple[str, str], ...] = ()  # (cold, hot) names of several hotkeys on one engine; (): BT_WALLET_*

    @property
    def window_seconds(self) -> float:
        return self.window_blocks * self.block_time_s
