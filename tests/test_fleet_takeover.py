"""The leader's rules that the 4 x H200 run (bench/results/h200-x4-2026-11-27/fleet) broke, against a real
redis-server: one writer per window, a cut that stays where it was published once claims stopped, and
`--max-windows` counted in the fleet's windows."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from conftest import block_time_for
from test_fleet_daemon import delivered, fleet_env
from test_mine import check_files_complete, running_daemon

from grail_pipeline.fleet.context import FleetContext
from grail_pipeline.fleet.member import FleetMember, FleetTimings
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.fleet_leader import FleetLeader

TIMINGS = FleetTimings(claim_lease_s=2.0, leader_ttl_s=1.0, window_ttl_s=60, context_ttl_s=10, warn_after_s=1.0)
WINDOW_BLOCKS = 30


def leader_of(url: str, hotkey: str, worker: str, tmp_path: Path, genesis: float) -> FleetLeader:
    member = FleetMember.join(url, hotkey, FleetContext(genesis=genesis, run_seed=0, block_time_s=0.4,
                                                        window_blocks=WINDOW_BLOCKS, checkpoint="ckpt"),
                              tmp_path / worker, TIMINGS, worker=worker)
    clock = WindowClock(0.4, WINDOW_BLOCKS, 0, 0, genesis)
    plan = DeadlinePlan(clock.time_of_block, WINDOW_BLOCKS, upload_allowance_s=5.0)

    async def written(report, sample) -> None:
        pass

    return FleetLeader(member, clock, plan, hotkey, tmp_path, lambda start: 0, {}, written)


def test_a_window_sealed_by_a_live_writer_is_not_written_by_another(tmp_path, redis_server) -> None:
    """The run's fault: three workers wrote window 0 while its sealer, alive, was still writing it."""
    hotkey = f"5Take{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    a = leader_of(redis_server.url, hotkey, "w-a", tmp_path, genesis)
    b = leader_of(redis_server.url, hotkey, "w-b", tmp_path, genesis)
    a.member.claims.claim(0, 2)
    a.member.heartbeats.beat(worker_id=0)
    b.member.heartbeats.beat(worker_id=1)
    assert a.member.plans.seal(0, "w-a")
    now = time.time()
    cut = a.plan.estimated_cut(0)
    late = cut + 2 * TIMINGS.leader_ttl_s  # the old rule took over one lease time after the cut
    assert late < b.plan.last_call(0)
    assert b._due(0, late, b.live()) is None  # a's heartbeat is fresh: a writes it
    assert b._due(0, b.plan.last_call(0) + 0.01, b.live()) == "cut"  # missing at the last call: b writes it
    a.member.heartbeats.forget()  # a is gone (left the roster, or its beat went stale)
    assert b._due(0, now, b.live()) == "cut"
    a.member.heartbeats.beat(worker_id=0)
    assert a._due(0, now, a.live()) == "cut"  # its own seal, not being written here: its write failed
    a.member.plans.record_written(0, {"file": "x"})
    assert b._due(0, b.plan.last_call(0) + 1, b.live()) is None


def test_the_published_cut_stays_once_claims_stopped(tmp_path, redis_server) -> None:
    """The run's cut share: the leader cut at its own estimate, which moved earlier after the stop as the
    fleet's summed rate rose; the cut it writes at is the one published with the stop."""
    hotkey = f"5Cut{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    leader = leader_of(redis_server.url, hotkey, "w-a", tmp_path, genesis)
    leader.plan.upload_allowance_s = None  # sized from the expected file, as in production
    leader.plan.rate(100.0)  # a 2.6-s upload allowance in a 12-s window
    now = genesis + 1.0
    leader._publish(0, now, latency=2.0)
    published = leader.member.plans.cut(0)
    room = TIMINGS.claim_lease_s  # a claim taken just before the stop by a worker that dies lapses in time
    assert published.cut_at is not None and abs(published.stop_at - (published.cut_at - 2.0 - room)) < 0.01
    assert leader.cut_time(0) == published.cut_at
    after_stop = published.stop_at + 0.1
    leader._publish(0, after_stop, latency=2.0)  # the stop passed: frozen from now on
    leader.plan.rate(1000.0)  # a 10x larger expected file moves the estimate seconds earlier...
    assert leader.plan.estimated_cut(0) < published.cut_at - 1.0
    leader._publish(0, after_stop + 0.2, latency=2.0)
    assert leader.member.plans.cut(0) == published and leader.cut_time(0) == published.cut_at  # ...not the cut

    # a worker admits against the fleet's cut with its own latency (its own estimate ignores the fleet's file)
    worker_plan = DeadlinePlan(leader.clock.time_of_block, WINDOW_BLOCKS, time_fn=lambda: published.cut_at - 1.0)
    worker_plan.admitted("g", when=published.cut_at - 3.0)  # 2 s in flight: latency 2 s
    assert worker_plan.admit(0)  # its own estimate: the deadline, far off
    worker_plan.fix_cut(0, published.cut_at)
    assert not worker_plan.admit(0) and worker_plan.cut(0) == published.cut_at


def test_a_dead_workers_claims_are_reissued_after_the_stop(tmp_path, redis_server) -> None:
    """Killed after the close, a worker's claims lapsed and nobody took them: the file ended at the first. A
    live worker's index provider goes on asking after the stop while others hold leases, and takes the
    lapsed ones as soon as they lapse, while its plan says a group admitted now still makes the cut."""
    from grail_pipeline.fleet.claims import Claims
    from grail_pipeline.mining.fleet_worker import FleetWorker

    hotkey = f"5Reissue{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    leader = leader_of(redis_server.url, hotkey, "w-alive", tmp_path, genesis)
    worker = FleetWorker(leader.member, leader.clock, leader.plan, leader, redraw=lambda task: False,
                         stopping=lambda: False, status=None, worker_id=0)
    dead = Claims(leader.member.client, leader.member.keys, "w-dead", 0.5, 60)
    assert [c.index for c in dead.claim(0, 2)] == [0, 1]
    leader.member.plans.publish(0, stop_at=time.time() - 0.1, cut_at=genesis + 7.0)  # the close has passed

    async def take() -> list[int]:
        got = []
        with anyio.fail_after(5):
            async for index in worker.indices(0):
                got.append(index)
        return got

    assert anyio.run(take) == [0, 1]  # re-issued after the stop; then nothing else can lapse: the provider ends
    assert leader.member.claims.issued(0) == 2 and leader.plan.cut(0) == pytest.approx(genesis + 7.0, abs=0.01)


def test_an_index_nobody_could_regenerate_is_named_with_its_cost(tmp_path, redis_server, caplog) -> None:
    """The rehearsal's window: index 0's holder died after the close, nobody re-generated it, and the file
    was written with 0 rollouts while the 32 stored rollouts of indices 1 and 2 were cut. Now: no file, and
    the report (Redis, the daemon's status record) names the lost index, its dead holder and what it cost."""
    from grail_pipeline.fleet.claims import Claims
    from grail_pipeline.fleet.results import SignedGroup as StoredGroup

    hotkey = f"5Lost{uuid.uuid4().hex[:8]}"
    reports = []

    async def written(report, sample) -> None:
        reports.append(report)

    leader = leader_of(redis_server.url, hotkey, "w-alive", tmp_path, time.time())
    leader.on_written = written
    m = leader.member
    Claims(m.client, m.keys, "w-dead", 0.1, 60).claim(0, 1)
    assert [c.index for c in m.claims.claim(0, 2)] == [1, 2]
    for index in (1, 2):
        assert m.results.put(StoredGroup(0, index, 16, b"rows")) == "stored"
    time.sleep(0.2)  # the dead worker's lease lapses
    assert m.plans.seal(0, "w-alive")
    report = anyio.run(leader.write, 0, "cut")
    lost = [{"index": 0, "owner": "w-dead", "rollouts_cut_after": 32,
             "state": "lost: its claim lapsed and no re-generation could arrive in time"}]
    assert report.file is None and not list(tmp_path.glob("*.parquet"))
    assert report.gaps == lost and report.cut_rollouts == 32 and report.missing_groups == [0]
    assert reports == [report] and report.as_dict()["gaps"] == lost  # the daemon's status record
    assert m.plans.report(0)["gaps"] == lost and m.plans.report(0)["file_written"]


def test_the_writer_hands_its_daemon_the_solo_sinks_sample_and_no_other_leader_does(tmp_path, redis_server) -> None:
    """A fleet's self-check sample is the file's, drawn by the worker that writes it from the rows it writes: the
    same records the solo sink would hand its daemon for the same groups (sink.file_sample: uniform over the file,
    nothing cut after a gap), each the file's row. A leader that finds the window written hands nothing (its
    daemon never checks another worker's file). Before, the leader handed no sample: no self-check in a fleet."""
    from test_sink import group, window

    from grail_pipeline.fleet.results import SignedGroup as StoredGroup
    from grail_pipeline.mining.chain import WorkerSlot
    from grail_pipeline.mining.group_payload import encode_group
    from grail_pipeline.mining.sink import GroupRows, WindowSink
    from grail_pipeline.protocol.records import read_window_file, records_table

    hotkey = f"5Sample{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    handed: dict[str, list] = {"w-a": [], "w-b": []}
    leaders = {}
    for name in handed:
        async def written(report, sample, name=name) -> None:
            handed[name].append((report.window_start, sample))

        leaders[name] = leader_of(redis_server.url, hotkey, name, tmp_path / name, genesis)
        leaders[name].on_written = written
        leaders[name].sample_size, leaders[name].run_seed = 20, 7
    a, b = leaders["w-a"], leaders["w-b"]
    groups = {i: group(window(0), i) for i in (0, 1, 2, 4)}  # 3 is missing: 4 is cut after the gap
    assert [c.index for c in a.member.claims.claim(0, 5)] == [0, 1, 2, 3, 4]
    for i, g in groups.items():
        rows = GroupRows(records_table(g.records), g.rollouts, g.completion_tokens, sum(g.solved),
                         sum(g.successes), sum(g.rewards), time.time())
        assert a.member.results.put(StoredGroup(0, i, g.rollouts, encode_group(rows))) == "stored"
    b.member.heartbeats.beat(worker_id=1)
    assert a.member.plans.seal(0, "w-a")
    anyio.run(a.write, 0, "cut")
    anyio.run(b.tick)  # b leads now: the window is written, nothing to write or hand over
    assert 0 in b._done and handed["w-b"] == [] and [w for w, _ in handed["w-a"]] == [0]
    sample = handed["w-a"][0][1]
    records, _ = read_window_file(tmp_path / "w-a" / f"{hotkey}-window-0.parquet")
    by_position = {(r["rollout_group"], r["rollout_index"]): r for r in records}
    assert len(sample) == 20 and all(r == by_position[r["rollout_group"], r["rollout_index"]] for r in sample)

    solo_sample = []

    async def solo_written(report, sample) -> None:
        solo_sample.extend(sample)

    async def solo() -> None:
        sink = WindowSink(tmp_path / "solo", hotkey, WorkerSlot(0, 1), WINDOW_BLOCKS, on_written=solo_written,
                          sample_size=20, run_seed=7)
        for g in groups.values():
            await sink.put(g)
        await sink.cut(0)

    anyio.run(solo)
    assert solo_sample == sample


def test_finish_returns_after_a_tick_under_way_has_written_and_reported_its_window(tmp_path, redis_server) -> None:
    """The fleet's form of the solo sink's lost report (WindowSink.finish, 1b5e0e2): the daemon cancels the worker's
    loop, and the file writes beside it, once `finish` returns. A leader's tick under way as the run ends may have
    sealed a window and not yet begun its write; `finish` waits for that tick, then for its write, so the window's
    report reaches the daemon (`on_written`) before it returns. Before, `finish` found no write under way, returned,
    and the loop's cancellation took the sealed window's write with it: no report here, no file until another
    worker noticed the seal."""
    import threading

    from grail_pipeline.mining.fleet_worker import FleetWorker
    from grail_pipeline.mining.status import StatusFile

    hotkey = f"5Finish{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    reports = []

    async def written(report, sample) -> None:
        reports.append(report.window_start)

    leader = leader_of(redis_server.url, hotkey, "w-lead", tmp_path, genesis)
    leader.on_written = written
    other = leader_of(redis_server.url, hotkey, "w-other", tmp_path, genesis)
    other.member.heartbeats.beat(worker_id=1)  # alive: the leaving leader leaves the open windows to it
    m = leader.member
    m.claims.claim(0, 1)  # mined in, nothing stored: the report says "no file"
    m.plans.publish(0, stop_at=time.time() - 1.0, cut_at=time.time() - 0.5)  # the cut has passed
    sealed, go = threading.Event(), threading.Event()
    due = leader._due

    def slow_due(window_start: int, now: float, live: dict) -> str | None:
        """The tick's Redis side as a loaded machine runs it: the window sealed, the write not yet begun."""
        trigger = due(window_start, now, live)
        if trigger is not None:
            sealed.set()
            go.wait(timeout=30)
        return trigger

    leader._due = slow_due
    worker = FleetWorker(m, leader.clock, leader.plan, leader, redraw=lambda task: False, stopping=lambda: False,
                         status=StatusFile(tmp_path / "status.json", 0, 2), worker_id=0)
    at_finish: list[list[int]] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.cancel_scope.deadline = anyio.current_time() + 60  # a bound for a loaded box, not a speed

            async def finish() -> None:
                await worker.finish("stopped")
                at_finish.append(list(reports))
                tg.cancel_scope.cancel()  # the daemon ends: the worker's loop and its writes are cancelled

            tg.start_soon(worker.run)
            try:
                await anyio.to_thread.run_sync(lambda: sealed.wait(timeout=30))
                tg.start_soon(finish)
                with anyio.move_on_after(1.0):  # before the fix finish returned in this time, the tick still under way
                    while not at_finish:
                        await anyio.sleep(0.01)
            finally:
                go.set()

    anyio.run(main)
    assert sealed.is_set() and at_finish == [[0]]  # the sealed window was written and reported before finish returned
    assert m.plans.report(0)["file_written"] and m.plans.report(0)["sealed_by"] == "w-lead"


def test_a_fleet_workers_latency_counts_the_groups_queued_ahead() -> None:
    """Measured on two shared cores: a worker's first group took 3 s, and it then claimed 7 more at once on
    "latency 3 s"; they ran one after the other and most were cut. A fleet worker's plan holds the second
    group until the first finishes, then counts every group in flight ahead of the next; a solo plan does not."""
    now = [1000.0]
    fleet = DeadlinePlan(lambda b: 1000.0 + 0.4 * b, 60, time_fn=lambda: now[0], cold_start_groups=1)
    solo = DeadlinePlan(lambda b: 1000.0 + 0.4 * b, 60, time_fn=lambda: now[0])
    for plan in (fleet, solo):
        plan.admitted("first", when=1000.0)
    assert fleet.saturated() and not solo.saturated()  # the cold start: one batch until one finishes
    now[0] = 1003.0
    for plan in (fleet, solo):
        plan.finished("first", when=1003.0)
        for k in range(6):
            plan.admitted(k, when=1003.0)
    assert not fleet.saturated()
    assert solo.latency() == 3.0 and fleet.latency() == 7 * 3.0  # behind six groups, at one per 3 s
    for k in range(6):  # then one finishes every second: the rate is measured between finishes
        now[0] = 1004.0 + k
        fleet.finished(k, when=now[0])
    assert fleet.latency() == 6.0  # nothing in flight: the measured quantile (the last group waited 6 s)
    for k in range(9):
        fleet.admitted(("b", k), when=now[0])
    assert fleet.latency() == 10 * 1.0  # behind nine groups, at one per second
    for k in range(9):
        fleet.forget(("b", k))
    now[0] = 1030.0  # a 21-s idle gap (between windows) is not throughput: left out of the rate
    fleet.admitted("late", when=1030.0)
    now[0] = 1031.0
    fleet.finished("late", when=1031.0)
    for k in range(9):
        fleet.admitted(("c", k), when=now[0])
    assert fleet.latency() == 10 * 1.0  # with the gap counted: 10 x 28/7 s = 40 s


def test_max_windows_counts_the_fleets_windows(tmp_path, redis_server) -> None:
    """Every worker mines the fleet's first window and the N−1 after it, whichever window it saw first."""
    from grail_pipeline.mining.fleet_worker import FleetWorker

    hotkey = f"5Runs{uuid.uuid4().hex[:8]}"
    genesis = time.time()
    workers = []
    for name in ("w-a", "w-b"):
        leader = leader_of(redis_server.url, hotkey, name, tmp_path, genesis)
        workers.append(FleetWorker(leader.member, leader.clock, leader.plan, leader, redraw=lambda task: False,
                                   stopping=lambda: False, status=None, worker_id=0, max_windows=2))
    assert anyio.run(workers[0].last_window, 30) == 60
    assert anyio.run(workers[1].last_window, 60) == 60  # joined a window later: the same last window
    assert anyio.run(workers[1].last_window, 90) == 60


WRITTEN = re.compile(r"^(\S+ \S+) \w+ window (\d+): (\d+) on-time rollouts \(\d+ groups\), (\d+) cut", re.M)
STOPPED = re.compile(r"^(\S+ \S+) INFO stopped \(end of run\)", re.M)
RUN = re.compile(r"--max-windows 2 counts the fleet's windows: (\d+) to (\d+)")


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_three_workers_write_once_count_everything_and_stop_together(tmp_path, redis_server, group_seconds) -> None:
    """Three workers with the daemon's default queues (as the 4 x H200 run had), `--max-windows 2`: each window
    is written by one worker, every worker mines the same two windows of the fleet and stays until the last
    file is written, and every stored group is in its file or counted cut. How much is cut depends on the
    machine's speed (23 % in that run; 304 of 752 on a loaded 2-core box): the plan's part in it is
    test_a_fleet_workers_latency_counts_the_groups_queued_ahead's; windows here are sized from a group's time."""
    out = tmp_path / "windows"
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    block = block_time_for(group_seconds("fast"), groups=4, processes=3, blocks=60)
    with ExitStack() as stack:
        procs = []
        for i in range(3):
            env, hotkey = fleet_env(tmp_path, redis_server.url, i, 3)
            procs.append(stack.enter_context(running_daemon(out, env, logs[i], "--engine", "fast",
                                                            "--warmup-problems", "1", "--max-windows", "2",
                                                            "--window-blocks", "60", "--block-time", block)))
        for proc in procs:
            assert proc.wait(timeout=150 + 4 * 60 * float(block)) == 0, "\n".join(p.read_text()[-4000:] for p in logs)
    texts = [p.read_text() for p in logs]
    runs = {RUN.search(t).groups() for t in texts}
    assert len(runs) == 1, runs  # one run of the fleet's windows for all
    first, last = map(int, runs.pop())
    writes = [(int(w), stamp(at), int(ok), int(cut)) for t in texts for at, w, ok, cut in WRITTEN.findall(t)]
    windows = sorted(w for w, *_ in writes)
    assert windows == sorted(set(windows)) and set(windows) <= {first, last} and last in windows, writes
    assert not any("writing it" in t for t in texts)  # no takeover: every sealer was alive and wrote its file
    last_file = max(at for w, at, *_ in writes if w == last)
    stopped = [stamp(STOPPED.search(t).group(1)) for t in texts]
    assert all(at >= last_file - 0.5 for at in stopped), (stopped, last_file)  # nobody left before the last file
    found = check_files_complete(out)
    assert set(found) == {w for w, _, ok, _ in writes if ok > 0}  # a window with nothing before a gap: no file
    stored = Counter(w for t in texts for w, _, outcome in delivered(t) if outcome == "stored")
    for window, _, ok, cut in writes:  # every stored group is in the file or counted cut, none twice
        in_file = sum(found[window][1].values()) if window in found else 0
        assert ok == in_file and ok + cut >= 16 * stored[window], (window, ok, cut, stored, writes)
