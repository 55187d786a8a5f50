"""The leader lease and the fleet's shared context, against a real redis-server."""

from __future__ import annotations

import time
import uuid

import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.fleet.connection import connect
from grail_pipeline.fleet.context import FleetContext, SharedContext
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.leader import LeaderLease


@pytest.fixture
def fleet(redis_server):
    return connect(redis_server.url), FleetKeys(f"test-{uuid.uuid4().hex}")


def test_one_leader_at_a_time_and_only_the_holder_renews_or_releases(fleet) -> None:
    client, keys = fleet
    a, b = LeaderLease(client, keys, "a", 0.5), LeaderLease(client, keys, "b", 0.5)
    assert a.hold() and not b.hold()
    assert a.holder() == b.holder() == "a"
    assert not b.renew() and not b.release()
    assert a.holder() == "a"
    for _ in range(4):  # a keeps renewing well inside the lease: b never gets it
        time.sleep(0.2)
        assert a.hold() and not b.hold()
    assert a.release() and a.holder() is None
    assert b.hold() and b.holder() == "b"


def test_the_lease_passes_when_the_leader_stops_renewing(fleet) -> None:
    client, keys = fleet
    a, b = LeaderLease(client, keys, "a", 0.5), LeaderLease(client, keys, "b", 0.5)
    assert a.hold()
    started = time.monotonic()
    while not b.hold():  # a is gone: b polls as a worker's heartbeat would
        time.sleep(0.05)
        assert time.monotonic() - started < 2
    assert 0.4 <= time.monotonic() - started  # not before a's lease ran out
    assert b.holder() == "b"
    assert not a.renew() and not a.release()  # the old leader, back from a hang, cannot take it back
    assert b.holder() == "b"


def context(checkpoint: str = "ckpt-A", genesis: float | None = None, run_seed: int = 7) -> FleetContext:
    return FleetContext(genesis=genesis, run_seed=run_seed, block_time_s=0.5, window_blocks=30,
                        checkpoint=checkpoint)


def test_the_first_worker_publishes_and_the_others_adopt_its_clock(fleet) -> None:
    client, keys = fleet
    shared = SharedContext(client, keys, ttl_s=5)
    first = shared.join(context(), now=1000.0)
    assert first.genesis == 1000.0
    assert shared.join(context(), now=2000.0) == first  # a later worker adopts the fleet's genesis
    assert shared.join(context(genesis=1000.0)) == first
    assert shared.current() == first


@pytest.mark.parametrize("proposal, words", [
    (context(checkpoint="ckpt-B"), ["checkpoint", "'ckpt-B'", "'ckpt-A'"]),
    (context(run_seed=8), ["run seed is 8", "fleet's is 7"]),
    (context(genesis=5.0), ["genesis"]),
])
def test_a_worker_that_does_not_match_is_refused_with_one_line(fleet, proposal, words) -> None:
    client, keys = fleet
    SharedContext(client, keys, ttl_s=5).join(context(), now=1000.0)
    with pytest.raises(UserError) as refused:
        SharedContext(client, keys, ttl_s=5).join(proposal)
    message = str(refused.value)
    assert "\n" not in message and keys.hotkey in message
    assert all(word in message for word in words), message


def test_a_fleet_whose_workers_all_left_is_forgotten(fleet) -> None:
    client, keys = fleet
    shared = SharedContext(client, keys, ttl_s=0.4)
    shared.join(context(), now=1000.0)
    time.sleep(0.25)
    assert shared.keep_alive()  # a live worker's heartbeat keeps it
    time.sleep(0.25)
    assert shared.current() is not None
    time.sleep(0.3)
    assert not shared.keep_alive() and shared.current() is None
    assert shared.join(context(checkpoint="ckpt-B"), now=3000.0).checkpoint == "ckpt-B"  # restarted on a new one


def test_the_first_view_of_a_window_is_the_fleets(fleet) -> None:
    client, keys = fleet
    shared = SharedContext(client, keys)
    mine = {"block_hash": "0xaa", "randomness": "bb", "checkpoint_window": 0}
    assert shared.window_facts(60, mine, ttl_s=5) == mine
    assert shared.window_facts(60, {"block_hash": "0xcc", "randomness": "dd", "checkpoint_window": 30},
                               ttl_s=5) == mine
