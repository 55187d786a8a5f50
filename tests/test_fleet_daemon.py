"""The fleet end to end: `mine --dry-run` workers of one hotkey in subprocesses, a real redis-server, one file
per window.

Every worker runs `dummy:tiny` on the CPU with the fast engine (about a second per group alone here) and
0.4 s blocks; the kill tests use 60-block windows (24 s) so that a dead worker's lapsed claims can still be
re-issued before the leader's stop (in 12-s windows the plan stops claims within a second or two of the
window's start on two shared cores). Every file is read back and checked with F's rules
(tools/window_check.py): groups 0..N−1, 16 rollouts each, prompts by file position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import block_time_for, run_cli, write_wallet
from test_mine import FAST, check_files_complete, running_daemon, signal_and_wait, wait_for

from grail_pipeline.cli.main import main
from grail_pipeline.fleet.connection import connect
from grail_pipeline.fleet.context import FleetContext, SharedContext
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.member import FleetMember
from grail_pipeline.fleet.plan import WindowPlans
from grail_pipeline.fleet.results import Results
from grail_pipeline.inference.checkpoints import dummy_checkpoint
from grail_pipeline.inference.loading import load_model, load_tokenizer
from grail_pipeline.mining.fleet_worker import checkpoint_identity, spill_dir, timings_for
from grail_pipeline.mining.group_payload import decode_group, encode_group
from grail_pipeline.mining.sink import GroupRows
from grail_pipeline.mining.status import read_status
from grail_pipeline.protocol.records import read_window_file, records_table
from grail_pipeline.protocol.wallet import ephemeral_signer
from grail_pipeline.tools.window_check import check_window_file

FLEET = ["--engine", "fast", "--warmup-problems", "1", "--generation-queue", "1"]  # claims held, not queued
DELIVERED = re.compile(r"delivered window=(\d+) group=(\d+) rollouts=(\d+) (\w+)")


def fleet_env(tmp_path: Path, url: str, worker: int, total: int) -> tuple[dict[str, str], str]:
    """A fresh hotkey's wallet (its own keys in the shared Redis) and the environment of worker `worker`."""
    wallets = tmp_path / "wallets"
    hotkey = (tmp_path / "hotkey").read_text() if (tmp_path / "hotkey").exists() else None
    if hotkey is None:
        hotkey = write_wallet(wallets)
        (tmp_path / "hotkey").write_text(hotkey)
    return {"BT_WALLET_COLD": "cold", "BT_WALLET_HOT": "hot", "BT_WALLET_PATH": str(wallets),
            "GRAIL_REDIS_URL": url, "GRAIL_WORKER_ID": str(worker), "GRAIL_TOTAL_WORKERS": str(total),
            "OMP_NUM_THREADS": "1"}, hotkey


def delivered(text: str) -> list[tuple[int, int, str]]:
    return [(int(w), int(g), outcome) for w, g, _, outcome in DELIVERED.findall(text)]


def group_counts(records: list[dict]) -> dict[int, int]:
    """Rollouts per group of a file's rows."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r["rollout_group"]] = counts.get(r["rollout_group"], 0) + 1
    return counts


def fleet_parts(url: str, hotkey: str) -> tuple[Results, WindowPlans, FleetKeys]:
    client = connect(url)
    keys = FleetKeys(hotkey)
    return Results(client, keys, 60), WindowPlans(client, keys, 60), keys


def wait_until(condition, timeout: float, what: str, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s:\n" + "\n".join(p.read_text()[-4000:] for p in logs))


def test_a_group_travels_as_its_arrow_rows_and_counts(tmp_path) -> None:
    from test_sink import group as signed_group
    from test_sink import window

    group = signed_group(window(30), 3)
    rows = GroupRows(records_table(group.records), group.rollouts, group.completion_tokens, sum(group.solved),
                     sum(group.successes), sum(group.rewards), 1234.5)
    back = decode_group(encode_group(rows))
    assert back.table.equals(rows.table) and back.table.schema.metadata is None
    assert (back.rollouts, back.completion_tokens, back.solved, back.validator_success, back.arrived) == \
        (16, rows.completion_tokens, rows.solved, rows.validator_success, 1234.5)
    assert back.reward_sum == pytest.approx(rows.reward_sum)


def test_lease_times_follow_the_window() -> None:
    production, rehearsal = timings_for(360.0), timings_for(12.0)
    assert (production.claim_lease_s, production.leader_ttl_s) == (10.0, 5.0)
    assert rehearsal.leader_ttl_s == 1.0 and rehearsal.claim_lease_s == 2.0
    assert rehearsal.leader_ttl_s < 4.0  # a dead leader is replaced well before the deadline's 4 s


def fleet_run(tmp_path: Path, url: str, out: Path, workers: int, block: str, *args: str) -> tuple[list[Path], str]:
    """`workers` mine processes of one fake hotkey's fleet (FLEET, `--block-time block`, `args`), each run to its
    end and exit 0 (a stop given in `args`, such as --max-windows); their logs and the hotkey."""
    logs = [tmp_path / f"worker-{i}.log" for i in range(workers)]
    with ExitStack() as stack:
        procs = []
        for i in range(workers):
            env, hotkey = fleet_env(tmp_path, url, i, workers)
            procs.append(stack.enter_context(running_daemon(out, env, logs[i], *FLEET, *args, "--block-time", block)))
        for proc in procs:
            assert proc.wait(timeout=300 + 3 * 30 * float(block)) == 0, "\n".join(p.read_text()[-4000:] for p in logs)
    return logs, hotkey


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_three_workers_write_one_file_per_window_that_f_accepts(tmp_path, redis_server, capsys, group_seconds) -> None:
    """Windows sized from a group's measured time: fixed 12-s ones held one group in all on a loaded box (the full
    suite beside another job), and "the groups came from one worker only" failed."""
    out = tmp_path / "windows"
    block = block_time_for(group_seconds("fast"), groups=4, processes=3)
    logs, hotkey = fleet_run(tmp_path, redis_server.url, out, 3, block, "--max-windows", "2")
    assert main(["fleet-status", "--json", "--redis-url", redis_server.url, "--hotkey", hotkey]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    texts = [p.read_text() for p in logs]
    files = sorted(out.glob("*.parquet"))
    assert files and all(re.fullmatch(rf"{hotkey}-window-\d+\.parquet", p.name) for p in files), files
    found = check_files_complete(out)  # F's rules without the model, 0..N-1, 16 per group
    loaded, tokenizer = load_model("dummy:tiny", "cpu"), load_tokenizer("dummy:tiny")
    stored = {(w, g): i for i, text in enumerate(texts) for w, g, outcome in delivered(text) if outcome == "stored"}
    assert len(set(stored.values())) >= 2, "the groups came from one worker only"
    for path in files:
        report = check_window_file(path, tokenizer, loaded)
        assert report.passed, {c.name: c.problems for c in report.checks if not c.ok}
        meta, counts = found[report.window_start]
        assert meta["fleet_writer"] and meta["model_name"] == "dummy:tiny" and meta["checkpoint_window"] == "0"
        assert path.stat().st_mtime <= float(meta["deadline"])
        assert all((report.window_start, g) in stored for g in counts)  # every group was stored by one worker
    assert sum(len(counts) for _, counts in found.values()) > 0
    windows = {w["window_start"]: w for w in snapshot["windows"]}
    for start, (meta, counts) in found.items():
        if start in windows:
            assert windows[start]["report"]["groups"] == len(counts) and windows[start]["report"]["file_written"]
    assert not list(out.glob("spill/*/*.group"))  # nothing left on disk


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_each_fleet_file_is_self_checked_once_by_its_writer(tmp_path, redis_server, group_seconds) -> None:
    """`--verify-sample` in a fleet: the worker that wrote a window's file (the leader then) re-verifies a sample of
    its rows with the validator's method, logged and recorded in its own status file; no other worker checks it.
    Before, a fleet's leader handed its daemon no sample and no window of a fleet was checked."""
    out = tmp_path / "windows"
    block = block_time_for(group_seconds("fast"), groups=3, processes=2)
    logs, _ = fleet_run(tmp_path, redis_server.url, out, 2, block, "--max-windows", "2", "--verify-sample", "2")
    texts = [p.read_text() for p in logs]
    statuses = [read_status(out / f"status-worker-{i}.json") for i in range(2)]
    names = [status["fleet"]["worker"] for status in statuses]
    found = check_files_complete(out)
    assert found, texts[0][-4000:]
    wrote: dict[int, list[int]] = {0: [], 1: []}
    for window, (meta, _) in found.items():
        writer = names.index(meta["fleet_writer"])
        wrote[writer].append(window)
        checks = [(i, line) for i, text in enumerate(texts) for line in text.splitlines()
                  if f"window {window} self-check" in line]
        assert len(checks) == 1 and checks[0][0] == writer, checks  # once, by the writer
        assert "self-check (validator's method" in checks[0][1] and "2/2 rollouts pass" in checks[0][1], checks
    for i, status in enumerate(statuses):
        if wrote[i]:  # the last file it wrote was checked last
            check = status["self_check"]
            assert check["window_start"] == max(wrote[i]) and check["rollouts_checked"] == check["rollouts_passed"] == 2
        else:
            assert "self_check" not in status


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_a_stop_records_the_fleet_self_check_it_does_not_run(tmp_path, redis_server, group_seconds) -> None:
    """The solo rule (tests/test_mine.py, 1b5e0e2) in a fleet: after SIGTERM no self-check starts, and the window
    the last worker out writes at the stop is recorded as not run, in its log and status file. The signal is sent
    once every file so far has its check logged and a later window has a stored group but no file yet."""
    out, log = tmp_path / "windows", tmp_path / "worker-0.log"
    env, _ = fleet_env(tmp_path, redis_server.url, 0, 1)
    block = block_time_for(group_seconds("fast"), groups=3)
    with running_daemon(out, env, log, *FLEET, "--verify-sample", "2", "--block-time", block) as proc:
        deadline = time.monotonic() + 180 + 3 * 30 * float(block)
        while True:
            text = log.read_text()
            written = set(re.findall(r"window (\d+): \d+ on-time rollouts[^\n]*\.parquet", text))
            checked = set(re.findall(r"window (\d+) self-check \(validator's method", text))
            open_ = {str(w) for w, _, outcome in delivered(text) if outcome == "stored"} - written
            if written and written <= checked and any(int(w) > max(map(int, written)) for w in open_):
                break
            assert proc.poll() is None and time.monotonic() < deadline, text[-4000:]
            time.sleep(0.05)
        rc, _ = signal_and_wait(proc, signal.SIGTERM, timeout=60)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    last = max(check_files_complete(out))  # the window open at the stop, written by the last worker out
    assert f"window {last} self-check not run: stopping (SIGTERM)" in text, text[-4000:]
    assert f"window {last} self-check (validator's method" not in text
    status = read_status(out / "status-worker-0.json")
    assert status["self_check"] == {"window_start": last, "not_run": "stopping (SIGTERM)"}, status


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_a_fleet_worker_of_two_hotkeys_self_checks_each_hotkeys_files(tmp_path, redis_server, monkeypatch,
                                                                      caplog, group_seconds) -> None:
    """Several hotkeys in one process (mining/hotkeys.py) with `--verify-sample`: each hotkey's unit is its own
    fleet's writer, hands its own files' samples to the one self-check process, and gets each result in its own
    status file and log lines."""
    root, out = tmp_path / "wallets", tmp_path / "windows"
    hotkeys = [write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")]
    for key, value in {"BT_WALLET_PATH": str(root), "GRAIL_HOTKEYS": "cold/hot1,cold/hot2",
                       "GRAIL_REDIS_URL": redis_server.url, "GRAIL_WORKER_ID": "0", "GRAIL_TOTAL_WORKERS": "1"}.items():
        monkeypatch.setenv(key, value)
    caplog.set_level("INFO", logger="grail_pipeline")
    block = block_time_for(group_seconds("fast"), groups=4)  # both hotkeys' groups, on a loaded box too
    assert main(["mine", "--dry-run", *FAST, *FLEET, "--out-dir", str(out), "--max-windows", "2",
                 "--verify-sample", "2", "--block-time", block]) == 0
    lines = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    checked = 0
    for hk in hotkeys:
        windows = sorted(int(p.name.rsplit("-", 1)[1].split(".")[0]) for p in out.glob(f"{hk}-window-*.parquet"))
        for window in windows:
            own = [m for m in lines if f"window {window} self-check" in m and m.startswith(f"[{hk[:8]}]")]
            assert len(own) == 1 and "2/2 rollouts pass" in own[0], lines
        status = read_status(out / f"status-worker-0-{hk}.json")
        if windows:
            checked += 1
            check = status["self_check"]
            assert check["window_start"] == windows[-1] and check["rollouts_checked"] == check["rollouts_passed"] == 2
    assert checked and len(lines) == sum(1 for p in out.glob("*.parquet")), lines  # a loaded box may starve one


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_two_workers_of_two_hotkeys_write_each_hotkeys_one_file_per_window(tmp_path, redis_server, group_seconds,
                                                                           capsys) -> None:
    """Two workers, each mining the same two hotkeys from its own engine (`GRAIL_HOTKEYS` with `GRAIL_REDIS_URL`):
    each hotkey's fleet is coordinated on its own, so every window of the run has one file per hotkey, written
    by one worker, with groups 0..N−1 from both workers' claims, that `verify` passes under its own hotkey and
    that holds its own hotkey's rollouts only."""
    root, out = tmp_path / "wallets", tmp_path / "windows"
    hotkeys = [write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")]
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    block = block_time_for(group_seconds("fast"), groups=4, processes=2)
    with ExitStack() as stack:
        procs = [stack.enter_context(running_daemon(
            out, {"BT_WALLET_PATH": str(root), "GRAIL_HOTKEYS": "cold/hot1,cold/hot2", "GRAIL_REDIS_URL":
                  redis_server.url, "GRAIL_WORKER_ID": str(i), "GRAIL_TOTAL_WORKERS": "2", "OMP_NUM_THREADS": "1"},
            logs[i], *FLEET, "--block-time", block, "--max-windows", "2")) for i in range(2)]
        for proc in procs:
            assert proc.wait(timeout=900) == 0, "\n".join(p.read_text()[-4000:] for p in logs)
    texts = [p.read_text() for p in logs]
    assert all(f"joined the fleet of {hk}" in text for hk in hotkeys for text in texts)
    check_files_complete(out)  # every file: F's rules without the model, groups 0..N-1, 16 rollouts each
    stored = {i: 0 for i in range(2)}
    statuses = {hk: [read_status(out / f"status-worker-{i}-{hk}.json") for i in range(2)] for hk in hotkeys}
    for hk in hotkeys:
        for i, status in enumerate(statuses[hk]):
            assert status["state"] == "stopped" and status["hotkey"] == hk and status["hotkeys"] == hotkeys
            stored[i] += status["fleet"]["groups"].get("stored", 0)
        written = [(int(w), i, record) for i, status in enumerate(statuses[hk])  # the writer's records
                   for w, record in status["windows"].items() if record.get("file")]
        windows = sorted(w for w, _, _ in written)
        assert len(windows) == 2 and windows[1] == windows[0] + 30, (hk, windows)  # each window written once
        assert sorted(p.name for p in out.glob(f"{hk}-window-*.parquet")) == [
            f"{hk}-window-{w}.parquet" for w in windows], texts[0][-4000:]
        for window, _, report in written:
            assert report["on_time"], report
            path = out / f"{hk}-window-{window}.parquet"
            records, meta = read_window_file(path)
            assert meta["wallet"] == hk and {r["hotkey"] for r in records} == {hk}  # its own hotkey's rows only
            assert sorted(group_counts(records)) == list(range(report["groups"])) and report["groups"] > 0
            rc, text, err = run_cli(capsys, "verify", str(path), "--device", "cpu", "--json")
            assert rc == 0, (hk, window, text[-3000:], err)
            assert json.loads(text)["verdicts"]["validator"]["passed"]
    assert all(n > 0 for n in stored.values()), stored  # both workers' claims made the files
    assert not list(out.glob("spill/*/*.group"))  # nothing left on disk


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_a_worker_of_two_hotkeys_killed_loses_neither_hotkeys_claims(tmp_path, redis_server, group_seconds) -> None:
    """Two workers of two hotkeys; one is killed (SIGKILL) while it holds claims: in each hotkey's fleet its claims
    lapse and are re-issued to the survivor, which writes that hotkey's file of the window (it may lead one
    hotkey's fleet and not the other's); each dead claim is in the file, or the file ends before it and the
    report names it, as in a one-hotkey fleet."""
    root, out = tmp_path / "wallets", tmp_path / "windows"
    hotkeys = [write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")]
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    block = block_time_for(group_seconds("fast"), groups=8, processes=2, blocks=60)
    window_s = 60 * float(block)
    with ExitStack() as stack:
        procs = [stack.enter_context(running_daemon(
            out, {"BT_WALLET_PATH": str(root), "GRAIL_HOTKEYS": "cold/hot1,cold/hot2", "GRAIL_REDIS_URL":
                  redis_server.url, "GRAIL_WORKER_ID": str(i), "GRAIL_TOTAL_WORKERS": "2", "OMP_NUM_THREADS": "1"},
            logs[i], *FLEET, "--window-blocks", "60", "--block-time", block)) for i in range(2)]
        for i in range(2):
            wait_for(logs[i], r"INFO mining", procs[i], timeout=90 + window_s)
        victim = procs[1]
        held: dict[str, tuple[int, list[int], str]] = {}

        def holds_claims() -> bool:
            """The victim holds claims of a window after the first in every hotkey's fleet."""
            for hk in hotkeys:
                window, owners = owners_of_current_window(redis_server.url, hk, 60)
                mine = sorted(i for i, o in owners.items() if pid_of(o) == victim.pid)
                if window == 0 or not mine:
                    return False
                held[hk] = (window, mine, next(o for o in owners.values() if pid_of(o) == victim.pid))
            return True

        wait_until(holds_claims, 120 + 3 * window_s, "the victim holding claims of both hotkeys", logs)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for hk, (window, indices, name) in held.items():
            _, plans, _ = fleet_parts(redis_server.url, hk)
            wait_until(lambda: (plans.report(window) or {}).get("file_written"), 60 + 2 * window_s,
                       f"{hk}'s file of window {window}", logs)
            report = plans.report(window)
            assert report["written_by"] != name and report["on_time"], report
            named = {gap["index"]: gap for gap in report["gaps"]}
            counts = {}
            if report["file"] is not None:
                records, meta = read_window_file(out / f"{hk}-window-{window}.parquet")
                assert meta["wallet"] == hk and {r["hotkey"] for r in records} == {hk}
                counts = group_counts(records)
            for i in indices:  # in the file, or the file ends before it and the report says so
                assert i in counts or (i in named and i >= len(counts)), (hk, i, indices, sorted(counts), report)
            assert len(counts) == report["groups"]
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=120) == 0, logs[0].read_text()[-4000:]
    check_files_complete(out)


def test_each_hotkeys_spill_is_merged_into_its_own_fleet_only(tmp_path, redis_server) -> None:
    """A spilled group names its window and index, not its hotkey: a worker of two hotkeys keeps one spill folder
    per hotkey under the shared out dir, so the other hotkey's merge never stores it in the wrong window."""
    from grail_pipeline.fleet.results import SignedGroup as StoredGroup
    from grail_pipeline.fleet.spill import Spill

    context = FleetContext(genesis=time.time() - 5, run_seed=0, block_time_s=0.4, window_blocks=30, checkpoint="c")
    first, second = (f"5Spill{i}{time.time_ns()}" for i in range(2))
    members = {hk: FleetMember.join(redis_server.url, hk, context, spill_dir(tmp_path, hk), timings_for(12.0),
                                    worker="w-a") for hk in (first, second)}
    assert members[first].claims.claim(0, 1)[0].index == 0
    Spill(spill_dir(tmp_path, first)).add(StoredGroup(0, 0, 16, b"rows of the first hotkey"))
    assert members[second].handover.merge_spill() == 0 and members[first].handover.merge_spill() == 1
    assert members[first].results.counts(0) == {0: 16} and members[second].results.counts(0) == {}


def test_groups_in_the_old_flat_spill_folder_are_named_at_the_join(tmp_path, redis_server, caplog) -> None:
    """Groups spilled before the folders per hotkey cannot be told apart by hotkey, so none is merged; the join says
    how many there are and where they would go, rather than leaving them unseen."""
    from grail_pipeline.fleet.results import SignedGroup as StoredGroup
    from grail_pipeline.fleet.spill import Spill
    from grail_pipeline.inference.loading import CheckpointSource
    from grail_pipeline.mining.chain import WorkerSlot
    from grail_pipeline.mining.fleet_worker import SPILL_DIR, join_fleet
    from grail_pipeline.mining.settings import MineSettings

    Spill(tmp_path / SPILL_DIR).add(StoredGroup(0, 0, 16, b"rows spilled by an older version"))
    settings = MineSettings(worker=WorkerSlot(0, 1), block_time_s=0.4, window_blocks=30, safety_blocks=1, run_seed=0,
                            genesis=time.time(), out_dir=tmp_path, status_file=tmp_path / "status.json",
                            drain_timeout_s=10, verify_sample=0, max_windows=1, batch_size=None, warmup_problems=0,
                            pipeline_overrides={}, redis_url=redis_server.url)
    hotkey = f"5Legacy{time.time_ns()}"
    with caplog.at_level("INFO", logger="grail_pipeline"):
        member = join_fleet(settings, hotkey, CheckpointSource("dummy:tiny", "dummy:tiny", 0))
    assert member.handover.merge_spill() == 0  # not merged into this hotkey's fleet
    warned = [r.getMessage() for r in caplog.records if "spilled before spills had a folder per hotkey" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 signed group(s) in ") and hotkey in warned[0], warned


def owners_of_current_window(url: str, hotkey: str, window_blocks: int) -> tuple[int, dict[int, str]]:
    """The window open now (from the fleet's context) and who holds each of its leases."""
    client = connect(url)
    keys = FleetKeys(hotkey)
    context = SharedContext(client, keys).current()
    assert context is not None
    block = int((time.time() - context.genesis) // context.block_time_s)
    window = block // window_blocks * window_blocks
    owners = {int(k): v.decode() for k, v in client.hgetall(keys.window(window).owners).items()}
    return window, owners


def pid_of(worker: str) -> int:
    return int(worker.split("-")[-2])  # host-pid-random (fleet/member.py worker_name)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # windows sized from a group's time: minutes on a loaded box
def test_kill_9_of_a_worker_and_then_of_the_leader(tmp_path, redis_server, group_seconds) -> None:
    """A non-leader killed mid-window: its claims are re-issued (after the stop too) and each is in the window's
    file, or the file ends before it and its report names it with what it cost. Then the leader killed
    mid-window: another worker takes the lease and writes (or, with nothing before a gap, records) that window
    before its deadline. Windows are sized from a group's measured time (a loaded box failed 24-s ones)."""
    out = tmp_path / "windows"
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    procs = {}
    block = block_time_for(group_seconds("fast"), groups=4, processes=3, blocks=60)
    window_s = 60 * float(block)
    with ExitStack() as stack:
        for i in range(3):
            env, hotkey = fleet_env(tmp_path, redis_server.url, i, 3)
            procs[i] = stack.enter_context(running_daemon(out, env, logs[i], *FLEET, "--window-blocks", "60",
                                                          "--block-time", block))
        results, plans, keys = fleet_parts(redis_server.url, hotkey)
        for i in range(3):
            wait_for(logs[i], r"INFO mining", procs[i], timeout=90 + window_s)
        client = connect(redis_server.url)
        by_pid = {p.pid: i for i, p in procs.items()}

        def victim(leader: bool) -> tuple[int, int, str, list[int]] | None:
            """(window, worker index, worker name, its leased indices) of a live worker with claims now."""
            window, owners = owners_of_current_window(redis_server.url, hotkey, 60)
            head = (client.get(keys.leader) or b"").decode()
            for name in sorted(set(owners.values())):
                if (name == head) == leader and pid_of(name) in by_pid and procs[by_pid[pid_of(name)]].poll() is None:
                    return window, by_pid[pid_of(name)], name, sorted(i for i, o in owners.items() if o == name)
            return None

        # 1. a non-leader with claims, killed
        found = []
        wait_until(lambda: found.append(victim(leader=False)) or found[-1] is not None and found[-1][0] > 0,
                   120 + 2 * window_s, "non-leader holding claims", logs)
        window, index, name, indices = found[-1]
        procs[index].send_signal(signal.SIGKILL)
        procs[index].wait()
        # it may have claimed more between the look and the kill; its leases stay its own until they lapse (2 s at least)
        indices = sorted(set(indices) | {int(i) for i, o in client.hgetall(keys.window(window).owners).items()
                                         if o.decode() == name})
        wait_until(lambda: (plans.report(window) or {}).get("file_written"), 60 + 2 * window_s,
                   f"file of window {window}", logs)
        texts = "".join(p.read_text() for p in logs)
        reissued = [int(i) for i in re.findall(rf"window {window}: claimed index (\d+), re-issued from {name}", texts)]
        assert set(reissued) <= set(indices), (indices, reissued)
        report = plans.report(window)
        counts = check_files_complete(out).get(window, ({}, {}))[1]
        named = {gap["index"]: gap for gap in report["gaps"]}
        for i in indices:  # in the file, or the file ends before it and the report says so and what it cost
            assert i in counts or (i in named and i >= len(counts)), (i, indices, sorted(counts), report)
        assert len(counts) == report["groups"] and sorted(report["missing_groups"]) == sorted(named)

        # 2. the leader, killed mid-window (after it published the stop of a window with groups in flight)
        found = []
        wait_until(lambda: found.append(victim(leader=True)) or found[-1] is not None and found[-1][0] > window,
                   60 + 2 * window_s, "the leader holding claims in the next window", logs)
        window, index, name, _ = found[-1]
        procs[index].send_signal(signal.SIGKILL)
        procs[index].wait()
        wait_until(lambda: (plans.report(window) or {}).get("file_written"), 60 + 2 * window_s,
                   f"file of window {window}", logs)
        report = plans.report(window)
        assert report["written_by"] != name and report["on_time"] and report["margin_s"] > 0, report
        if report["file"] is None:  # the dead leader held index 0 and nobody could redo it in time: named
            assert report["groups"] == 0 and report["gaps"][0]["index"] == 0, report
        else:
            meta, counts = check_files_complete(out)[window]
            assert meta["fleet_writer"] == report["written_by"] and path_mtime_ok(out, hotkey, window, meta)
            assert len(counts) == report["groups"] > 0


def path_mtime_ok(out: Path, hotkey: str, window: int, meta: dict[str, str]) -> bool:
    return (out / f"{hotkey}-window-{window}.parquet").stat().st_mtime <= float(meta["deadline"])


@pytest.mark.slow
def test_redis_away_for_seconds_mid_window_loses_no_signed_group(tmp_path, redis_server) -> None:
    out = tmp_path / "windows"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    procs = []
    with ExitStack() as stack:
        stack.callback(lambda: redis_server.process is None and redis_server.start())  # for the tests after this
        for i in range(2):
            env, hotkey = fleet_env(tmp_path, redis_server.url, i, 2)
            procs.append(stack.enter_context(running_daemon(out, env, logs[i], *FLEET, "--window-blocks", "60")))
        for i in range(2):
            wait_for(logs[i], r"delivered window=\d+ group=\d+ rollouts=16 stored", procs[i], timeout=120)
        redis_server.stop()
        time.sleep(4.0)  # long enough for "has not answered for"
        # away until a group is signed meanwhile, whatever the machine's load: a fixed 4 s on a busy 2-core box
        # saw no group finish (2026-12-03); at most 18 s more keeps the outage inside the 24-s window
        wait_until(lambda: any(outcome == "spilled" for p in logs for _, _, outcome in delivered(p.read_text())),
                   18, "group signed while Redis was away", logs)
        redis_server.start()
        wait_until(lambda: "answers again" in "".join(p.read_text() for p in logs), 30, "Redis back", logs)
        time.sleep(26.0)  # the window of the outage (24 s) is written, and the next one's claims go on
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    texts = [p.read_text() for p in logs]
    spilled = [(w, g) for text in texts for w, g, outcome in delivered(text) if outcome == "spilled"]
    assert spilled, "no group was signed while Redis was away:\n" + texts[0][-3000:]
    assert any("has not answered for" in t for t in texts)  # said once, a few seconds in
    assert sum(int(n) for t in texts for n in re.findall(r"handed (\d+) spilled group", t)) == len(spilled)
    assert list((out / "spill").iterdir()) == [out / "spill" / hotkey]  # the hotkey's own folder
    assert not list(out.glob("spill/*/*.group"))  # nothing left on disk
    results, plans, _ = fleet_parts(redis_server.url, hotkey)
    found = check_files_complete(out)
    for window, group in spilled:  # each is in Redis, and in its window's file unless after the file's cut
        assert group in results.counts(window), (window, group)
        meta, counts = found[window]
        assert group in counts or group >= len(counts), (window, group, meta)
    assert any(group in found[window][1] for window, group in spilled)


def test_a_worker_on_another_checkpoint_is_refused_in_one_line(tmp_path, redis_server) -> None:
    env, hotkey = fleet_env(tmp_path, redis_server.url, 1, 2)
    tiny = dummy_checkpoint("tiny")
    # the fleet's context outlives the worker's start whatever the machine's load (a 10-s one expired before a
    # loaded box's worker asked, and the worker then mined on alone until the test timed out)
    FleetMember.join(redis_server.url, hotkey, FleetContext(
        genesis=None, run_seed=0, block_time_s=0.4, window_blocks=30,
        checkpoint=checkpoint_identity("dummy:tiny", 0, str(tiny))), tmp_path / "spill",
        dataclasses.replace(timings_for(12.0), context_ttl_s=3600.0))
    other = tmp_path / "checkpoint-7"
    shutil.copytree(tiny, other)
    metadata = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**metadata, "window": 7}))
    run = subprocess.run([sys.executable, "-m", "grail_pipeline", "mine", "--dry-run", *FAST, "--model", str(other),
                          "--out-dir", str(tmp_path / "out")], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=600)  # a bound for a loaded box, not a speed
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("grail-pipeline mine: error: refused by the fleet of hotkey") and "@7#" in last, last
    assert "Traceback" not in run.stderr
    # refused before the model loaded (INFO lines go to stdout, problems to stderr: cli/main.configure_logging)
    assert "INFO starting" in run.stdout and "INFO model " not in run.stdout
    status = json.loads((tmp_path / "out" / "status-worker-1.json").read_text())
    assert status["state"] == "stopped" and "refused by the fleet" in status["exit_reason"]


def test_fleet_status_shows_workers_and_windows(tmp_path, redis_server, capsys) -> None:
    """`fleet-status` over a fleet's real Redis state: the worker's beat and claims, the window's on-time and cut
    rollouts and the written file's margin; a table by default, JSON on request."""
    from grail_pipeline.fleet.results import SignedGroup as StoredGroup

    hotkey = ephemeral_signer().ss58_address  # a fleet of its own in the shared Redis
    member = FleetMember.join(redis_server.url, hotkey, FleetContext(
        genesis=time.time() - 5, run_seed=0, block_time_s=0.4, window_blocks=30, checkpoint="ckpt"),
        tmp_path / "spill", timings_for(12.0), worker="w-a")
    assert [c.index for c in member.claims.claim(0, 4)] == [0, 1, 2, 3]
    for index in (0, 1, 3):  # 2 is still out: 3 lies after the gap
        assert member.results.put(StoredGroup(0, index, 16, b"rows")) == "stored"
    member.heartbeats.beat(worker_id=0, rollouts_per_s=12.5, groups_stored=3, spilled=0, redis_outage_s=None)
    assert member.leader.hold() and member.plans.seal(0, "w-a")
    member.plans.record_written(0, {"file": f"/x/{hotkey}-window-0.parquet", "groups": 2, "margin_s": 1.25})
    argv = ["fleet-status", "--redis-url", redis_server.url, "--hotkey", hotkey]
    assert main([*argv, "--json"]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert snapshot["leader"] == "w-a" and snapshot["context"]["checkpoint"] == "ckpt"
    beat = snapshot["workers"]["w-a"]
    assert beat["rollouts_per_s"] == 12.5 and beat["claims"] == 1 and beat["soonest_lease_s"] > 0
    (window,) = snapshot["windows"]
    assert (window["on_time_rollouts"], window["cut_rollouts"], window["issued"]) == (32, 16, 4)
    assert window["report"]["margin_s"] == 1.25 and window["report"]["file_written"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "leader w-a" in table and "12.50" in table and f"{hotkey}-window-0.parquet" in table and "1.2" in table


def test_fleet_status_names_the_lease_holder_leader_not_a_dead_workers_beat(tmp_path, redis_server, capsys) -> None:
    """A killed leader's last beat says `"leader": true` until it ages out; the leader is whoever holds the lease."""
    hotkey = ephemeral_signer().ss58_address  # a fleet of its own in the shared Redis
    context = FleetContext(genesis=time.time() - 5, run_seed=0, block_time_s=0.4, window_blocks=30, checkpoint="c")
    dead = FleetMember.join(redis_server.url, hotkey, context, tmp_path / "spill", timings_for(12.0), worker="w-dead")
    alive = FleetMember.join(redis_server.url, hotkey, context, tmp_path / "spill", timings_for(12.0), worker="w-new")
    dead.heartbeats.beat(worker_id=0, leader=True)  # its last beat, then SIGKILL: its lease lapses
    assert alive.leader.hold()  # the lease was free: the new leader takes it and beats
    alive.heartbeats.beat(worker_id=1, leader=True)
    assert main(["fleet-status", "--json", "--redis-url", redis_server.url, "--hotkey", hotkey]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert snapshot["leader"] == "w-new"
    assert {w: b["leader"] for w, b in snapshot["workers"].items()} == {"w-dead": False, "w-new": True}


def test_fleet_status_shows_several_hotkeys_fleets_in_one_view(tmp_path, redis_server, capsys, monkeypatch) -> None:
    """Workers mining two hotkeys are one worker of each hotkey's fleet, each under its own keys: one fleet-status
    shows both, named by address (--hotkey, repeated or a comma list), by wallet (--hotkeys) or by GRAIL_HOTKEYS;
    --json keys each hotkey's snapshot by its address, and one hotkey keeps the shape it always had."""
    from grail_pipeline.fleet.results import SignedGroup as StoredGroup

    wallets = tmp_path / "wallets"
    first, second = write_wallet(wallets, hot="hot1"), write_wallet(wallets, hot="hot2")
    monkeypatch.setenv("BT_WALLET_PATH", str(wallets))
    for name in ("BT_WALLET_COLD", "BT_WALLET_HOT", "GRAIL_HOTKEYS"):
        monkeypatch.delenv(name, raising=False)
    # 12-s blocks: window 0 stays the one open, so every call below shows the same single window
    context = FleetContext(genesis=time.time() - 5, run_seed=0, block_time_s=12.0, window_blocks=30, checkpoint="c")
    for hotkey, worker, stored in ((first, "w-one", (0, 1)), (second, "w-two", (0,))):
        member = FleetMember.join(redis_server.url, hotkey, context, tmp_path / "spill", timings_for(12.0),
                                  worker=worker)
        member.claims.claim(0, len(stored))
        for index in stored:
            assert member.results.put(StoredGroup(0, index, 16, b"rows")) == "stored"
        member.heartbeats.beat(worker_id=0, rollouts_per_s=float(len(stored)), groups_stored=len(stored), spilled=0,
                               redis_outage_s=None)
        assert member.leader.hold()
    url = ["--redis-url", redis_server.url]

    assert main(["fleet-status", "--json", *url, "--hotkey", first, "--hotkey", second]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both.keys() == {first, second}  # keyed by address
    for hotkey, leader, rollouts in ((first, "w-one", 32), (second, "w-two", 16)):
        snapshot = both[hotkey]
        assert snapshot["hotkey"] == hotkey and snapshot["leader"] == leader and list(snapshot["workers"]) == [leader]
        (window,) = snapshot["windows"]
        assert window["on_time_rollouts"] == rollouts
        assert main(["fleet-status", "--json", *url, "--hotkey", hotkey]) == 0  # one hotkey: today's shape
        alone = json.loads(capsys.readouterr().out)
        assert alone.keys() == snapshot.keys() and alone["windows"] == snapshot["windows"]
    assert main(["fleet-status", "--json", *url, "--hotkey", f"{second},{first}"]) == 0
    assert json.loads(capsys.readouterr().out).keys() == {first, second}

    def sections(argv: list[str]) -> list[str]:
        """The hotkeys the table shows, in its order (each section opens with `fleet of HOTKEY: leader ...`)."""
        assert main(["fleet-status", *url, *argv]) == 0
        table = capsys.readouterr().out
        return re.findall(r"^fleet of (\w+): leader (\S+)", table, re.MULTILINE)

    assert sections(["--hotkeys", "cold/hot1,cold/hot2"]) == [(first, "w-one"), (second, "w-two")]
    assert sections(["--hotkey", second, "--hotkeys", "cold/hot1"]) == [(second, "w-two"), (first, "w-one")]
    monkeypatch.setenv("GRAIL_HOTKEYS", "cold/hot2,cold/hot1")  # what a worker mining both is given
    assert sections([]) == [(second, "w-two"), (first, "w-one")]
    assert sections(["--hotkey", first]) == [(first, "w-one")]  # a hotkey named on the line wins over the variable
    rc, out, err = run_cli(capsys, "fleet-status", *url, "--hotkey", first, "--hotkeys", "cold/hot1")
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert f"wallet cold/hot1 holds hotkey {first}, already named by --hotkey" in err
