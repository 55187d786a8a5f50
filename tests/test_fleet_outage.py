"""Joining a fleet, losing Redis and getting it back, and the fleet view, against a real redis-server."""

from __future__ import annotations

import logging
import socket
import time
import uuid

import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.fleet.connection import connect, redacted, redis_url_from_env
from grail_pipeline.fleet.context import FleetContext
from grail_pipeline.fleet.handover import SPILLED
from grail_pipeline.fleet.member import FleetMember, FleetTimings
from grail_pipeline.fleet.results import STORED, SignedGroup
from grail_pipeline.fleet.retry import RedisGuard, RedisUnavailable
from grail_pipeline.fleet.spill import Spill

WINDOW = 30
FAST = FleetTimings(claim_lease_s=0.5, leader_ttl_s=0.5, window_ttl_s=60, context_ttl_s=5, warn_after_s=0.3)


def proposal(checkpoint: str = "ckpt-A") -> FleetContext:
    return FleetContext(genesis=None, run_seed=1, block_time_s=0.5, window_blocks=30, checkpoint=checkpoint)


def group(index: int) -> SignedGroup:
    return SignedGroup(WINDOW, index, 16, f"group {index} ".encode() * 100)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_url_is_read_and_checked() -> None:
    assert redis_url_from_env({}) is None and redis_url_from_env({"GRAIL_REDIS_URL": " "}) is None
    assert redis_url_from_env({"GRAIL_REDIS_URL": "redis://h:6379/0"}) == "redis://h:6379/0"
    with pytest.raises(UserError, match="not a Redis URL"):
        redis_url_from_env({"GRAIL_REDIS_URL": "http://h:6379"})
    assert redacted("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"


def test_an_unreachable_redis_is_one_line_at_start() -> None:
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        connect(f"redis://:secret@127.0.0.1:{closed_port()}/0")
    message = str(refused.value)
    assert "unreachable" in message and "GRAIL_REDIS_URL" in message and "\n" not in message
    assert "secret" not in message
    assert time.monotonic() - started < 5


def test_join_builds_a_member_and_refuses_another_checkpoint(redis_server, tmp_path) -> None:
    hotkey = f"test-{uuid.uuid4().hex}"
    first = FleetMember.join(redis_server.url, hotkey, proposal(), tmp_path / "a", FAST)
    second = FleetMember.join(redis_server.url, hotkey, proposal(), tmp_path / "b", FAST)
    assert second.context == first.context and first.worker != second.worker
    with pytest.raises(UserError, match="checkpoint 'ckpt-B'"):
        FleetMember.join(redis_server.url, hotkey, proposal("ckpt-B"), tmp_path / "c", FAST)


def test_the_guard_retries_with_back_off_and_says_so_once(caplog) -> None:
    now = [0.0]
    guard = RedisGuard("Redis at test", warn_after_s=1.0, first_delay_s=0.1, max_delay_s=0.4,
                       clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    calls = []

    def flaky() -> str:
        calls.append(now[0])
        if now[0] < 3.0:
            raise ConnectionError("refused")
        return "answer"

    with caplog.at_level(logging.WARNING, logger="grail_pipeline.fleet.retry"):
        with pytest.raises(RedisUnavailable):
            guard.call(flaky, patience_s=0.5)
        assert guard.outage_s == pytest.approx(0.5)
        with pytest.raises(RedisUnavailable):
            guard.attempt(flaky)  # inside the back-off: not even tried
        assert guard.call(flaky) == "answer"
    assert guard.outage_s is None
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[:3] == pytest.approx([0.1, 0.2, 0.4]) and max(gaps) == pytest.approx(0.4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "has not answered" in lines[0] and "answers again" in lines[1], lines


def test_a_redis_restart_mid_window_loses_no_signed_group(redis_server, tmp_path, caplog) -> None:
    """Groups signed while Redis is down go to the spill and are handed over when it is back."""
    member = FleetMember.join(redis_server.url, f"test-{uuid.uuid4().hex}", proposal(), tmp_path / "spill", FAST)
    assert [member.handover.deliver(group(i)) for i in range(4)] == [STORED] * 4
    redis_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="grail_pipeline.fleet.retry"):
            outcomes = []
            for i in range(4, 10):
                outcomes.append(member.handover.deliver(group(i)))
                time.sleep(0.1)
            assert outcomes == [SPILLED] * 6
            assert member.handover.spilled == 6 and member.handover.merge_spill() == 0
            assert member.guard.outage_s > 0.3
            assert sum("has not answered" in r.getMessage() for r in caplog.records) == 1
    finally:
        redis_server.start()
    started = time.monotonic()
    merged = 0
    while member.handover.spilled:
        merged += member.handover.merge_spill()
        time.sleep(0.05)
        assert time.monotonic() - started < 10
    assert merged == 6 and member.guard.outage_s is None
    prefix = member.results.prefix(WINDOW)
    assert [g.index for g in prefix.groups] == list(range(10)) and prefix.cut_groups == 0
    assert all(g.payload == group(g.index).payload for g in prefix.groups)


def test_a_spilled_file_is_whole_and_merges_once(tmp_path) -> None:
    spill = Spill(tmp_path)
    spill.add(group(3))
    spill.add(group(3))  # the same group spilled twice (two workers): both merge, the store keeps one
    stored = []
    assert spill.merge(stored.append) == 2 and spill.pending() == []
    assert stored == [group(3), group(3)]
    spill.add(group(4))

    def down(_: SignedGroup) -> None:
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError):
        spill.merge(down)
    assert [spill.read(p) for p in spill.pending()] == [group(4)]  # kept for the next try


def test_the_fleet_view_shows_workers_claims_and_windows(redis_server, tmp_path) -> None:
    hotkey = f"test-{uuid.uuid4().hex}"
    a = FleetMember.join(redis_server.url, hotkey, proposal(), tmp_path / "a", FAST, worker="a")
    b = FleetMember.join(redis_server.url, hotkey, proposal(), tmp_path / "b", FAST, worker="b")
    assert a.leader.hold()
    a.claims.claim(WINDOW, 3)
    b.claims.claim(WINDOW, 2)
    assert [a.handover.deliver(group(i)) for i in (0, 1)] + [b.handover.deliver(group(3))] == [STORED] * 3
    a.heartbeats.beat(rollouts_per_s=44.0, groups_stored=3)
    b.heartbeats.beat(rollouts_per_s=40.5, groups_stored=0)
    a.plans.publish(WINDOW, stop_at=1e10)
    view = b.view().snapshot([WINDOW])
    assert view["leader"] == "a"
    assert view["workers"]["a"]["rollouts_per_s"] == 44.0 and view["workers"]["b"]["rollouts_per_s"] == 40.5
    assert view["workers"]["a"]["claims"] == view["workers"]["b"]["claims"] == 1  # 2 and 4 held; the rest stored
    assert 0 <= view["workers"]["a"]["age_s"] < 5 and 0 < view["workers"]["b"]["soonest_lease_s"] <= 0.5
    (window,) = view["windows"]
    assert (window["issued"], window["stored_groups"], window["on_time_groups"]) == (5, 3, 2)
    assert (window["on_time_rollouts"], window["cut_rollouts"], window["leases"]) == (32, 16, 2)
    assert window["stop_at"] == 1e10 and window["report"] is None
    b.heartbeats.forget()
    assert set(a.heartbeats.read()) == {"a"}
