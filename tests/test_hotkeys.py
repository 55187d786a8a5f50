"""Several hotkeys from one engine (mining/hotkeys.py, mining/fill.py): targets, the fill order, spare capacity,
the flags, and a real daemon mining two hotkeys on the CPU whose files verify under their own hotkey only."""

from __future__ import annotations

import copy
import json
import random
import signal
import time

import anyio
import pytest
from conftest import block_time_for, write_wallet
from test_clock import fake_task
from test_mine import check_files_complete, running_daemon, signal_and_wait, wait_for

from grail_pipeline.cli import main as cli
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.loading import load_model, load_tokenizer
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import WindowTimes
from grail_pipeline.mining.fill import FillOrder, check_target, groups_for, resolve_target, window_target
from grail_pipeline.mining.messages import ProblemTask
from grail_pipeline.mining.sink import WindowReport
from grail_pipeline.mining.source import ProblemSource, WindowClose
from grail_pipeline.mining.status import read_status
from grail_pipeline.protocol.records import read_window_file
from grail_pipeline.tools.window_check import check_window_file


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GRAIL_WORKER_ID", "GRAIL_TOTAL_WORKERS", "GRAIL_MINER_SAFETY_BLOCKS", "GRAIL_BLOCK_TIME",
                 "GRAIL_GENERATION_BATCH_SIZE", "BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH", "GRAIL_HOTKEYS",
                 "GRAIL_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


# --- targets ---------------------------------------------------------------------------------------------


def test_the_cap_target_keeps_the_rolling_total_at_the_cap() -> None:
    assert window_target(0) == 5120  # 61,440 over 12 windows
    assert window_target(1) == 5600  # 61,440 / 11 = 5,585.5, rounded up to whole groups of 16
    assert window_target(11) == 61440
    for failed in (-1, 12):
        with pytest.raises(UserError, match="--failed-windows"):
            window_target(failed)
    assert check_target(32) == 32 and groups_for(5120) == 320 and groups_for(17) == 2
    assert resolve_target(None, 0, hotkeys=2) == 5120  # several hotkeys: the cap by default
    assert resolve_target(None, 0, hotkeys=1) is None  # one hotkey: as before targets existed
    assert resolve_target("cap", 1, hotkeys=1) == 5600 and resolve_target("4096", 0, hotkeys=3) == 4096
    for bad in (0, 8, 100):
        with pytest.raises(UserError, match="groups of 16"):
            check_target(bad)


# --- the fill order, on the real source ------------------------------------------------------------------


class CountingPlan:
    """Admits while the window is open; groups stay in flight until the test finishes them."""

    def __init__(self) -> None:
        self.flying: set[tuple[int, int, int]] = set()

    def admit(self, window_start: int) -> bool:
        return True

    def admitted(self, key: tuple[int, int, int]) -> None:
        self.flying.add(key)

    def in_flight(self) -> int:
        return len(self.flying)

    def saturated(self) -> bool:
        return False

    def describe(self, window_start: int) -> dict:
        return {}


def test_each_hotkey_fills_its_target_in_order_and_stops_there() -> None:
    """Two sources, one target of 3 groups: the first's 3 are issued before any of the second's, neither issues a
    fourth though the window stays open, and each window closes once its groups are back."""
    clock = WindowClock(block_time_s=0.2, window_blocks=30)  # 6-s windows: the test's work is a few ms
    fill = FillOrder(["hk1", "hk2"], target_rollouts=48)
    plans = {hk: CountingPlan() for hk in fill.hotkeys}
    closes: dict[str, list[WindowClose]] = {hk: [] for hk in fill.hotkeys}
    merged: list[tuple[str, ProblemTask]] = []

    def source_of(hk: str) -> ProblemSource:
        async def on_close(close: WindowClose) -> None:
            closes[hk].append(close)

        source = ProblemSource(clock, plans[hk], fake_task, on_close, max_windows=1, target=fill.target_groups,
                               hold=lambda: fill.hold(hk))
        fill.join(hk, source)
        return source

    async def main() -> None:
        sources = {hk: source_of(hk) for hk in fill.hotkeys}

        async def pump(hk: str) -> None:
            async for task in sources[hk].tasks():
                merged.append((hk, task))
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for hk in fill.hotkeys:
                tg.start_soon(pump, hk)
            while len(merged) < 6:
                await anyio.sleep(0.01)
            await anyio.sleep(0.3)  # several holds later: nobody takes a fourth index
            assert len(merged) == 6 and not any(closes.values())  # at the target, the groups still in flight
            assert not sources["hk1"].filling and not sources["hk2"].filling
            for plan in plans.values():
                plan.flying.clear()  # every group reached the sink

    anyio.run(main)
    assert [hk for hk, _ in merged] == ["hk1"] * 3 + ["hk2"] * 3
    for hk in fill.hotkeys:
        (close,) = closes[hk]
        assert close.indices == (0, 1, 2) and not close.partial
        assert clock.generation_open(close.window_start, clock.block(close.closed))  # closed at the target, not the end


def test_a_source_at_its_target_still_redraws_a_dropped_group() -> None:
    clock = WindowClock(block_time_s=0.2, window_blocks=30)
    plan = CountingPlan()
    closes: list[WindowClose] = []

    async def on_close(close: WindowClose) -> None:
        closes.append(close)

    async def main() -> None:
        source = ProblemSource(clock, plan, fake_task, on_close, target=2)
        tasks = source.tasks()
        first = [await tasks.__anext__() for _ in range(2)]
        assert not source.filling  # a later hotkey may go on
        plan.flying.discard(first[1].key)
        assert source.redraw(first[1])  # still open: the redraw goes ahead of closing
        again = await tasks.__anext__()
        assert (again.index, again.attempt) == (1, 1)
        plan.flying.clear()
        source.stop()
        with pytest.raises(StopAsyncIteration):
            await tasks.__anext__()

    anyio.run(main)
    assert closes[0].indices == (0, 1)


# --- spare capacity --------------------------------------------------------------------------------------


def report(window_start: int, rollouts: int, ready_at: float) -> WindowReport:
    return WindowReport(window_start=window_start, file="f", partial=False, issued_groups=rollouts // 16, gaps=[],
                        groups=rollouts // 16, rollouts=rollouts, cut_groups=0, cut_rollouts=0, failed_indices=[],
                        redraws=0, missing_groups=[], completion_tokens=0, solved=0, validator_success=0,
                        reward_sum=0.0, seconds=1.0, deadline=356.0, ready_at=ready_at, write_seconds=1.0,
                        file_bytes=1, trigger="complete")


def test_spare_capacity_is_what_the_engine_could_add_before_the_cut() -> None:
    fill = FillOrder(["hk1", "hk2"], target_rollouts=5120)
    times = WindowTimes(0, opens=0.0, ends=360.0, deadline=356.0)
    assert fill.written("hk1", report(0, 5120, 101.0), times, cut=330.0) is None  # waits for the other hotkey
    spare = fill.written("hk2", report(0, 5120, 201.0), times, cut=330.0)
    assert spare is not None and not spare.short
    # 10,240 rollouts in the 200 s up to the last write: 51.2/s, for 130 s more until the cut
    assert spare.rollouts == 10240 and spare.busy_s == pytest.approx(200.0) and spare.spare_s == pytest.approx(130.0)
    assert spare.spare_rollouts == 6656 and spare.more_hotkeys == 1
    assert "1 more hotkey(s)" in spare.describe()
    fill.written("hk1", report(30, 5120, 101.0), times, cut=330.0)
    short = fill.written("hk2", report(30, 4000, 330.0), times, cut=330.0)
    assert short is not None and short.short == {"hk2": 4000} and short.spare_rollouts == 0 and short.more_hotkeys == 0
    assert "short" in short.describe()


# --- the command line -------------------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("grail-pipeline mine: error: ")
    return err


@pytest.mark.parametrize("flags, env, words", [
    (["--hotkeys", "cold"], {}, "is not COLDKEY/HOTKEY"),
    (["--hotkeys", "cold/a,cold/a"], {}, "named twice"),
    ([], {"GRAIL_HOTKEYS": "cold/a,/b"}, "GRAIL_HOTKEYS: '/b'"),
    (["--hotkeys", "cold/a,cold/b", "--target-rollouts", "cap"], {"GRAIL_REDIS_URL": "redis://127.0.0.1:1/0"},
     "run the fleet without a target"),
    (["--hotkeys", "cold/a,cold/b", "--checkpoint-dir", "x"], {}, "--checkpoint-dir"),
    (["--target-rollouts", "100"], {}, "groups of 16"),
    (["--target-rollouts", "lots"], {}, "a number of rollouts or 'cap'"),
    (["--failed-windows", "2"], {}, "add --target-rollouts cap"),
    (["--target-rollouts", "cap", "--failed-windows", "12"], {}, "--failed-windows 12"),
    (["--target-rollouts", "64"], {"GRAIL_REDIS_URL": "redis://127.0.0.1:1/0"}, "run the fleet without a target"),
])
def test_bad_hotkey_flags_are_one_line_before_any_model_loads(capsys, monkeypatch, tmp_path, flags, env,
                                                              words) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    err = one_line_error(capsys, ["mine", "--dry-run", "--model", "no/such-model", "--out-dir", str(tmp_path),
                                  *flags])
    assert words in err


def test_a_wallet_named_twice_by_two_names_is_refused(capsys, monkeypatch, tmp_path) -> None:
    root = tmp_path / "wallets"
    write_wallet(root, "cold", "a")
    (root / "cold" / "hotkeys" / "b").write_bytes((root / "cold" / "hotkeys" / "a").read_bytes())
    monkeypatch.setenv("BT_WALLET_PATH", str(root))
    err = one_line_error(capsys, ["mine", "--dry-run", "--model", "dummy:tiny", "--device", "cpu", "--out-dir",
                                  str(tmp_path / "out"), "--hotkeys", "cold/a,cold/b"])
    assert "already named" in err


# --- a real daemon, two hotkeys, one engine ----------------------------------------------------------------


def as_hotkey(contents: tuple[list[dict], dict], hotkey: str) -> tuple[list[dict], dict]:
    """A file's rows and metadata claimed by another hotkey (what a validator checking that hotkey would read)."""
    records, metadata = copy.deepcopy(contents)
    for r in records:
        r["hotkey"] = hotkey
    return records, {**metadata, "wallet": hotkey}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three windows sized from a group's time: minutes on a loaded box
def test_two_hotkeys_from_one_engine_write_their_own_files(tmp_path, monkeypatch, caplog, group_seconds) -> None:
    """Two hotkeys, one target of one group each: every file is its hotkey's alone (its problems, its signatures),
    passes every check under its own hotkey and fails them under the other's, and holds no more than the target."""
    root = tmp_path / "wallets"
    first, second = write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")
    monkeypatch.setenv("BT_WALLET_PATH", str(root))
    monkeypatch.setenv("GRAIL_HOTKEYS", "cold/hot1,cold/hot2")
    caplog.set_level("INFO", logger="grail_pipeline")
    out = tmp_path / "windows"
    # the fast engine runs both hotkeys' groups in one batch; whatever the machine's speed, what is asserted holds
    # for every file written, and a window with both hotkeys' groups in their files is needed once: windows with
    # room for both groups (one batch) and the drain at this machine's speed now, never under 24 s
    block = block_time_for(group_seconds("fast"), groups=3, floor=0.8)
    assert cli.main(["mine", "--dry-run", "--model", "dummy:tiny", "--device", "cpu", "--engine", "fast",
                     "--length-profile", "fixed:16", "--max-new-tokens", "16", "--batch-size", "32",
                     "--warmup-problems", "1", "--block-time", block, "--out-dir", str(out), "--max-windows", "3",
                     "--target-rollouts", "16", "--verify-sample", "2"]) == 0
    statuses = {hk: read_status(out / f"status-worker-0-{hk}.json") for hk in (first, second)}
    assert all(s["state"] == "stopped" and s["target_rollouts"] == 16 for s in statuses.values())
    assert statuses[first]["hotkeys"] == [first, second]
    loaded, tokenizer = load_model("dummy:tiny", "cpu"), load_tokenizer("dummy:tiny")
    both = 0
    for start in sorted({int(w) for s in statuses.values() for w in s["windows"]}):
        contents = {}
        for hk in (first, second):
            path = out / f"{hk}-window-{start}.parquet"
            if not path.exists():
                continue
            records, metadata = contents[hk] = read_window_file(path)
            assert metadata["wallet"] == hk and all(r["hotkey"] == hk for r in records)  # no other hotkey's rows
            assert len(records) <= 16 and int(metadata["issued_groups"]) <= 1  # the target stopped the window
            assert statuses[hk]["windows"][str(start)]["rollouts"] == len(records)
            if records:
                own = check_window_file(path, tokenizer, loaded)
                assert own.passed, {c.name: c.problems for c in own.checks if not c.ok}
        if all(contents.get(hk, ([], {}))[0] for hk in (first, second)):
            both += 1
            a, b = (contents[hk][0][0] for hk in (first, second))
            prompt = a["commit"]["rollout"]["prompt_length"]
            assert a["commit"]["tokens"][:prompt] != b["commit"]["tokens"][:prompt]  # problems seeded by the address
            assert a["signature"] != b["signature"] and a["commit"]["signature"] != b["commit"]["signature"]
            for hk, other in ((first, second), (second, first)):
                path = out / f"{hk}-window-{start}.parquet"
                claimed = check_window_file(path, tokenizer, loaded, contents=as_hotkey(contents[hk], other))
                failed = {c.name for c in claimed.checks if not c.ok}
                assert not claimed.passed and {"signatures", "prompt", "file"} <= failed, failed
    assert both >= 1, caplog.text
    assert any("spare capacity" in r.getMessage() or "short:" in r.getMessage() for r in caplog.records)
    assert any("spare_capacity" in s for s in statuses.values())
    checked = [s["self_check"] for s in statuses.values() if "self_check" in s]
    assert checked and all(c["rollouts_checked"] == c["rollouts_passed"] > 0 for c in checked)
    assert json.loads((out / f"status-worker-0-{first}.json").read_text())["hotkey"] == first
    stopped = [r.getMessage() for r in caplog.records if "stopped (" in r.getMessage()]  # each unit's last line
    assert sorted(m[:10] for m in stopped) == sorted(f"[{hk[:8]}]" for hk in (first, second)), stopped
    checks = [r.getMessage() for r in caplog.records if "self-check (validator" in r.getMessage()]
    assert checks and all(m.startswith((f"[{first[:8]}] window", f"[{second[:8]}] window")) for m in checks), checks


@pytest.mark.slow
def test_a_stop_drains_every_hotkeys_window_and_exits_0(tmp_path) -> None:
    """SIGTERM at a random moment of a two-hotkey run: one signal stops both sources, what is in flight drains into
    each hotkey's file, every file under a final name is whole and its hotkey's alone, and both statuses say
    stopped."""
    seed = time.time_ns() % 2**32
    root = tmp_path / "wallets"
    hotkeys = [write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")]
    out, log = tmp_path / "windows", tmp_path / "mine.log"
    env = {"BT_WALLET_PATH": str(root), "GRAIL_HOTKEYS": "cold/hot1,cold/hot2"}
    with running_daemon(out, env, log, "--target-rollouts", "32") as proc:
        wait_for(log, r"INFO mining \(dry run", proc)
        delay = random.Random(seed).uniform(0.0, 6.0)
        time.sleep(delay)
        rc, took = signal_and_wait(proc, signal.SIGTERM, timeout=60)
    text = log.read_text()
    assert rc == 0 and took < 50, f"seed {seed}, delay {delay:.2f} s: exit {rc} after {took:.1f} s\n{text}"
    check_files_complete(out)
    for path in out.glob("*.parquet"):
        records, metadata = read_window_file(path)
        assert path.name.startswith(f"{metadata['wallet']}-") and all(r["hotkey"] == metadata["wallet"] for r in records)
        assert len(records) <= 32
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for hk in hotkeys:
        status = read_status(out / f"status-worker-0-{hk}.json")
        assert status["state"] == "stopped" and status["exit_reason"] == "SIGTERM", (seed, status)
