"""The deadline plan: the protocol's deadline, and admission from measured latency, write time and upload size."""

from __future__ import annotations

import pytest

from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import FIRST_BYTES_PER_ROLLOUT, UPLOAD_MBIT_S, WRITE_FLOOR_S, DeadlinePlan
from grail_pipeline.protocol.records import ROW_GROUP_ROWS


class FakeTime:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def plan_for(upload: float | None = 0.0, margin: float = 1.0) -> tuple[DeadlinePlan, FakeTime]:
    t = FakeTime()
    clock = WindowClock(block_time_s=6.0, window_blocks=30, genesis=0.0, time_fn=t)
    return DeadlinePlan(clock.time_of_block, 30, upload_allowance_s=upload, margin_s=margin, time_fn=t), t


def test_the_deadline_is_the_next_windows_first_block_minus_four_seconds() -> None:
    plan, _ = plan_for()
    times = plan.times(30)
    assert (times.opens, times.ends, times.deadline) == (180.0, 360.0, 356.0)


def test_admission_stops_one_latency_before_the_cut() -> None:
    plan, t = plan_for(upload=10.0, margin=1.0)
    # before anything finished, the oldest group in flight is the latency estimate
    plan.admitted("a", 0.0)
    t.now = 12.0
    assert plan.latency() == 12.0
    plan.finished("a", 12.0)
    for i in range(20):  # steady state: 8 s per group
        plan.admitted(i, 20.0 + i)
        plan.finished(i, 28.0 + i)
    t.now = 60.0
    assert plan.latency() == 8.0  # the 95th percentile of 12 and twenty 8s
    cut = 176.0 - 10.0 - WRITE_FLOOR_S - 1.0
    assert plan.cut(0) == pytest.approx(cut)
    plan.admitted("busy", cut - 8.0)  # just admitted: the quantile rules
    assert plan.admit(0, now=cut - 8.0) and not plan.admit(0, now=cut - 7.9)
    plan.finished("busy", cut - 7.9)  # an idle pipeline admits one more up to the cut: it measures anew
    assert plan.admit(0, now=cut - 0.1) and not plan.admit(0, now=cut)


def test_a_group_stuck_in_flight_stretches_the_latency() -> None:
    plan, t = plan_for()
    for i in range(10):
        plan.admitted(i, float(i))
        plan.finished(i, i + 2.0)
    plan.admitted("stuck", 20.0)
    t.now = 50.0
    assert plan.latency() == 30.0
    plan.forget("stuck")
    assert plan.latency() == 2.0


def test_the_upload_allowance_follows_the_expected_file() -> None:
    plan, _ = plan_for(upload=None)
    assert plan.upload_allowance(0) == 0.0  # no rate yet: nothing expected
    plan.rate(40.0)  # rollouts per second
    expected = 40.0 * 176.0
    assert plan.expected_rollouts(0) == pytest.approx(expected)
    assert plan.upload_allowance(0) == pytest.approx(expected * FIRST_BYTES_PER_ROLLOUT * 8 / (UPLOAD_MBIT_S * 1e6))
    plan.wrote(rollouts=1000, seconds=2.0, nbytes=30_000_000)  # 30 KB per rollout, 2 ms per rollout to write
    assert plan.upload_allowance(0) == pytest.approx(expected * 30_000 * 8 / (UPLOAD_MBIT_S * 1e6))
    assert plan.write_time(0) == pytest.approx(expected * 0.002)
    # a file written as it grew: its write encoded the last 600 rows (1 ms each), the next one encodes a row
    # group at most; a tail of a few rows (mostly footer and fsync) teaches no cost per row
    plan.wrote(rollouts=7000, seconds=0.6, nbytes=210_000_000, rows_at_write=600)
    assert plan.write_time(0) == pytest.approx(ROW_GROUP_ROWS * 0.001)
    plan.wrote(rollouts=7000, seconds=0.3, nbytes=210_000_000, rows_at_write=16)
    assert plan.write_time(0) == pytest.approx(ROW_GROUP_ROWS * 0.001)
    plan.wrote(rollouts=300, seconds=0.9, nbytes=9_000_000)  # a whole file (a fleet's leader, a short window)
    assert plan.write_time(0) == pytest.approx(expected * 0.003)
    fixed, _ = plan_for(upload=25.0)
    fixed.rate(40.0)
    assert fixed.upload_allowance(0) == 25.0


def test_latencies_older_than_a_window_are_forgotten() -> None:
    plan, t = plan_for()
    plan.admitted("cold", 0.0)
    plan.finished("cold", 25.0)  # a cold start
    for i in range(5):
        plan.admitted(i, 100.0 + i)
        plan.finished(i, 102.0 + i)
    t.now = 110.0
    assert plan.latency() == 25.0  # still within the last window (180 s)
    t.now = 206.0
    assert plan.latency() == 2.0  # the cold start is more than a window old
    t.now = 400.0
    assert plan.latency() == 0.0  # nothing recent, nothing in flight
