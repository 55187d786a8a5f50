"""Claims on problem indices, stored groups and the window plan, against a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pytest

from grail_pipeline.fleet.claims import Claims
from grail_pipeline.fleet.connection import connect
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.plan import WindowPlans
from grail_pipeline.fleet.results import DUPLICATE, LATE, STORED, Results, SignedGroup

WINDOW = 30
TTL = 60.0


@pytest.fixture
def fleet(redis_server):
    """A client and the keys of a hotkey no other test uses."""
    return connect(redis_server.url), FleetKeys(f"test-{uuid.uuid4().hex}")


def group(index: int, rollouts: int = 16, window: int = WINDOW) -> SignedGroup:
    """A group's bytes as a worker would send them: an Arrow IPC stream of its rows."""
    table = pa.table({"problem": [index] * rollouts, "rollout": list(range(rollouts))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return SignedGroup(window, index, rollouts, sink.getvalue().to_pybytes())


def test_claims_come_from_one_counter_in_order(fleet) -> None:
    client, keys = fleet
    a, b = Claims(client, keys, "a", 5, TTL), Claims(client, keys, "b", 5, TTL)
    assert [c.index for c in a.claim(WINDOW, 3)] == [0, 1, 2]
    assert [c.index for c in b.claim(WINDOW, 2)] == [3, 4]
    assert [c.index for c in a.claim(WINDOW + 30)] == [0]  # every window has its own counter
    assert a.issued(WINDOW) == 5
    assert {(lease.index, lease.owner) for lease in a.leases(WINDOW)} == {(0, "a"), (1, "a"), (2, "a"), (3, "b"),
                                                                          (4, "b")}
    assert all(4 < lease.remaining_s <= 5 for lease in a.leases(WINDOW))


def test_threads_claiming_at_once_never_share_an_index(fleet) -> None:
    client, keys = fleet
    WindowPlans(client, keys, TTL).publish(WINDOW, max_index=400)
    got: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        claims = Claims(connect(fleet_url(client)), keys, name, 5, TTL)  # a connection per thread
        mine = got.setdefault(name, [])
        while batch := claims.claim(WINDOW, 3):
            mine.extend(c.index for c in batch)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for indices in got.values() for i in indices]
    assert sorted(everything) == list(range(400))  # each index once, none skipped
    assert all(got.values())


def fleet_url(client) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


CLAIMER = """
import json, sys
from grail_pipeline.fleet.claims import Claims
from grail_pipeline.fleet.connection import connect
from grail_pipeline.fleet.keys import FleetKeys
claims = Claims(connect(sys.argv[1]), FleetKeys(sys.argv[2]), sys.argv[3], 5, 60)
taken = []
while batch := claims.claim(30, 2):
    taken += [c.index for c in batch]
print(json.dumps(taken))
"""


def test_processes_claiming_at_once_never_share_an_index(fleet, redis_server) -> None:
    client, keys = fleet
    WindowPlans(client, keys, TTL).publish(WINDOW, max_index=600)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, redis_server.url, keys.hotkey, f"p{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    taken = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(i for t in taken for i in t) == list(range(600))


def test_a_lapsed_lease_goes_to_the_next_worker_lowest_first(fleet) -> None:
    client, keys = fleet
    dead = Claims(client, keys, "dead", 0.5, TTL)
    live = Claims(client, keys, "live", 0.5, TTL)
    assert [c.index for c in dead.claim(WINDOW, 3)] == [0, 1, 2]
    assert [c.index for c in live.claim(WINDOW)] == [3]  # leases still good: a fresh index
    time.sleep(0.3)
    assert dead.renew(WINDOW, [1]) == []  # the dead worker's index 1 is still renewed…
    time.sleep(0.35)  # …0 and 2 lapse
    # live's own lapsed 3 is not handed back to it: it may still be working on it
    assert [(c.index, c.reissued_from) for c in live.claim(WINDOW, 3)] == [(0, "dead"), (2, "dead"), (4, None)]
    assert live.renew(WINDOW, [3]) == []
    assert dead.renew(WINDOW, [0, 1, 2]) == [0, 2]  # it lost 0 and 2 and keeps 1
    assert {lease.index: lease.owner for lease in live.leases(WINDOW)} == {0: "live", 1: "dead", 2: "live",
                                                                          3: "live", 4: "live"}


def test_a_released_claim_is_reissued_at_once(fleet) -> None:
    client, keys = fleet
    a, b = Claims(client, keys, "a", 30, TTL), Claims(client, keys, "b", 30, TTL)
    a.claim(WINDOW, 2)
    assert b.release(WINDOW, [0, 1]) == 0  # not b's to give
    assert a.release(WINDOW, [1]) == 1
    assert [(c.index, c.reissued_from) for c in b.claim(WINDOW)] == [(1, "a")]


def test_the_plan_stops_claims(fleet) -> None:
    client, keys = fleet
    plans = WindowPlans(client, keys, TTL)
    claims, other = Claims(client, keys, "a", 0.2, TTL), Claims(client, keys, "b", 0.2, TTL)
    plans.publish(WINDOW, max_index=3)
    assert [c.index for c in claims.claim(WINDOW, 5)] == [0, 1, 2]
    assert plans.cut(WINDOW).max_index == 3 and plans.cut(WINDOW).stop_at is None
    time.sleep(0.3)
    assert [c.index for c in other.claim(WINDOW, 5)] == [0, 1, 2]  # lapsed ones below the cut still go out
    plans.publish(WINDOW, stop_at=time.time() - 1)
    time.sleep(0.3)
    assert claims.claim(WINDOW, 5) == []  # past stop_at, with no cut published, nothing is handed out
    assert plans.cut(WINDOW).max_index == 3  # publishing one field keeps the other
    assert plans.cut(WINDOW).admits(2, time.time() - 5) and not plans.cut(WINDOW).admits(3, time.time() - 5)


def test_a_lapsed_claim_is_reissued_after_the_stop_while_it_can_make_the_cut(fleet) -> None:
    """Killing a worker after the close lost its index (and every stored group after it): past `stop_at` no
    claim went out. A lapsed one still does, ahead of nothing fresh, while the claimer's latency makes the cut."""
    client, keys = fleet
    plans = WindowPlans(client, keys, TTL)
    dead, alive = Claims(client, keys, "dead", 0.2, TTL), Claims(client, keys, "alive", 5, TTL)
    assert [c.index for c in dead.claim(WINDOW, 2)] == [0, 1]
    assert [c.index for c in alive.claim(WINDOW, 1)] == [2]
    plans.publish(WINDOW, stop_at=time.time() - 1, cut_at=time.time() + 3)
    assert alive.claim(WINDOW, 3) == []  # stopped: no fresh index, and nothing lapsed yet
    time.sleep(0.3)  # the dead worker's leases lapse
    assert alive.claim(WINDOW, 1, latency_s=5.0) == []  # a group admitted now would miss the cut
    assert [(c.index, c.reissued_from) for c in alive.claim(WINDOW, 3, latency_s=1.0)] == [(0, "dead"), (1, "dead")]
    assert alive.issued(WINDOW) == 3  # nothing fresh after the stop
    plans.publish(WINDOW, cut_at=time.time() - 0.1)
    time.sleep(0.3)
    assert Claims(client, keys, "third", 5, TTL).claim(WINDOW, 1) == []  # past the cut: nothing at all


def test_groups_are_stored_once_and_end_their_lease(fleet) -> None:
    client, keys = fleet
    results = Results(client, keys, TTL)
    a, b = Claims(client, keys, "a", 0.3, TTL), Claims(client, keys, "b", 0.3, TTL)
    a.claim(WINDOW, 2)
    time.sleep(0.4)
    assert [c.index for c in b.claim(WINDOW)] == [0]  # a's lapsed index 0 re-issued to b
    assert results.put(group(0)) == STORED  # a finishes it anyway
    assert b.renew(WINDOW, [0]) == [0]  # b learns its work on 0 is not needed
    assert results.put(group(0, rollouts=15)) == DUPLICATE
    assert results.counts(WINDOW) == {0: 16}
    assert [lease.index for lease in a.leases(WINDOW)] == [1]


def test_the_prefix_is_contiguous_and_the_rest_is_cut(fleet) -> None:
    client, keys = fleet
    results = Results(client, keys, TTL, fetch_chunk=2)
    for i in (3, 0, 1, 2, 5, 6):
        assert results.put(group(i, rollouts=16 if i != 6 else 12)) == STORED
    prefix = results.prefix(WINDOW)
    assert [g.index for g in prefix.groups] == [0, 1, 2, 3]
    assert prefix.rollouts == 64 and prefix.cut_groups == 2 and prefix.cut_rollouts == 28
    assert all(g.payload == group(g.index).payload for g in prefix.groups)
    table = pa.ipc.open_stream(prefix.groups[2].payload).read_all()
    assert table.column("problem").to_pylist() == [2] * 16


def test_a_sealed_window_refuses_late_groups_and_claims(fleet) -> None:
    client, keys = fleet
    plans, results = WindowPlans(client, keys, TTL), Results(client, keys, TTL)
    claims = Claims(client, keys, "a", 5, TTL)
    claims.claim(WINDOW, 2)
    results.put(group(0))
    assert plans.report(WINDOW) is None and not plans.needs_file(WINDOW)
    assert plans.seal(WINDOW, "leader-1") and not plans.seal(WINDOW, "leader-2")
    assert plans.needs_file(WINDOW)  # sealed, no file yet: a successor must write it
    assert results.put(group(1)) == LATE
    assert claims.claim(WINDOW, 1) == []
    plans.record_written(WINDOW, {"file": "hk-window-30.parquet", "on_time_rollouts": 16, "margin_s": 4.5})
    report = plans.report(WINDOW)
    assert report["sealed_by"] == "leader-1" and report["file_written"] and report["on_time_rollouts"] == 16
    assert not plans.needs_file(WINDOW)
