"""Scoring-window arithmetic: 30 blocks of 12 s, the 5120-rollout cap and the fourth-power score."""

from __future__ import annotations

import pytest

from grail_pipeline.tools.projection import WindowSpec


def test_protocol_window() -> None:
    spec = WindowSpec()
    assert (spec.blocks, spec.block_time_s, spec.cap, spec.exponent) == (30, 12.0, 5120, 4.0)
    assert spec.seconds == 360.0
    assert spec.describe() == "30 blocks × 12 s = 360 s"
    assert spec.cap_rate() == pytest.approx(14.2222, abs=1e-4)


def test_rollouts_per_window() -> None:
    spec = WindowSpec()
    assert spec.rollouts_per_window(0.0) == 0.0
    assert spec.rollouts_per_window(10.0) == 3600.0
    assert spec.rollouts_per_window(spec.cap_rate()) == pytest.approx(5120)


def test_score_factor() -> None:
    spec = WindowSpec()
    assert spec.score_factor(0) == 0.0
    assert spec.score_factor(5120) == 1.0
    assert spec.score_factor(2560) == pytest.approx(0.0625)  # (1/2) ** 4
    assert spec.score_factor(1280) == pytest.approx(1 / 256)
    assert spec.score_factor(20_000) == 1.0  # clipped at the cap
    assert spec.score_factor(spec.rollouts_per_window(0.64 * 4)) == pytest.approx((921.6 / 5120) ** 4)


def test_other_windows() -> None:
    guide = WindowSpec(blocks=50, block_time_s=12)
    assert guide.seconds == 600 and guide.describe() == "50 blocks × 12 s = 600 s"
    assert guide.cap_rate() == pytest.approx(5120 / 600)
    fast = WindowSpec(blocks=30, block_time_s=0.2)
    assert fast.describe() == "30 blocks × 0.2 s = 6 s" and fast.seconds == pytest.approx(6.0)
    assert WindowSpec(cap=100, exponent=2).score_factor(50) == pytest.approx(0.25)


def test_on_time_rollouts_per_window() -> None:
    spec = WindowSpec()
    assert spec.on_time_per_window(0.0, 512) == 0.0
    # 45 rollouts/s, 576 in flight: 12.8 s of drain; 4 s of slack; the upload of the file at 100 Mbit/s
    expected = 45 * (360 - 4 - 576 / 45) / (1 + 45 * 40_000 * 8 / 100e6)
    assert spec.on_time_per_window(45.0, 576) == pytest.approx(expected)
    assert spec.on_time_per_window(45.0, 576) < spec.rollouts_per_window(45.0)
    assert spec.on_time_per_window(45.0, 576, bytes_per_rollout=0) == pytest.approx(45 * (360 - 4 - 576 / 45))


def test_hotkeys_at_cap_counts_whole_caps_on_time() -> None:
    spec = WindowSpec()
    on_time = spec.on_time_per_window(47.8, 576)  # the H200's W1 rate at 512 slots: over two caps
    assert 2 * 5120 < on_time < 3 * 5120 and spec.hotkeys_at_cap(on_time) == 2
    assert spec.hotkeys_at_cap(5119.9) == 0 and spec.hotkeys_at_cap(5120) == 1
